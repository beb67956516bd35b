"""How long a pause must last before the caller's turn is over.

A fixed window is either too eager (cuts callers who pause mid-sentence) or
too patient (every reply waits for it). The window here follows the words
decoded at the start of the pause: a finished sentence gets a short window,
a turn that stops on a conjunction, filler, article or preposition ("and",
"um", "the", "to") or on a bare number (a phone number or amount being
read out) gets a long one, unless that number is read out in full: a field
callers read digit by digit and whose length is fixed ("my zip code is
94107", "the last four digits are 7703") is done at its last digit. A
short answer on its own ("No.", "Yes, please.") is never held as unfinished.
A contraction that wants more ("so the reason I'm.") and a run of digits
spoken as words ("seven three one.") hold too; a question mark closes a
question on any word but a conjunction, filler or article ("Can you repeat
that?", "What is this regarding?").
Whisper ends nearly every segment with a period, even mid-sentence, so the
last *word* carries more signal than punctuation.

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
    whether regarding including concerning except within during toward
    towards across per via upon
    i'm i'd i'll i've we're we'll we've you're you'll they're they'll he's
    she's it's there's what's
    """.split()
)

# Object pronouns end many finished sentences ("thank you.", "connect you.",
# "I'll take it."): they hold the turn only after a word that wants more
# ("can you", "do you", "is it", "and it").
OBJECT_PRONOUNS = frozenset({"you", "it"})

# Whisper's question mark is its ear's verdict that a question ended: after
# a word that may close a question ("Can you repeat that?", "Who is this?",
# "What is this regarding?") it does, where a period after the same word
# ("I was told that.") does not close the sentence. Not after these, which
# no question ends on ("And?", "Is it the?").
NEVER_CLOSE_A_QUESTION = frozenset(
    """
    and but or so because um uh er erm ah hmm the a an my your his her our their its every
    """.split()
)

