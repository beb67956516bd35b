"""Build the end-of-turn set's held-out half once:
``benchmarks/data/eot/holdout.json``.

The labelled set (benchmarks/data/eot/pauses.json) chose the policies and
their thresholds, so its figures flatter them. This file holds recorded
turns that no choice has seen: every Asterisk prompt (real 8 kHz phone
speech) of 6 to 24 words that the set does not use (by name or by its
words), once, whose Whisper words match its transcript word for word. The labels come from the transcript,
never from Whisper (whose punctuation is one of the inputs under test):

* one pause that is NOT the end inside a sentence, at the word boundary
  nearest the middle that has no punctuation in the transcript (its kind
  names the word before it where that word cannot end a sentence:
  ``after-to``, ``after-conjunction``, ``after-article``,
  ``after-preposition``; else ``mid-sentence``);
* where the transcript has two sentences, one pause at the first sentence
  end too (``between-sentences``, ``complete``: the words so far make a
  whole sentence, and only the caller going on shows it was not the end);
* the end of the prompt, a true end (``statement``).

The pause lengths rotate through the set's own (0.35 / 0.5 / 0.7 / 0.9 s).
Run the candidates on it with ``python -m benchmarks.end_of_turn --spec
benchmarks/data/eot/holdout.json``.

    python -m benchmarks.make_eot_holdout
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from benchmarks import end_of_turn as eot
from benchmarks.corpus import asterisk_prompts, through_phone_line
from voice.call.reply_policy import is_complete

HOLDOUT = eot.SPEC.parent / "holdout.json"
MIN_WORDS, MAX_WORDS = 6, 24
_CONJUNCTIONS = {"and", "or", "but", "so", "because", "then", "if", "when", "while"}
_ARTICLES = {"a", "an", "the", "your", "my", "our", "this"}
_PREPOSITIONS = {"of", "for", "in", "on", "at", "from", "with", "by", "into", "after", "before"}
_ANY_MARK = re.compile(r"[.?!,;:]+[\"')]*$")


def _parts(tokens: list[str]) -> list[tuple[str, int, bool]]:
    """(normalised word, index of its token, last part of that token) for
    every word Whisper's tokeniser and the transcript's spaces may split
    differently ("non-administrator", "9:30")."""
    out = []
    for i, token in enumerate(tokens):
        words = eot._words(token)
        out += [(w, i, k == len(words) - 1) for k, w in enumerate(words)]
    return out


def _kind(word: str) -> str:
    if word == "to":  # "press 1 to |": an infinitive, the commonest cut in IVR prompts
        return "after-to"
    if word in _CONJUNCTIONS:
        return "after-conjunction"
    if word in _ARTICLES:
        return "after-article"
    if word in _PREPOSITIONS:
        return "after-preposition"
    return "mid-sentence"


def holdout_item(name: str, reference: str, whisper_words: list[str]) -> dict[str, Any] | None:
    """The item for one prompt, or None where the words do not line up or
    the prompt has no place to pause (too short, or more than two sentences)."""
    ref_tokens = reference.split()
    ref = _parts(ref_tokens)
    heard = _parts(whisper_words)
    if [w for w, _, _ in ref] != [w for w, _, _ in heard]:
        return None
    # Boundaries after part k where both the transcript's token and
    # Whisper's word end, at least two words from either end.
    bounds = []
    for k in range(1, len(ref) - 2):
        (word, tok, tok_last), (_, heard_word, heard_last) = ref[k], heard[k]
        if tok_last and heard_last:
            bounds.append((k, word, ref_tokens[tok], heard_word))
    ends = [b for b in bounds if is_complete(b[2])]
    inside = [i for i, t in enumerate(ref_tokens[:-1]) if is_complete(t)]
    if len(inside) > 1 or len(ends) != len(inside):
        return None  # more than two sentences, or a sentence end where no pause can go
    open_ = [b for b in bounds if not _ANY_MARK.search(b[2])]
    if not open_:
        return None
    middle = len(ref) / 2
    pick = [min(open_, key=lambda b: (abs(b[0] + 1 - middle), b[0]))]
    if ends:
        pick.append(ends[0])
    pick.sort()
    pauses = []
    cut_tokens = set()
    for k, word, token, heard_word in pick:
        sentence = is_complete(token)
        kind = "between-sentences" if sentence else _kind(word)
        pause: dict[str, Any] = {"after_words": heard_word + 1, "kind": kind}
        if sentence:
            pause["complete"] = True
        pauses.append(pause)
        cut_tokens.add(ref[k][1])
    text = " ".join(t + (" |" if i in cut_tokens else "") for i, t in enumerate(ref_tokens))
    return {"clip": name, "text": text, "pauses": pauses, "end": "statement"}


def _said(text: str) -> tuple[str, ...]:
    return tuple(eot._words(text.replace("|", " ")))


def build() -> dict[str, Any]:
    spec = json.loads(eot.SPEC.read_text())
    used = {item["clip"] for item in spec["recorded"]}
    # The same words under another name (Asterisk records some prompts
    # twice, or in three voices) would be the main set's turn again, or one
    # turn counted three times.
    seen = {_said(item["text"]) for item in spec["recorded"]}
    builder = eot.Builder(spec)
    items = []
    for utt in asterisk_prompts(min_words=MIN_WORDS):
        n = len(utt.reference.split())
        if utt.name in used or n > MAX_WORDS or "..." in utt.reference or "…" in utt.reference:
            continue
        if _said(utt.reference) in seen:
            print(f"  skipped {utt.name}: the same words as a turn already in a set")
            continue
        seen.add(_said(utt.reference))
        words = builder.align(through_phone_line(utt.load(8000)))
        item = holdout_item(utt.name, utt.reference, [w.word.strip() for w in words])
        if item is None:
            print(f"  skipped {utt.name}: Whisper's words differ from the transcript, or no place to pause")
            continue
        items.append(item)
    return {
        "about": "Held-out labelled pauses for benchmarks/end_of_turn.py (--spec), built by "
        "benchmarks/make_eot_holdout.py from Asterisk prompts the main set does not use; labels from the "
        "transcripts. Same format as pauses.json.",
        "pauses_s": spec["pauses_s"],
        "recorded": items,
        "spoken": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(HOLDOUT))
    ns = parser.parse_args()
    data = build()
    out = Path(ns.output)
    out.write_text(json.dumps(data, indent=1) + "\n")
    n = len(data["recorded"])
    pauses = sum(len(x["pauses"]) for x in data["recorded"])
    print(f"wrote {out}: {n} turns, {pauses} pauses that are not the end ({n} true ends)")


if __name__ == "__main__":
    main()
