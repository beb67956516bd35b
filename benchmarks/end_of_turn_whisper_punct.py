"""Does Whisper's own punctuation at a pause tell a caller's end from a
pause, and does what it reads carry from one half of the set to the other?

Whisper writes a full stop, a comma or "..." after the last word it hears,
and it chooses from the voice as much as from the words: the same "Please
hold" gets a full stop when the voice falls and a comma when it holds. The
pause decode already runs that decoder, so its share of a sentence end
among the marks it could write next (asr/whisper.py ``sentence_end_share``)
costs nothing at a pause. Unlike the encoder head (``end_of_turn_head``)
nothing is trained: Whisper's pretraining is the only fit.

This reads a run of ``benchmarks.end_of_turn`` (its ``labelled_inputs``:
every labelled pause and true end, the inputs as the benchmark met them)
and reports, split as the other probes split the set (the recorded half:
pauses cut into one speaker's fluent prompt; the spoken half: the embedded
TTS voice):

* each input's AUC (true ends above pauses): Whisper's share, the server
  LLM's P(sentence ends), Smart Turn's P(done);
* ``whisper+rules`` across halves: its threshold picked on one half (the
  least mean delay at <= 5 % false cut-offs, thresholds as
  ``end_of_turn.fitted_frontier_whisper`` tries them), then applied to the
  other half unchanged: a threshold that only fits where it was picked
  shows here.

    python -m benchmarks.end_of_turn_whisper_punct --inputs benchmarks/results/end_of_turn.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asr.config import ASRConfig
from benchmarks import end_of_turn as eot
from benchmarks.end_of_turn_head import auc, by_source_and_kind

SCORES = ("whisper_end_p", "sentence_end_p", "smart_p")
TARGET = 0.05


def whisper_rules(items: list[dict[str, Any]], thresholds: Iterable[float], cfg: ASRConfig) -> list[dict[str, float]]:
    """whisper+rules (no LLM) at each threshold, every input known at the
    pause: the end-of-turn benchmark's frontier of those points."""
    grid = [{"threshold": t} for t in thresholds]
    return eot.frontier(items, grid, lambda x, k: eot.whisper_rules_window(x, cfg, k["threshold"]))


def pick(items: list[dict[str, Any]], cfg: ASRConfig) -> dict[str, float]:
    """The threshold with the least mean delay at <= 5 % cut-offs (else the fewest cut-offs)."""
    front = whisper_rules(items, eot.WHISPER_GRID, cfg)
    return next((p for p in front if p["false_cutoff_rate"] <= TARGET), front[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, default=Path("benchmarks/results/end_of_turn.json"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/end_of_turn_whisper_punct.json"))
    ns = parser.parse_args()
    started = time.perf_counter()
    source = json.loads(ns.inputs.read_text())
    rows = [
        {**x, "source": "spoken (TTS)" if x["case"].startswith("tts-") else "recorded"}
        for x in source["labelled_inputs"]
        if all(x.get(key) is not None for key in SCORES)
    ]
    total = len(source["labelled_inputs"])
    print(f"{len(rows)} of {total} labelled points have every input ({ns.inputs}, {source['commit']})")
    table = []
    for src, kind, ends, pauses in by_source_and_kind(rows, lambda r: r["pause_s"] is None):
        row: dict[str, Any] = {"source": src, "pauses": kind, "true_ends": len(ends), "non_end_pauses": len(pauses)}
        aucs = {key: auc([r[key] for r in ends], [r[key] for r in pauses]) for key in SCORES}
        row |= {f"auc_{key}": value for key, value in aucs.items()}
        table.append(row)
        shown = "  ".join(f"{key} {float('nan') if value is None else value:.2f}" for key, value in aucs.items())
        print(f"{src:<14}{kind:<28} ends {len(ends):>3} pauses {len(pauses):>3}  AUC {shown}")
    cfg = ASRConfig()
    halves = {name: [r for r in rows if r["source"] == name] for name in ("recorded", "spoken (TTS)")}
    across = []
    for fit, other in (("recorded", "spoken (TTS)"), ("spoken (TTS)", "recorded")):
        chosen = pick(halves[fit], cfg)
        applied = whisper_rules(halves[other], [chosen["threshold"]], cfg)[0]
        across.append({"picked_on": fit, "picked": chosen, "applied_to": other, "there": applied})
        print(
            f"whisper+rules: threshold {chosen['threshold']:g} picked on the {fit} half "
            f"({chosen['false_cutoff_rate']:.1%} / {chosen['mean_delay_ms']:.0f} ms) gives the {other} half "
            f"{applied['false_cutoff_rate']:.1%} / {applied['mean_delay_ms']:.0f} ms"
        )
    result = {
        "commit": eot._git_commit(),
        "command": f"python -m benchmarks.end_of_turn_whisper_punct --inputs {ns.inputs} --output {ns.output}",
        "inputs": {"file": str(ns.inputs), "commit": source["commit"], "command": source["command"]},
        "set": table,
        "across_halves": across,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {ns.output}")


if __name__ == "__main__":
    main()
