"""Do the classic prosodic end-of-turn cues (a final pitch fall, fading
intensity) tell a caller's end from a pause on the end-of-turn set?

Smart Turn is the set's only audio input (AUC ~0.8). Phonetics says a
statement ends on a falling pitch and fading loudness, and a speaker who
holds the floor keeps both up; these cues cost almost nothing to compute at
a pause. This measures them, with no fitting and each cue's direction fixed
beforehand (lower pitch / intensity at the end = more end-like):

* pitch (Praat's autocorrelation tracker via ``praat-parselmouth``, 75-500
  Hz, 10 ms steps) over the 3 s of audio before the point: the median of the
  last 200 ms of voiced frames in semitones against the median of the
  whole window; its slope over the last 300 ms of voiced frames; the lowest
  pitch in those 300 ms;
* intensity (Praat, dB): the last 200 ms of voiced frames against the
  window's median.

Points: every true end (the last piece's end) and every pause that is not
the end (its start), the audio as the set builds it. It reports each cue's
AUC (true ends above pauses) split by source, as `end_of_turn_head` does:
the recorded half (pauses cut into one speaker's fluent prompt) and the
spoken half (the embedded TTS voice; aligned cuts and spliced pieces). A cue
that wins only on the recorded half reads what a cut in fluent speech
leaves, not how callers end.

    pip install -e '.[probes]'   # praat-parselmouth
    python -m benchmarks.end_of_turn_prosody --output benchmarks/results/end_of_turn_prosody.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import end_of_turn as eot
from benchmarks.end_of_turn_head import auc, by_source_and_kind

RATE = 16000
WINDOW_S = 3.0
LAST_S = 0.2
SLOPE_S = 0.3
STEP_S = 0.01
CUES = ("pitch_last", "pitch_slope", "pitch_lowest", "intensity_last")


def cues(audio: np.ndarray, end_s: float) -> dict[str, float] | None:
    """The cues at ``end_s``, each signed so that lower means more end-like."""
    import parselmouth

    start = max(0, int((end_s - WINDOW_S) * RATE))
    sound = parselmouth.Sound(audio[start : int(end_s * RATE)].astype(np.float64), sampling_frequency=RATE)
    pitch = sound.to_pitch_ac(time_step=STEP_S, pitch_floor=75.0, pitch_ceiling=500.0)
    f0 = pitch.selected_array["frequency"]
    times = pitch.xs()
    voiced = np.flatnonzero(f0 > 0)
    if len(voiced) < 5:
        return None
    semitones = 12 * np.log2(f0[voiced])
    median = float(np.median(semitones))
    t_voiced = times[voiced]
    last = t_voiced[-1]
    tail = t_voiced >= last - LAST_S
    slope_part = t_voiced >= last - SLOPE_S
    slope = float(np.polyfit(t_voiced[slope_part], semitones[slope_part], 1)[0]) if slope_part.sum() > 3 else 0.0
    intensity = sound.to_intensity(minimum_pitch=75.0, time_step=STEP_S)
    db = np.interp(t_voiced, intensity.xs(), intensity.values[0])
    return {
        "pitch_last": float(np.median(semitones[tail])) - median,
        "pitch_slope": slope,
        "pitch_lowest": float(np.min(semitones[slope_part])) - median,
        "intensity_last": float(np.mean(db[tail]) - np.median(db)),
    }


def points(cases: list[eot.Case]) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        source = "spoken (TTS)" if case.id.startswith("tts-") else "recorded"
        for pause in case.pauses:
            rows.append(
                {
                    "case": case.id,
                    "source": source,
                    "end": False,
                    "complete": pause.complete,
                    "cues": cues(case.audio, pause.start_s),
                }
            )
        end_s = len(case.audio) / RATE - eot.TAIL_S
        rows.append({"case": case.id, "source": source, "end": True, "complete": None, "cues": cues(case.audio, end_s)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/end_of_turn_prosody.json"))
    ns = parser.parse_args()
    started = time.perf_counter()
    rows = points(eot.build_cases(None))
    measured = [r for r in rows if r["cues"] is not None]
    print(f"{len(rows)} points, {len(rows) - len(measured)} without enough voiced frames (left out)")
    table = []
    for source, kind, ends, pauses in by_source_and_kind(measured, lambda r: r["end"]):
        row: dict[str, Any] = {
            "source": source,
            "pauses": kind,
            "true_ends": len(ends),
            "non_end_pauses": len(pauses),
        }
        for cue in CUES:
            row[f"auc_{cue}"] = auc([-r["cues"][cue] for r in ends], [-r["cues"][cue] for r in pauses])
        table.append(row)
        print(
            f"{source:<14}{kind:<28} ends {len(ends):>3} pauses {len(pauses):>3}  AUC "
            + "  ".join(f"{cue} {row[f'auc_{cue}'] or float('nan'):.2f}" for cue in CUES)
        )
    result = {
        "commit": eot._git_commit(),
        "command": "python -m benchmarks.end_of_turn_prosody --output " + str(ns.output),
        "cues": {"window_s": WINDOW_S, "last_s": LAST_S, "slope_s": SLOPE_S, "pitch": "Praat ac, 75-500 Hz"},
        "set": table,
        "points": rows,
        "wall_s": round(time.perf_counter() - started),
    }
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {ns.output}")


if __name__ == "__main__":
    main()
