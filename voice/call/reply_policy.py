"""What of a generated reply a caller hears: phone-length, no loops, whole
sentences only.

Small models loop ("I'm just a chatbot." ×12, "no-nonsense no-nonsense …")
and a caller hears every word through the TTS; the looped text would then be
fed back as history for the next turns. The turn asks :class:`ReplyGuard`
about each sentence before it goes out; a ``stop`` verdict ends the reply
there and aborts the generation, so no compute is spent on words nobody
will hear.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import unicodedata
from collections.abc import Sequence

from asr.endpointing import DIGIT_WORDS

# Verdicts on one sentence.
SEND = "send"
STOP_LENGTH = "max_sentences"  # the reply has said enough for a phone call
STOP_LOOP = "loop"  # the sentence repeats an earlier one, or stutters
STOP_CODE = "code"  # the model began a code block: nothing in it can be said on a call
SKIP = "skip"  # a first sentence that repeats the previous reply: left out, the reply goes on

# Markdown a chat model writes that a voice must not read out. Emphasis
# only as a pair around words ("**Note:**", "*Settings*"), never inside one
# ("jane__doe", "abc**123", "**21*" a keypad code, "5 * 3", "press * or #");
# inline code marks; and at a line's start a heading before a capitalised
# word, or a bullet or quote before a letter ("- 5 degrees", "> 3 items",
# "# of items" stay). A star is a bullet only before a capital: a piece the
# segmenter cut mid-line (a first clause, a run-on) can start with the
# keypad's star ("* then 0"), and a caller told "press then 0" dials wrong.
_EMPHASIS = re.compile(r"(?<![\w*~])(\*\*|__|~~|\*)(?=[^\s*~])([^\n]+?)(?<=[^\s*~])\1(?![\w*~])")
_LINE_MARKUP = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]+(?=[A-Z])|\*[ \t]+(?=[A-Z])|[-•+][ \t]+(?=[^\W\d_])|>[ \t]*(?=[^\W\d_]))",
    re.MULTILINE,
)
# A fence closed on its own line is inline code ("Type ```ls``` and press
# enter."): its words are said, as a single backtick's are. The segmenter
# ends a piece at every line break, so an open fence is a code block.
_INLINE_FENCE = re.compile(r"(```|~~~)([^\n]*?)\1")
_CODE_FENCE = re.compile(r"```|~~~")


def without_markdown(sentence: str) -> tuple[str, bool]:
    """The sentence as a voice says it, and whether a code block begins in
    it. Markdown's marks come out ("**Note:** press 1." -> "Note: press
    1."); from a code fence on nothing is speakable, so only the words
    before it are kept and the reply should end there (SmolLM2-135M writes
    Python on a phone call: benchmarks/reply_quality.py). What goes out is
    still text: streaming/tts.py ``speakable`` reads its numbers for our
    own TTS."""
    sentence = _INLINE_FENCE.sub(r"\2", sentence)
    fence = _CODE_FENCE.search(sentence)
    text = sentence[: fence.start()] if fence else sentence
    text = _LINE_MARKUP.sub("", text)
    text = _EMPHASIS.sub(r"\2", _EMPHASIS.sub(r"\2", text)).replace("`", "")  # twice: nested, "**a *b* c**"
    return " ".join(text.split()), fence is not None


_TERMINAL = re.compile(r"""[.!?…]["'”’)\]]*$""")


@dataclasses.dataclass(frozen=True)
class ReplyPolicy:
    # Sentences a reply may have (0: no limit). Phone replies are short by
    # design: benchmarks/reply_quality.py chose the default.
    max_sentences: int = 2
    # Drop a sentence that repeats an earlier one of this reply or of the
    # previous reply (similarity of their words, 0..1), and end the reply.
    loop_guard: bool = True
    similarity: float = 0.85
    # A word or phrase said this many times in a row inside one sentence is
    # degenerate text ("no-nonsense no-nonsense no-nonsense").
    max_stutter: int = 3
    # Said when a reply got no sentence out at all (the token cap cut its
    # only sentence, every sentence looped, or the model said nothing):
    # silence on a phone line sounds like a dropped call, and the caller
    # would wait for words that never come. "": say nothing.
    fallback: str = "Sorry, could you say that again?"
    # Said when the LLM failed before any sentence went out (the engine
    # died, is restarting, refused the request): not the fallback, which
    # asks the caller to repeat what the model never read. "": say nothing.
    failure_line: str = "Sorry, I can't answer right now. Please try again in a moment."

    def __post_init__(self) -> None:
        if self.max_sentences < 0:
            raise ValueError("reply max_sentences must be >= 0 (0: no limit)")
        if not 0.5 <= self.similarity <= 1.0:
            raise ValueError("reply loop similarity must be in 0.5..1.0")
        if self.max_stutter < 2:
            raise ValueError("reply max_stutter must be >= 2")


