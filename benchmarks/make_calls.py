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

``--mid-sentence`` writes ``benchmarks/data/calls_mid_sentence.json``
instead: calls whose caller turns are the end-of-turn set's recorded items
(benchmarks/data/eot/pauses.json), each cut where the set pauses (after a
word count, at the midpoint between Whisper's word times, as the set is
built) with the set's pause lengths between the pieces: callers who pause
before digits, after "and", mid-sentence and between sentences, in whole
calls. The cut times are written into the file, so every machine plays the
same pieces (Whisper's word times differ by CPU).

    python -m benchmarks.make_calls --mid-sentence [--turns 3 --seed 5]
"""

from __future__ import annotations

import argparse
import json
import random

import soundfile

from benchmarks.corpus import ASTERISK_SOUNDS, SHARED_SPEECH, asterisk_prompts, shared_clips
from benchmarks.loadgen import CALLS_FILE

MID_SENTENCE_FILE = CALLS_FILE.parent / "calls_mid_sentence.json"


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


def build_mid_sentence(n_turns: int, seed: int) -> dict[str, object]:
    """Calls of the end-of-turn set's recorded items, paused where the set pauses."""
    from benchmarks import end_of_turn as eot
    from benchmarks.corpus import through_phone_line

    spec = json.loads(eot.SPEC.read_text())
    builder = eot.Builder(spec)
    turns = []
    for item in spec["recorded"]:
        try:
            utt = builder.recording(item["clip"])
        except StopIteration:
            print(f"  skipped {item['clip']}: recording not on this machine")
            continue
        words = builder.align(through_phone_line(utt.load(8000)))
        counts = [p["after_words"] for p in item["pauses"]]
        if max(counts) >= len(words):
            print(f"  skipped {item['clip']}: Whisper heard {len(words)} words")
            continue
        cuts = [round(t, 3) for t in builder.cut_times(words, counts)]
        root = ASTERISK_SOUNDS if utt.path.is_relative_to(ASTERISK_SOUNDS) else SHARED_SPEECH
        texts = [t.strip() for t in item["text"].split("|")]
        segments = [
            {
                "source": "asterisk" if root == ASTERISK_SOUNDS else "shared",
                "file": str(utt.path.relative_to(root)),
                "reference": text,
                "pause_before_s": builder.next_pause() if i else 0.0,
                "start_s": start,
                **({"end_s": end} if end is not None else {}),
            }
            for i, (text, start, end) in enumerate(zip(texts, [0.0, *cuts], [*cuts, None], strict=True))
        ]
        turns.append({"segments": segments, "kinds": [p["kind"] for p in item["pauses"]]})
    rng = random.Random(seed)
    rng.shuffle(turns)
    calls = []
    for k in range(len(turns) // n_turns):
        picked = turns[k * n_turns : (k + 1) * n_turns]
        calls.append(
            {
                "name": f"mid{k:02d}",
                "turns": [{**turn, "think_s": round(rng.uniform(0.4, 1.2), 2)} for turn in picked],
            }
        )
    return {
        "about": "Scripted benchmark calls whose callers pause inside their turns, at the end-of-turn set's "
        "pauses (benchmarks/make_calls.py --mid-sentence; benchmarks/data/eot/pauses.json); 'kinds' says what "
        "each pause is. Sources as in calls.json.",
        "seed": seed,
        "calls": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--mid-sentence", action="store_true", help=f"write {MID_SENTENCE_FILE.name} (see above)")
    ns = parser.parse_args()
    data = build_mid_sentence(ns.turns, ns.seed) if ns.mid_sentence else build(ns.calls, ns.turns, ns.seed)
    out = MID_SENTENCE_FILE if ns.mid_sentence else CALLS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}: {len(data['calls'])} calls x {ns.turns} turns")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
