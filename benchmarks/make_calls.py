"""Build the benchmark's scripted calls once: ``benchmarks/data/calls.json``.

Every turn is real recorded speech: Debian's ``asterisk-core-sounds-en-wav``
prompts (8 kHz phone recordings, one sentence each, with transcripts) and
the single-speaker clips of ``../shared/data/speech``. A seeded shuffle makes
the file reproducible; it is committed so every run plays the same calls.

Per call: ``--turns`` turns; about a third of the turns are two recordings
with a pause inside the turn (0.3-0.7 s, what a caller does mid-thought:
an endpointer that cuts there answers half a question); the caller "thinks"
0.4-1.2 s after each reply before speaking. Every fourth call (call01, call05, …) has a
barge-in second turn: the caller talks 0.6-1.2 s into the first reply.

    python -m benchmarks.make_calls [--calls 24 --turns 4 --seed 5]
"""

from __future__ import annotations

import argparse
import json
import random

import soundfile

from benchmarks.corpus import ASTERISK_SOUNDS, SHARED_SPEECH, asterisk_prompts, shared_clips
from benchmarks.loadgen import CALLS_FILE


def pool() -> list[dict[str, str]]:
    items = []
    for p in asterisk_prompts(min_words=4):
        if p.reference.rstrip(".!? ").count(".") or soundfile.info(str(p.path)).duration > 6.0:
            continue  # one sentence, phone-turn length
        items.append({"source": "asterisk", "file": str(p.path.relative_to(ASTERISK_SOUNDS)), "reference": p.reference})
    for c in shared_clips():
        if c.path.suffix in (".wav", ".flac"):
            items.append({"source": "shared", "file": str(c.path.relative_to(SHARED_SPEECH)), "reference": c.reference})
    return items


def build(n_calls: int, n_turns: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    items = pool()
    if not items:
        raise SystemExit("no recordings: install asterisk-core-sounds-en-wav and ../shared/data/speech")
    rng.shuffle(items)
    it = iter(items * 10)
    calls = []
    for k in range(n_calls):
        turns = []
        barge_turn = 1 if k % 4 == 1 and n_turns > 1 else None
        for t in range(n_turns):
            segments = [{**next(it), "pause_before_s": 0.0}]
            if rng.random() < 0.33:
                segments.append({**next(it), "pause_before_s": round(rng.uniform(0.3, 0.7), 2)})
            turn: dict[str, object] = {"segments": segments, "think_s": round(rng.uniform(0.4, 1.2), 2)}
            if t == barge_turn:
                turn["barge_in_after_s"] = round(rng.uniform(0.6, 1.2), 2)
            turns.append(turn)
        calls.append({"name": f"call{k:02d}", "turns": turns})
    return {
        "about": "Scripted benchmark calls (benchmarks/make_calls.py); sources: shared = ../shared/data/speech, "
        "asterisk = /usr/share/asterisk/sounds/en (Debian asterisk-core-sounds-en-wav, CC-BY-SA-3.0).",
        "seed": seed,
        "calls": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5)
    ns = parser.parse_args()
    data = build(ns.calls, ns.turns, ns.seed)
    CALLS_FILE.parent.mkdir(parents=True, exist_ok=True)
    CALLS_FILE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {CALLS_FILE}: {ns.calls} calls x {ns.turns} turns")


if __name__ == "__main__":
    main()