def words_of(text: str) -> list[str]:
    """Its words, in any script: letters, digits and combining marks
    (Devanagari's vowel signs are marks: "मैं" is one word). [a-z] alone
    saw no words in Russian or Hindi, so their loops went out whole."""
    text = text.casefold().replace("’", "'")
    kept = (c if c.isalnum() or c == "'" or unicodedata.category(c)[0] == "M" else " " for c in text)
    return [w for w in (word.strip("'") for word in "".join(kept).split()) if w]


def is_complete(sentence: str) -> bool:
    """Ends like a sentence (terminal punctuation, maybe a closing quote)."""
    return bool(_TERMINAL.search(sentence.strip()))


# Digits read out ("1 1 1 4", "zero zero seven", "double five") repeat by nature.
_DIGIT_WORDS = DIGIT_WORDS | {"double", "triple"}
# A phrase this long said twice back to back is a loop, not emphasis: a
# model looping without punctuation ("I am here to help you with your
# account I am here to help you with your account") never reaches the
# sentence-level check, and its run-on goes out whole.
_LONG_PHRASE_WORDS = range(5, 13)
# A run of this many words said a second time anywhere in one reply is a
# loop: a phrase of 13 words or more looped past stutters' reach, split
# over the segmenter's word-capped pieces so no two pieces were alike.
REPEATED_RUN_WORDS = 8


def _read_out(gram: Sequence[str]) -> bool:
    """Digits, or letters spelled out ("A A A 7 2", "w w w"): they repeat by nature."""
    return all(w.isdigit() or w in _DIGIT_WORDS or len(w) == 1 for w in gram)


def stutters(words: list[str], times: int) -> bool:
    """Some run of 1-4 words repeats ``times`` times back to back (digits
    and spelled letters read out aside), or one of 5-12 words twice."""
    for size, repeats in [*((n, times) for n in range(1, 5)), *((n, 2) for n in _LONG_PHRASE_WORDS)]:
        for start in range(0, len(words) - size * repeats + 1):
            gram = words[start : start + size]
            if _read_out(gram):
                continue
            if all(words[start + k * size : start + (k + 1) * size] == gram for k in range(1, repeats)):
                return True
    return False


# The caller asks for the last reply again: restating it is the answer, not a loop.
_ASKS_AGAIN = re.compile(
    r"\b(repeat|again|pardon|come again|say that|what was that|what did you say|one more time|"
    r"read (it|that|them|those) back|confirm|didn'?t (catch|hear|get) (that|it|you))\b"
)


def asks_to_repeat(caller_words: str | None) -> bool:
    """The caller's turn asks the agent to say (or confirm) it again."""
    return bool(caller_words) and bool(_ASKS_AGAIN.search(caller_words.lower()))  # type: ignore[union-attr]


# A short turn that asks for the last reply again ("What?", "Sorry?", "Huh?").
_CLARIFIERS = {"what", "sorry", "huh", "pardon", "excuse", "eh", "hmm"}


def asks_about_it(caller_words: str | None) -> bool:
    """The caller's turn asks again or asks about the last reply: a question
    ("Is it Monday?" after "Your appointment is on Monday at 3 p.m.") or a
    short clarifier ("What?"). The answer may restate the last reply, and
    that is no loop: left out, the caller heard the rest ("Anything else?")
    or the fallback instead of their answer."""
    if not caller_words:
        return False
    words = words_of(caller_words)
    short_clarifier = len(words) <= 3 and any(w in _CLARIFIERS for w in words)
    return asks_to_repeat(caller_words) or caller_words.rstrip().endswith("?") or short_clarifier


