"""How long a pause must last before the caller's turn is over.

A fixed window is either too eager (cuts callers who pause mid-sentence) or
too patient (every reply waits for it). The window here follows the words
decoded at the start of the pause: a finished sentence gets a short window,
a turn that stops on a conjunction, filler, article or preposition ("and",
"um", "the", "to") or on a bare number (a phone number or amount being
read out) gets a long one. Whisper ends nearly every segment with a period,
even mid-sentence, so the last *word* carries more signal than punctuation.

Measured by benchmarks/endpointing.py (false cut-offs vs endpoint delay).
"""

from __future__ import annotations

import re

from asr.config import ASRConfig

# Words after which a speaker is almost never done.
CONTINUATION_WORDS = frozenset(
    """
    and but or so because since although though unless if when while whereas
    than then that which who whose whom where what how why
    um uh er erm ah hmm like mean
    the a an my your his her our their its this these those some any no every
    to of in on at for with from by about into onto over under between through
    is are was were be been am can could would should will shall may might must
    do does did have has had i we you he she they it
    plus minus point dot dash oh zero
    """.split()
)

# Object pronouns end many finished sentences ("thank you.", "connect you.",
# "I'll take it."): they hold the turn only after a word that wants more
# ("can you", "do you", "is it", "and it").
OBJECT_PRONOUNS = frozenset({"you", "it"})

_WORD = re.compile(r"[a-z0-9']+")


def ends_unfinished(text: str) -> bool:
    """The words so far stop where a speaker is almost never done."""
    words = _WORD.findall(text.lower())
    if not words:
        return False
    word = words[-1]
    if word in OBJECT_PRONOUNS:
        return len(words) < 2 or words[-2] in CONTINUATION_WORDS
    return word in CONTINUATION_WORDS or word.isdigit()


def endpoint_window(text: str, config: ASRConfig) -> float:
    """Silence (s) after which a turn whose words so far are ``text`` ends."""
    stripped = text.strip()
    if not stripped:
        return config.endpoint_unsure_s
    if stripped.endswith((",", "...", "…", "-", ":")) or ends_unfinished(stripped):
        return config.endpoint_max_s
    # Whisper closes fragments with a period too ("At the tone."), so a
    # period counts only after a clause-sized run of words.
    words = len(_WORD.findall(stripped.lower()))
    if stripped.endswith(("?", "!")) or (stripped.endswith(".") and words >= config.endpoint_sentence_words):
        return config.endpoint_min_s
    return config.endpoint_unsure_s