_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    """Lower-cased words, a typographic apostrophe read as a plain one
    ("I’m" is one word, as "I'm")."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


# How Whisper writes words it heard go on: a trailing comma, dash, ellipsis
# or colon.
_GOES_ON = (",", "-", "...", "…", ":")

# Fields read out digit by digit whose length says when they are complete,
# as (what names the field, how many digits complete it). A field of free
# length (an order or account number) is not here: its end cannot be told
# from the digits, and it keeps the long window. The field is named right
# before the digits ("my zip code is 941 07") or in the question the caller
# answers ("What's your zip code?" "It's 94107.").
_FIELD_NAMES: tuple[tuple[str, frozenset[int]], ...] = (
    (r"last (?:four|4)(?: digits)?", frozenset({4})),
    (r"zip|zip code|postal code|post code|postcode", frozenset({5, 9})),
    (
        r"(?:phone|telephone|cell|mobile|callback|call back|contact) number|number to (?:reach|call|text) you",
        frozenset({10, 11}),
    ),
    (r"(?:card|credit card|debit card) number", frozenset({15, 16})),
    (r"social security number|social|ssn", frozenset({9})),
    (r"routing number", frozenset({9})),
)
NUMBER_FIELDS: tuple[tuple[re.Pattern[str], frozenset[int]], ...] = tuple(
    (re.compile(rf"\b(?:{name})$"), lengths) for name, lengths in _FIELD_NAMES
)
_ASKED_FIELDS: tuple[tuple[re.Pattern[str], frozenset[int]], ...] = tuple(
    (re.compile(rf"\b(?:{name})\b"), lengths) for name, lengths in _FIELD_NAMES
)
# A question about when, to come ("What time would suit you?", "When would
# you like to come in?", "What's a good time?"): the answer's clock time is
# complete without its colon, where on its own "at 730" may be a house
# number going on ("I live at 730 | Main Street"). Not a "when" inside the
# question ("When you have it, what's the order number?"), one about the
# past ("When did the charge show up?" "3 15 | 2024"), nor any "time"
# ("Take your time.", "at the time").
_ASKS_WHEN = re.compile(
    r"^(?:(?:and|so|okay|ok|great|alright|perfect|thanks|thank you)\W+)*"
    r"(?:what time|which time|when (?:would|will|can|could|should|shall|do|does|are|works?)\b)"
    r"|\b(?:good|best|better|convenient|preferred) time\b"
)
# Words before the digits that say the number is not a clock time.
_NOT_A_TIME = frozenset(
    """
    number order account id code room unit apartment apt suite address street avenue live house card pin
    zip member ticket reference confirmation extension ext floor flight invoice policy claim case
    """.split()
)
# An answer that leads into the digits with only these takes the field the
# question named ("Sure, it's 94107."); other words name a number of their
# own ("my account number is 555 123 4567" answering "What's your phone number?").
_ANSWER_LEAD = frozenset(
    "sure yeah yes yep yup ok okay um uh er so well oh right alright it it's its that's that is my the number".split()
)
# Between the field's name and its digits ("my zip code is", "it's").
_LINKING = frozenset({"is", "are", "was", "it's", "its", "it", "that's", "should", "be", "would"})
# Digits spoken as words: Whisper writes most as numerals, a few not.
DIGIT_WORDS = frozenset("zero oh o one two three four five six seven eight nine".split())
_NUMBER_TOKEN = re.compile(r"[a-z']+|\d+")
# A clock time with its minutes ("at 7:30") and a date with its year
# ("March 3, 1985") are complete too; "at 7" and "March 3" are not. Without
# its colon "at 730" may be a house number ("I live at 730 | Main Street").
_MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
_TIME_OR_DATE = re.compile(
    r"(?:\b(?:at|by|around|before|after|until|till) (?:[1-9]|1[0-2]):[0-5]\d"
    rf"|\b(?:{_MONTHS}) (?:[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?,? (?:19|20)\d\d)[.?!]?$"
)


def asked_question(agent_line: str | None) -> str:
    """What the caller is answering, lower-cased: the agent's line's last
    question, else its last sentence ("Thanks. What's your zip code? Take
    your time." -> "what's your zip code?"); "" when there is none."""
    if not agent_line:
        return ""
    sentences = [s for s in re.split(r"(?<=[.?!])\s+", agent_line.strip().lower().replace("\u2019", "'")) if s]
    questions = [s for s in sentences if s.endswith("?")]
    return (questions or sentences or [""])[-1]


def _clock_time(tokens: list[str]) -> bool:
    """The last tokens are a clock time with its minutes: "7 30", "7:30"
    (split at the colon), "730", "1045"."""
    if len(tokens) >= 2 and tokens[-2].isdigit() and tokens[-1].isdigit():
        hour, minutes = tokens[-2], tokens[-1]
    elif tokens and tokens[-1].isdigit() and len(tokens[-1]) in (3, 4):
        hour, minutes = tokens[-1][:-2], tokens[-1][-2:]
    else:
        return False
    # Lengths first: int() of a digit run thousands long raises.
    return len(hour) <= 2 and len(minutes) == 2 and 1 <= int(hour) <= 12 and int(minutes) < 60


def number_read_out(text: str, asked: str | None = None) -> bool:
    """The words stop on the last digit of a fixed-length field read out in
    full ("my phone number is 555-212-4498"), or on a clock time or a date
    with its year; False for a field cut short ("my zip code is 941") or a
    number of free length ("the order number is 45291").

    ``asked``: the agent's line the caller answers (``asked_question``): the
    one field it names needs no name in an answer that names no other ("What's your zip code?"
    "94107."), and after a question about when a clock time is complete
    without its colon ("What time would suit you?" "730.")."""
    lowered = text.strip().lower().replace("\u2019", "'")
    if lowered.endswith(_GOES_ON):
        return False  # Whisper heard the line go on
    if _TIME_OR_DATE.search(lowered):
        return True
    tokens = _NUMBER_TOKEN.findall(lowered)
    digits = 0
    at = len(tokens)
    while at > 0 and (tokens[at - 1].isdigit() or tokens[at - 1] in DIGIT_WORDS):
        at -= 1
        digits += len(tokens[at]) if tokens[at].isdigit() else 1
    if not digits:
        return False
    number = tokens[at:]
    while at > 0 and tokens[at - 1] in _LINKING:
        at -= 1
    name = " ".join(tokens[:at])
    named = [lengths for pattern, lengths in NUMBER_FIELDS if pattern.search(name)]
    if named:
        return any(digits in lengths for lengths in named)
    question = asked_question(asked)
    before = tokens[:at]
    asked_for = [lengths for pattern, lengths in _ASKED_FIELDS if pattern.search(question)]
    if asked_for:
        # One field asked for, and an answer that names no other number:
        # its length, even where the question says "when" too.
        return len(asked_for) == 1 and set(before) <= _ANSWER_LEAD and digits in asked_for[0]
    return bool(_ASKS_WHEN.search(question)) and not _NOT_A_TIME.intersection(before) and _clock_time(number)


# A whole turn made of these is an answer in itself ("Yes.", "No, thanks.",
# "Sure.", "Tuesday."): the caller was asked something and answered. "no"
# is a continuation word ("no more"), so without this "No." waited the
# longest window; and a small LLM reads a lone "Yes." as a sentence that
# goes on. A caller who does go on ("yes | and also...") is the resume
# rule's to merge.
_ANSWER_CORE = frozenset(
    """
    yes yeah yep yup no nope nah okay ok sure right correct exactly absolutely
    definitely fine great perfect thanks thank
    monday tuesday wednesday thursday friday saturday sunday today tomorrow tonight
    """.split()
)
_ANSWER_FILL = frozenset({"please", "you", "that's", "very", "much"})
SHORT_ANSWER_WORDS = 3


def short_answer(text: str) -> bool:
    """The whole turn is a short answer on its own ("Yes.", "No, thank
    you.", "That's right.", "Tuesday."): at most three words, each an answer
    word or a polite one, at least one an answer word; not when Whisper
    heard it go on (a trailing comma)."""
    stripped = text.strip().lower()
    if stripped.endswith(_GOES_ON):
        return False
    words = _words(stripped)
    return (
        0 < len(words) <= SHORT_ANSWER_WORDS
        and all(w in _ANSWER_CORE or w in _ANSWER_FILL for w in words)
        and any(w in _ANSWER_CORE for w in words)
    )


def ends_unfinished(text: str) -> bool:
    """The words so far stop where a speaker is almost never done: on a
    continuation word, a numeral, or a run of digits spoken as words ("seven
    three one"; a lone "one" ends "the blue one")."""
    words = _words(text)
    if not words:
        return False
    word = words[-1]
    if text.rstrip().endswith("?") and word not in NEVER_CLOSE_A_QUESTION:
        return False
    if word in OBJECT_PRONOUNS:
        return len(words) < 2 or words[-2] in CONTINUATION_WORDS
    if word in DIGIT_WORDS and len(words) >= 2 and (words[-2] in DIGIT_WORDS or words[-2].isdigit()):
        return True
    return word in CONTINUATION_WORDS or word.isdigit()


def endpoint_window(text: str, config: ASRConfig, asked: str | None = None) -> float:
    """Silence (s) after which a turn whose words so far are ``text`` ends;
    ``asked``: the agent's line the caller answers (``number_read_out``)."""
    stripped = text.strip()
    if not stripped:
        return config.endpoint_unsure_s
    if number_read_out(stripped, asked):
        # The field's length says it is whole, surer than any mark Whisper
        # writes after a string of digits: the sure window where one is set.
        return min(config.endpoint_sure_s or config.endpoint_min_s, config.endpoint_min_s)
    if short_answer(stripped):
        # Not held as unfinished ("No."): an answer in itself, but one the
        # caller may go on from ("yes, | and...").
        return config.endpoint_answer_s or config.endpoint_unsure_s
    if stripped.endswith(_GOES_ON) or ends_unfinished(stripped):
        return config.endpoint_max_s
    # Whisper closes fragments with a period too ("At the tone."), so a
    # period counts only after a clause-sized run of words.
    words = len(_words(stripped))
    if stripped.endswith(("?", "!")) or (stripped.endswith(".") and words >= config.endpoint_sentence_words):
        return config.endpoint_min_s
    return config.endpoint_unsure_s