class ReplyGuard:
    """Judges one reply's sentences in order, against the reply so far and
    the previous reply the caller heard."""

    def __init__(self, policy: ReplyPolicy, previous_reply: str = "") -> None:
        self.policy = policy
        self.sent = 0  # sentences sent (a clause piece is not one)
        self._pieces = 0
        self._skipped = 0
        # The first sentence, left out because it repeated the previous reply
        # (the first can loop on nothing else; not a stutter): said after all
        # if the reply has nothing else, rather than the fallback.
        self.repeated_previous: str | None = None
        self._seen: list[list[str]] = []
        if previous_reply:
            self._previous = [w for w in (words_of(s) for s in split_sentences(previous_reply)) if w]
        else:
            self._previous = []

    @classmethod
    def for_turn(cls, policy: ReplyPolicy, caller_words: str | None, previous_reply: str) -> ReplyGuard:
        """The guard for a reply to ``caller_words``: saying the last reply
        again is a loop, unless the caller asked for it again or about it."""
        return cls(policy, "" if asks_about_it(caller_words) else previous_reply)

    @property
    def said_nothing_but_loops(self) -> bool:
        """The reply ended with only a left-out sentence: it was a loop."""
        return self._pieces == 0 and self._skipped > 0

    @property
    def full(self) -> bool:
        """The reply has all the sentences it may have: stop generating now."""
        return bool(self.policy.max_sentences) and self.sent >= self.policy.max_sentences

    def check(self, sentence: str, *, clause: bool = False) -> str:
        """The verdict on the reply's next piece. A ``clause`` (the first
        piece cut early for the TTS: streaming.sentences first_clause_words)
        is judged like a sentence but not counted against max_sentences:
        with its sentence's rest it is one sentence."""
        policy = self.policy
        if self.full:
            return STOP_LENGTH
        words = words_of(sentence)
        if not words:
            # Nothing to say ("...", "---", an emoji): not spoken and not
            # counted. Counted, it filled the sentence cap ahead of the
            # answer, or stood for the reply and kept the fallback out.
            return SKIP
        if policy.loop_guard and self._loops(words):
            self._seen.append(words)
            if self._pieces == 0 and self._skipped == 0:
                # Ending here would leave the caller with silence: leave this
                # one sentence out and see what the model says next.
                self._skipped += 1
                if not stutters(words, policy.max_stutter):  # a whole sentence, not degenerate text
                    self.repeated_previous = sentence
                return SKIP
            return STOP_LOOP
        self._seen.append(words)
        if not clause and is_complete(sentence):
            # A piece the segmenter cut at its word cap is part of a
            # sentence: counted, a long one stopped the reply mid-sentence.
            self.sent += 1
        self._pieces += 1
        return SEND

    def _loops(self, words: list[str]) -> bool:
        if stutters(words, self.policy.max_stutter) or self._repeats_a_run(words):
            return True
        if any(self._similar(words, earlier) for earlier in self._seen):
            return True
        # Short answers ("Yes.", "Sure.") may recur from one reply to the next.
        return len(words) >= 4 and any(self._similar(words, earlier) for earlier in self._previous)

    def _repeats_a_run(self, words: list[str]) -> bool:
        """A run of REPEATED_RUN_WORDS words ending in ``words`` was said
        before in this reply (in an earlier piece, or earlier in this one)."""
        size = REPEATED_RUN_WORDS
        earlier = [w for seen in self._seen for w in seen]
        everything = [*earlier, *words]
        runs: set[tuple[str, ...]] = set()
        for start in range(len(everything) - size + 1):
            run = tuple(everything[start : start + size])
            if _read_out(run):
                continue
            if run in runs and start + size > len(earlier):
                return True
            runs.add(run)
        return False

    def _similar(self, a: list[str], b: list[str]) -> bool:
        if a == b:
            return True
        if min(len(a), len(b)) < 4:
            return False  # too short for "near enough" to mean anything
        return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= self.policy.similarity


def split_sentences(text: str) -> list[str]:
    """Finished text (a stored reply) into its sentences."""
    return [s for s in re.split(r"(?<=[.!?…])\s+", text.strip()) if s]
