"""Whisper's repetition loop, cut back to its first pass.

On a turn that ends in a short phrase, tiny.en sometimes decodes the
phrase again and again until it hits its token cap ("...for you. 8. The
Press Yard 8. The Press Yard 8. The"). The text is then wrong, and it ends
mid-phrase ("The"), so the endpoint rule waits its longest window for words
that will never come (benchmarks/results/bench: 1.2 s on that turn at every
load level). A decode that stopped by itself (end of text before the cap)
is left alone: a caller may really say a thing twice ("You are now muted.
You are now muted.").
"""

from __future__ import annotations

import re

_NORM = re.compile(r"[^a-z0-9']+")
# The longest phrase looked for, in words.
MAX_PHRASE_WORDS = 12


def _norm(word: str) -> str:
    return _NORM.sub("", word.lower())


def cut_loop(text: str) -> str:
    """``text`` without a loop at its end: where its last words repeat one
    phrase at least twice over (the last pass may be cut short), only the
    first pass is kept. Text with no such loop comes back unchanged."""
    words = text.split()
    norm = [_norm(w) for w in words]
    n = len(norm)
    for k in range(1, min(MAX_PHRASE_WORDS, n // 2) + 1):
        # Walk back while each word equals the one a phrase length after it:
        # the tail from ``start`` on repeats a k-word phrase. The cap falls
        # between tokens, so the last word may be cut inside itself ("Hello.
        # Hello. Hello. Hel"): a start of its counterpart of two letters or
        # more counts, where two whole passes come before it.
        cut_word = n >= k + 1 and len(norm[-1]) >= 2 and norm[-1] != norm[-1 - k]
        cut_word = cut_word and norm[-1 - k].startswith(norm[-1])
        i = n - 1 - k - (1 if cut_word else 0)
        while i >= 0 and norm[i] == norm[i + k]:
            i -= 1
        start = i + 1
        whole_passes = (n - start - (1 if cut_word else 0)) // k
        if n - start >= 2 * k and any(norm[start : start + k]) and (not cut_word or whole_passes >= 2):
            return " ".join(words[: start + k])
    return text
