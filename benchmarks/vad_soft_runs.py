"""How long does the VAD's end-of-speech hysteresis hold the silence clock on real speech?

asr/turns.py counts a 32 ms chunk toward the pause and endpoint windows only
when Silero scores it ``vad_end_margin`` below ``vad_threshold``; a chunk in
between (a soft word ending, Silero still decaying) neither counts nor
resets the clock. On a line whose noise Silero keeps in that band the clock
would never run, and the turn would end only at the length cap, so the
tracker stops holding after ``vad_soft_hold_max_s`` of such chunks in one
gap. This script measures what the hold costs on real speech, so that cap
can sit above anything speech does:

    python -m benchmarks.vad_soft_runs

Every gap between voiced chunks (and from the last voiced chunk to the end
of the clip) in the Asterisk prompts, as a phone call delivers them
(8 kHz G.711 mu-law, resampled to 16 kHz), and the shared recordings: how
many in-between chunks it held (the delay the hysteresis adds to a window
there), and what share of gaps a given cap would have shortened. Prints a
table and writes benchmarks/results/vad_soft_runs.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from asr.config import ASRConfig
from asr.vad import CHUNK, SileroVAD
from benchmarks.corpus import asterisk_prompts, load_audio, shared_clips, through_phone_line

CHUNK_MS = CHUNK / 16000 * 1000
CAPS_S = (0.25, 0.5, 0.75, 1.0, 1.5)
RESULTS = Path(__file__).parent / "results" / "vad_soft_runs.json"


def soft_chunks_per_gap(probs: np.ndarray, threshold: float, margin: float) -> list[int]:
    """For each gap after a voiced chunk: the in-between chunks it holds.

    A gap runs from a voiced chunk to the next voiced one (or the clip's
    end) and counts only if it has a chunk below the threshold at all."""
    silent_below = max(threshold - margin, 0.05)
    gaps: list[int] = []
    soft = 0
    in_gap = False
    seen_voice = False
    for p in probs:
        if p >= threshold:
            if in_gap:
                gaps.append(soft)
            seen_voice, in_gap, soft = True, False, 0
        elif seen_voice:
            in_gap = True
            if p >= silent_below:
                soft += 1
    if in_gap:
        gaps.append(soft)
    return gaps


def _percentile(values: list[float], q: float) -> float | None:
    # None, not 0: a source with no gaps held nothing because it had nothing to hold.
    return round(float(np.percentile(values, q)), 1) if values else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only this many Asterisk prompts (a quick look)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)
    cfg = ASRConfig()
    vad = SileroVAD(cfg.vad_model)
    prompts = asterisk_prompts(min_words=1)[: ns.limit]
    if not prompts:
        parser.error("no Asterisk prompts: apt install asterisk-core-sounds-en-wav")
    sources: dict[str, list[np.ndarray]] = {
        "asterisk prompts, mu-law 8 kHz": [through_phone_line(u.load(8000)) for u in prompts],
        "shared recordings, 16 kHz": [load_audio(u.path) for u in shared_clips(single_speaker_only=False)],
    }
    started = time.perf_counter()
    report: dict[str, dict] = {}
    for name, clips in sources.items():
        held_ms: list[float] = []
        for audio in clips:
            usable = len(audio) // CHUNK * CHUNK
            probs = vad.stream().process(audio[:usable].astype(np.float32))
            held_ms += [n * CHUNK_MS for n in soft_chunks_per_gap(probs, cfg.vad_threshold, cfg.vad_end_margin)]
        report[name] = {
            "clips": len(clips),
            "gaps": len(held_ms),
            "held_ms": {q: _percentile(held_ms, float(q)) for q in ("50", "95", "99", "99.9", "100")},
            "gaps_a_cap_would_shorten": {f"{cap:g}": sum(1 for h in held_ms if h > cap * 1000) for cap in CAPS_S},
        }
    from benchmarks.bench import versions

    out = {
        "command": "python -m benchmarks.vad_soft_runs" + (f" --limit {ns.limit}" if ns.limit else ""),
        "versions": versions(),
        "vad_threshold": cfg.vad_threshold,
        "vad_end_margin": cfg.vad_end_margin,
        "vad_soft_hold_max_s": cfg.vad_soft_hold_max_s,
        "seconds": round(time.perf_counter() - started, 1),
        "sources": report,
    }
    print(f"in-between chunks held per gap (threshold {cfg.vad_threshold}, margin {cfg.vad_end_margin})")
    print(f"{'source':<34} {'gaps':>6}  held ms p50 / p95 / p99 / p99.9 / max   gaps a cap (s) shortens")
    for name, r in report.items():
        h = r["held_ms"]
        caps = "  ".join(f"{c}:{n}" for c, n in r["gaps_a_cap_would_shorten"].items())
        print(f"{name:<34} {r['gaps']:>6}  {h['50']} / {h['95']} / {h['99']} / {h['99.9']} / {h['100']}   {caps}")
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
