"""Streaming sentence segmentation between the LLM and the TTS.

The LLM streams a reply as small text deltas; the TTS wants whole sentences,
and the first one as early as possible, because time-to-first-audio is what
the caller hears. :class:`SentenceSegmenter` therefore emits a sentence the
moment its end is *certain* and not a character later, while refusing the
usual false ends (``Dr. Smith``, ``3.5``, ``example.com``, ``e.g. Paris``).

Design: a character-at-a-time state machine. Every character is examined
exactly once, in order, and every decision depends only on the characters
seen so far; a decision that needs lookahead (is this ``.`` followed by a
space and a capital?) is carried as state until the deciding character
arrives. Two consequences follow by construction:

* the work is linear in the reply length (no rescans of the buffer), and
* the output is identical however the reply is chunked into deltas.
"""

from __future__ import annotations

import bisect
import enum
import string
import unicodedata

# With the Arabic question mark and Urdu full stop ("؟", "۔") and the
# Devanagari danda ("।", "॥"): each is followed by a space, as "." is.
_WESTERN_TERMINATORS = frozenset(".!?…؟۔।॥")
# CJK text has no spaces between sentences, so these end a sentence on their own.
_CJK_TERMINATORS = frozenset("。！？｡")
_TERMINATORS = _WESTERN_TERMINATORS | _CJK_TERMINATORS
# Characters after a terminator that still belong to the sentence: `"Yes."`,
# `(see above.)`, markdown `**Note.**`.
_CLOSERS = frozenset("\"'”’»)]}」』）】〕*_`")
# Characters that may open the next sentence before its first letter.
# Also a dash, a number sign or a bullet: "Done. - Next item.", "Sure. #1
# is best." (each dropped the end: the first sentence waited for the next).
_OPENERS = frozenset("\"'“‘«([{「『（【¿¡*_`-–—#•")
_SPACED_OPENERS = frozenset("-–—•")
_SIGN_OPENERS = frozenset("-#")
_CURRENCY = frozenset("$€£¥")

# A "word." that never ends a sentence: titles precede a name, Latin
# abbreviations introduce an example, company suffixes sit mid-sentence.
_ABBREVIATIONS = frozenset(
    {
        "dr", "mr", "mrs", "ms", "mx", "prof", "st", "jr", "sr", "mt", "rev",
        "gen", "gov", "sen", "rep", "capt", "lt", "sgt", "col", "messrs",
        "vs", "e.g", "i.e", "cf", "approx", "ph.d",
    }
)  # fmt: skip
# Of those, the ones that may also end a sentence: a word that starts one
# comes next ("King Jr. He was great.", "a Ph.D. It helps."); a name does
# not ("John Smith Jr. Both know", "Sr. Garcia"). As dotted initialisms:
# "in the U.S. We ship." ends, "the U.S. Army" goes on.
_MAY_END_ABBREVIATIONS = frozenset({"jr", "sr", "ph.d"})
# Company suffixes end a name, and often the sentence with it: a capital after
# them starts a new one ("I work at Acme Inc. It is great."); anything else
# goes on ("Acme Inc., the maker", "Acme Inc. shares").
_SUFFIX_ABBREVIATIONS = frozenset({"inc", "ltd", "corp", "llc", "co"})
# A "word." that is only an abbreviation before a number: "No. 5" is, "No. Thanks" is not.
_NUMBER_ABBREVIATIONS = frozenset(
    {
        "no", "nos", "vol", "fig", "p", "pp", "ch", "sec",
        "ext", "apt", "ste", "rm", "bldg", "fl", "tel", "dept",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
        "nov", "dec",
        "mon", "tue", "tues", "wed", "thu", "thur", "thurs", "fri", "sat", "sun",
    }
)  # fmt: skip
# A weekday abbreviation goes on into a date ("on Tues. March 5"); before any
# other capital it ends the sentence. ("sun" and "sat" are words too.)
_WEEKDAY_ABBREVIATIONS = frozenset({"mon", "tue", "tues", "wed", "thu", "thur", "thurs", "fri"})
# Not "may": "until Fri. May I have your name?" (as after a clock time).
_MONTHS = frozenset(
    {
        "january", "february", "march", "april", "june", "july", "august",
        "september", "october", "november", "december",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    }
)  # fmt: skip
# A "word." that a range goes on from after a spaced dash ("9 a.m. – 5 p.m.",
# "Mon. - Fri."), where the dash comes before a number or a day, month or
# time of day (_RANGE_TO); before anything else it ends the sentence as any
# dash does ("at 3 p.m. - See you then!"). The pieces of a range, each sent
# as a sentence, spent a reply's sentence cap ("Mon." | "- Fri.").
_RANGE_FROM = _NUMBER_ABBREVIATIONS | {"a.m", "p.m"}
# A street suffix goes on into the rest of an address ("10 Oak Rd. Suite 5");
# before any other capital it ends the sentence ("at 42 Elm Ave. Parking is free.").
_STREET_SUFFIXES = frozenset({"ave", "rd", "blvd", "ln", "hwy", "pkwy", "ct", "pl"})
_ADDRESS_UNITS = frozenset({"suite", "ste", "apt", "unit", "floor", "fl", "bldg", "building", "room", "rm"})
# Dotted initialisms that usually *end* a clause, so a capital after them
# starts a sentence: "Meet at 5 p.m. Bring snacks." ("U.S. Army" does not.)
_CLAUSE_FINAL_DOTTED = frozenset({"a.m", "p.m"})
# Nouns that name a thing by a letter ("option A.", "vitamin C.", "plan B.",
# "gate D."), and the few words a grade or an answer follows ("is C.",
# "got an A."): a sentence may end on that letter. After any other word a lone
# capital is an initial ("J. A. Smith") or a list letter ("or B. The premium
# plan") and goes on, as before.
_LETTER_LABELS = frozenset(
    """
    option plan vitamin grade press type letter section part group class category zone gate
    terminal platform row seat level building wing block team channel step phase form schedule
    appendix exhibit tier model size line lane door hall floor unit suite choice answer
    is was an a got get gets
    """.split()
)
# Words that start a sentence and almost never follow a person's initial:
# after a lone capital initial ("option A.", "vitamin C.", "Plan B.") one of
# these starts the next sentence; a name ("J. Smith") does not.
_SENTENCE_STARTERS = frozenset(
    """
    the it it's this that these those then there here you your i we they he she
    please if and but so also next now let what when where which how why who
    is are do does can could would will should thank thanks for to a an my our
    just yes no okay ok great sure after before once otherwise in on at with
    """.split()
)
# What an emoji is made of: the symbol, a skin tone (Sk), the variation
# selector after "❤" (Mn), the zero-width joiner of combined ones (Cf).
_EMOJI_PARTS = frozenset({"So", "Sk", "Mn", "Me", "Cf"})
# (Only the first letters of a longer word are waited for.)
_LONGEST_AFTER_CLOCK_TIME = 10
# ...unless the capital starts one of these: "at 10 a.m. Monday", "3 p.m.
# Eastern". The segmenter waits for that next word (a few characters).
# (_MONTHS has no "may": "at 9 a.m. May I have your name?" is an agent's everyday line.)
_AFTER_CLOCK_TIME: frozenset[str] = _MONTHS | _WEEKDAY_ABBREVIATIONS | frozenset(
    {
        "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "sat", "sun",
        "eastern", "central", "mountain", "pacific", "atlantic", "alaska", "hawaii",
        "est", "edt", "cst", "cdt", "mst", "mdt", "pst", "pdt", "et", "ct", "mt", "pt",
        "gmt", "utc", "bst", "cet", "cest", "ist", "aest",
    }
)  # fmt: skip
_RANGE_TO: frozenset[str] = (
    _MONTHS
    | _WEEKDAY_ABBREVIATIONS
    | frozenset(
        {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "sat", "sun", "noon", "midnight"}
    )
)
# A "word." that a letter code goes on from ("Apt. B", "No. A12", "Ext.
# B7"): before a capital the next word decides, going on where it is a
# code: letters then a digit, or after an address unit one letter alone
# (True). "No. I think so." and "No. A lot of people" end.
_CODE_AFTER: dict[str, bool] = {
    "apt": True, "ste": True, "rm": True, "bldg": True, "fl": True,
    "no": False, "nos": False, "ext": False,
}  # fmt: skip
# A "word." before a capital that ends the sentence unless that capital
# starts one of the words it goes on into.
_GOES_ON_INTO: dict[str, frozenset[str]] = {
    **dict.fromkeys(_CLAUSE_FINAL_DOTTED, _AFTER_CLOCK_TIME),
    **dict.fromkeys(_WEEKDAY_ABBREVIATIONS, _MONTHS),
    **dict.fromkeys(_STREET_SUFFIXES, _ADDRESS_UNITS),
    # "the Dept. of Labor" goes on; "our Billing Dept. They can help." ends.
    "dept": frozenset({"of"}),
}
# The longest sentence handed to the TTS, in characters (25 words of
# English are about 150): see SentenceSegmenter.max_chars.
MAX_SENTENCE_CHARS = 200
# Where a "word" longer than that is cut, if it has any.
_LONG_WORD_BREAKS = "-/_"

# Run-on text is cut before these words (they start a new clause).
_CONJUNCTIONS = frozenset(
    {
        "and", "but", "or", "so", "because", "which", "while", "although",
        "though", "whereas", "yet", "since", "unless",
    }
)  # fmt: skip
_CLAUSE_PUNCTUATION = (",", ";", ":")
_DASHES = ("-", "–", "—", "--")
# A run-on is only cut at a clause boundary with at least this many words
# before it; a shorter chunk sounds clipped and saves little latency.
_MIN_CLAUSE_WORDS = 6
# The longest number read as a list marker ("12. Step") rather than a year.
_MAX_LIST_MARKER_DIGITS = 3


class _Mode(enum.Enum):
    TEXT = enum.auto()  # ordinary text
    TERMINATOR = enum.auto()  # inside a run of terminators: "?!", "..."
    CLOSERS = enum.auto()  # after the run, consuming closing quotes/brackets
    SPACE = enum.auto()  # whitespace after a western terminator
    OPENERS = enum.auto()  # opening quotes/brackets after that whitespace
    NEXT_WORD = enum.auto()  # "a.m. M...": the end waits for the word to finish


class SentenceSegmenter:
    """Split a streamed LLM reply into sentences as soon as each is certain.

    Feed deltas to :meth:`push`; it returns the sentences whose end became
    certain with that delta. Call :meth:`flush` at the end of the reply for
    the remainder. The segmenter is reusable after :meth:`flush`.

    ``max_words`` bounds a run-on sentence: once the pending text has more
    words than that, it is cut at the last clause boundary (or at the cap), so
    the TTS never waits on an unpunctuated ramble. ``max_chars`` bounds it
    in characters too: a "word" of hundreds (letters joined by hyphens, a
    URL) never reaches the word cap, and as one TTS job it would hold the
    voice every call shares for seconds. Sentences shorter than
    ``min_chars`` (after stripping) are not emitted alone; they are joined to
    the next one, since a one-character TTS request costs a round trip for
    nothing.

    ``first_clause_words`` (0: off) lets the reply's *first* piece end at
    the first clause boundary a run-on would be cut at (``,`` ``;`` ``:``
    a dash, or before "and", "but", "so"...) with at least that many words
    before it, the moment the boundary is certain, instead of at the
    sentence end: the TTS can start on "I'm sorry for any
    misunderstanding," while the model is still writing the rest. The
    price is a pause where a speaker might not make one: "and" as often
    joins two nouns ("the current date | and time."). Later pieces are
    whole sentences as usual. :attr:`clause_cut` says whether the reply's
    first piece was cut so: it is no sentence of its own, and a cap on a
    reply's sentences should not count it.
    """

    def __init__(
        self, max_words: int = 25, min_chars: int = 2, first_clause_words: int = 0, max_chars: int = MAX_SENTENCE_CHARS
    ) -> None:
        if max_words < 1:
            raise ValueError("max_words must be at least 1")
        if max_chars < 16:
            raise ValueError("max_chars must be at least 16")
        self.max_chars = max_chars
        if first_clause_words < 0:
            raise ValueError("first_clause_words must be >= 0 (0: off)")
        self.max_words = max_words
        self.first_clause_words = first_clause_words
        # Never emit an empty string, whatever min_chars says.
        self.min_chars = max(1, min_chars)
        self._chars_scanned = 0
        self._reset()

    @property
    def chars_scanned(self) -> int:
        """Characters examined since construction; equals characters pushed,
        because each is examined exactly once."""
        return self._chars_scanned

    def push(self, delta: str) -> list[str]:
        """Feed one LLM text delta; return the sentences now certainly complete."""
        self._chars.extend(delta)
        for ch in delta:
            self._step(ch)
        self._trim()
        out, self._out = self._out, []
        return out

    def flush(self) -> list[str]:
        """End of reply: return what remains (stripped), if non-empty, and reset."""
        rest = self._text(self._seg_start, self._pos).strip()
        self._reset()
        return [rest] if rest else []

    # -- state ---------------------------------------------------------------

    def _reset(self) -> None:
        # Positions are absolute offsets into the reply; ``_chars`` holds the
        # reply from ``_base`` on (the emitted prefix is dropped in ``_trim``).
        # A list, not a str, so appending a delta does not copy the buffer.
        self._chars: list[str] = []
        self._base = 0
        self._pos = 0  # next character to examine
        self._seg_start = 0  # start of the pending, not yet emitted, text
        self._out: list[str] = []
        self._mode = _Mode.TEXT
        # The candidate sentence end under consideration (modes other than TEXT).
        self._cand_end = 0  # just past the terminators and closers
        self._cand_cjk = False
        self._cand_single_dot = False  # only a lone "." can be an abbreviation
        self._cand_token = ""  # the word the terminator is attached to
        self._cand_street = False  # "St." after a name or number: a street, see _start_candidate
        self._cand_list_marker = False  # "1." opening a list item
        self._cand_dotless = False  # the run is "?", "!" or "…", with no "."
        self._opener_spaced = False  # the opener read last is a dash or bullet: a space may follow
        self._range_dash = False  # that dash follows a word a range goes on from (_RANGE_FROM)
        self._cand_after_label = False  # the lone capital follows "option", "vitamin"... (_LETTER_LABELS)
        self._next_word_start = 0  # NEXT_WORD: where the word after "a.m." starts
        # NEXT_WORD: the candidate ends unless that word is in the first set
        # ("a.m. Monday"), or, where the second is given, only if it is there
        # ("option A. Then").
        self._next_word_ends_unless: frozenset[str] = frozenset()
        self._next_word_ends_if: frozenset[str] | None = None
        # NEXT_WORD after "Apt." / "No.": whether the word is a code (None:
        # not waiting for one; True: one letter alone is one too).
        self._next_word_code: bool | None = None
        # Word tracking for the run-on cap, within the pending text.
        self._in_word = False
        self._word_start = 0
        self._word_starts: list[int] = []
        self._clause_cuts: list[int] = []  # where a run-on may be cut, ascending
        self._after_colon = False  # last finished word ended with ":"
        self._emitted_any = False  # a piece of this reply is out (first_clause_words)
        self.clause_cut = False  # the first piece ended at a clause boundary, not a sentence end

    def _text(self, start: int, end: int) -> str:
        return "".join(self._chars[start - self._base : end - self._base])

    def _trim(self) -> None:
        # Drop emitted text only once it is at least half the buffer, so the
        # copying `del` costs amortised O(1) per character.
        consumed = self._seg_start - self._base
        if consumed and consumed * 2 >= len(self._chars):
            del self._chars[:consumed]
            self._base = self._seg_start

    # -- the state machine ---------------------------------------------------

    def _step(self, ch: str) -> None:
        pos = self._pos
        self._chars_scanned += 1
        mode = self._mode
        if mode is _Mode.TEXT:
            self._scan_text(ch, pos)
        elif mode is _Mode.TERMINATOR:
            self._scan_terminator(ch, pos)
        elif mode is _Mode.CLOSERS:
            self._scan_closers(ch, pos)
        elif mode is _Mode.NEXT_WORD:
            self._scan_next_word(ch, pos)
        else:
            self._scan_after_space(ch, pos)
        self._track_words(ch, pos)
        # Checked in TEXT mode only, so a pending sentence end is always
        # decided before a run-on cut could pre-empt it.
        if self._mode is _Mode.TEXT:
            if len(self._word_starts) > self.max_words:
                self._cut_run_on()
            elif pos + 1 - self._seg_start >= self.max_chars:
                self._cut_overlong(pos + 1)
            elif self.first_clause_words and not self._emitted_any and self._clause_cuts:
                self._cut_first_clause()
        elif self._mode in (_Mode.TERMINATOR, _Mode.CLOSERS) and pos + 1 - self._seg_start >= self.max_chars:
            # A run of marks or emoji a looping model writes ("Well......",
            # "Thanks!😊😊😊") never goes back to TEXT: the cap held nothing
            # back, the first sentence waited for the run's end and went to
            # the voice as one. A sentence has ended by now: cut here.
            self._emit(pos + 1, force=True)
            self._mode = _Mode.TEXT
        elif self._mode in (_Mode.SPACE, _Mode.OPENERS) and pos + 1 - self._seg_start >= self.max_chars:
            # Emoji and spaces after the end ("Sure! 😊 😊 😊 ..."): the end is
            # known, and nothing after it came to decide it.
            self._emit(self._cand_end, force=True)
            self._mode = _Mode.TEXT
        self._pos = pos + 1

    def _scan_text(self, ch: str, pos: int) -> None:
        self._mode = _Mode.TEXT
        if ch == "\n":
            # A line break ends a non-empty segment: list items, bullets, headings.
            self._emit(pos)
        elif ch in _TERMINATORS:
            self._start_candidate(ch, pos)

    def _start_candidate(self, ch: str, pos: int) -> None:
        self._mode = _Mode.TERMINATOR
        self._range_dash = False
        self._cand_cjk = ch in _CJK_TERMINATORS
        self._cand_single_dot = ch == "."
        self._cand_dotless = ch != "."  # "?", "!", "…" (or a run of them)
        # The terminator is part of the current word, which started earlier.
        token = self._text(self._word_start, pos) if self._in_word else ""
        # Not the dash or number sign: "-1." is a number, not a list's "1.".
        self._cand_token = token.lstrip("".join(_OPENERS - _SIGN_OPENERS))
        is_first_word = len(self._word_starts) == 1
        # After a colon only "1." opens a list ("Steps: 1. Open the app"):
        # "Your total is: 15. Anything else?" ends at the number. Read
        # without its openers: "**1.** Open the app" is a list number too.
        marker = self._cand_token
        # Only before a ".": "10? That seems high." ends at the "?".
        self._cand_list_marker = (
            ch == "."
            and self._in_word
            and (is_first_word or (self._after_colon and marker == "1"))
            and marker.isdigit()
            and len(marker) <= _MAX_LIST_MARKER_DIGITS
        )
        # The word before a lone initial says whether it labels something
        # ("option A.") or is part of a name or list ("J. A. Smith", "or B.").
        # Read only for a lone capital: every other sentence end (each one
        # in every reply) skips the join.
        self._cand_after_label = False
        if len(self._cand_token) == 1 and self._cand_token.isupper():
            self._cand_after_label = self._word_before().lower() in _LETTER_LABELS
        # "St." after a name or a number is a street ("42 Main St. We open at
        # nine."), which may end the sentence; after anything else a saint
        # ("near St. Paul"). It held a first sentence back until the next.
        before = self._word_before() if self._cand_token.lower() == "st" else ""
        self._cand_street = bool(before) and (before[0].isupper() or before[0].isdigit())

    def _ends_without_space(self) -> bool:
        """The "?" or "!" ends a word ("Really?"), and the sentence is long
        enough to go out on its own (too short, it would join the next one
        with no space between)."""
        token = self._cand_token
        sentence = self._text(self._seg_start, self._cand_end).strip()
        return bool(token) and token[-1].isalnum() and len(sentence) >= self.min_chars

    def _word_before(self) -> str:
        """The word before the candidate's ("" at the start)."""
        if len(self._word_starts) < 2:
            return ""
        return self._text(self._word_starts[-2], self._word_starts[-1]).strip()

    def _scan_terminator(self, ch: str, pos: int) -> None:
        if ch in _TERMINATORS:
            self._cand_cjk = self._cand_cjk or ch in _CJK_TERMINATORS
            self._cand_single_dot = False
            self._cand_dotless = self._cand_dotless and ch != "."
            return
        self._cand_end = pos
        self._mode = _Mode.CLOSERS
        self._scan_closers(ch, pos)

    def _scan_closers(self, ch: str, pos: int) -> None:
        if ch in _CLOSERS or unicodedata.category(ch) in _EMOJI_PARTS:
            # An emoji right after the mark ("Sure!😊 I can help.") closes the
            # sentence as a quote would (it dropped the end, and the first
            # sentence waited for the next one).
            self._cand_end = pos + 1
        elif self._cand_cjk:
            # CJK needs no space after the terminator: the end is certain now.
            self._emit(self._cand_end)
            self._scan_text(ch, pos)
        elif ch == "\n":
            self._emit(self._cand_end)
            self._scan_text(ch, pos)
        elif ch.isspace():
            self._mode = _Mode.SPACE
            self._opener_spaced = False
        elif ch.isupper() and self._cand_dotless and self._ends_without_space():
            # "Really?Yes it is.", "Sure!How can I help?": a model that drops
            # the space still ended its sentence (after a "." it may be a
            # name: "ASP.NET").
            self._emit(self._cand_end)
            self._scan_text(ch, pos)
        else:
            # "3.5", "example.com", "U.S": no space, no sentence end.
            self._scan_text(ch, pos)

    def _scan_after_space(self, ch: str, pos: int) -> None:
        if ch == "\n":
            self._emit(self._cand_end)
        elif ch.isspace() and (self._mode is _Mode.SPACE or self._opener_spaced):
            return
        elif self._range_dash and ch.isdigit():
            self._range_dash = False
            self._scan_text(ch, pos)  # "9 a.m. – 5 p.m.": the range goes on
            return
        elif self._range_dash and ch.isupper():
            self._range_dash = False
            self._wait_next_word(pos, ends_unless=_RANGE_TO)  # "Mon. - Fri." goes on, "- See you" ends
            return
        elif ch in _OPENERS:
            self._range_dash = (
                ch in _DASHES
                and self._mode is _Mode.SPACE
                and self._cand_single_dot
                and self._cand_token.lower() in _RANGE_FROM
            )
            self._mode = _Mode.OPENERS
            # A dash or bullet stands apart from its sentence ("- Next item").
            self._opener_spaced = ch in _SPACED_OPENERS
            return
        elif self._mode is _Mode.SPACE and unicodedata.category(ch) in _EMOJI_PARTS:
            # An emoji or other symbol ("Sure! 😊 I can help"): the next
            # letter decides, as if it were space (it was dropping the end,
            # and the first sentence waited for the whole reply).
            return
        elif _can_start_sentence(ch) and not self._is_false_end(ch):
            if ch.isupper() and self._cand_single_dot:
                code_letter = _CODE_AFTER.get(self._cand_token.lower())
                if code_letter is not None:
                    self._wait_next_word(pos, code=code_letter)
                    return
                goes_on_into = _GOES_ON_INTO.get(self._cand_token.lower())
                if goes_on_into is not None:
                    self._wait_next_word(pos, ends_unless=goes_on_into)
                    return
            self._emit(self._cand_end)
        elif ch.isupper() and (
            self._cand_is_initial() or (self._cand_single_dot and (self._cand_street or self._cand_may_end()))
        ):
            # "option A. Then..." ends; "J. Smith" does not: the next word
            # says. So for a street's "St.": "Main St. We open" ends, "Visit
            # St. Paul" goes on; and "the U.S. We ship" ends, "the U.S. Army"
            # goes on.
            self._wait_next_word(pos, ends_if=_SENTENCE_STARTERS)
            return
        self._scan_text(ch, pos)

    def _wait_next_word(
        self,
        pos: int,
        ends_unless: frozenset[str] = frozenset(),
        ends_if: frozenset[str] | None = None,
        code: bool | None = None,
    ) -> None:
        self._mode = _Mode.NEXT_WORD
        self._next_word_start = pos
        self._next_word_ends_unless = ends_unless
        self._next_word_ends_if = ends_if
        self._next_word_code = code

    def _cand_may_end(self) -> bool:
        """An abbreviation or dotted initialism that ends a sentence when a
        word that starts one comes next (_MAY_END_ABBREVIATIONS)."""
        key = self._cand_token.lower()
        parts = key.split(".")
        dotted = len(parts) > 1 and all(len(p) == 1 and p.isalpha() for p in parts)
        # Not "e.g." or "i.e.": they introduce what follows.
        return key in _MAY_END_ABBREVIATIONS or (dotted and key not in _ABBREVIATIONS)

    def _cand_is_initial(self) -> bool:
        """A lone capital that a label word names ("option A."): it may end
        the sentence; any other lone capital is an initial or list letter."""
        token = self._cand_token
        return self._cand_single_dot and self._cand_after_label and len(token) == 1 and token.isupper()

    def _scan_next_word(self, ch: str, pos: int) -> None:
        if ch.isalpha() and pos - self._next_word_start < _LONGEST_AFTER_CLOCK_TIME:
            return
        word = self._text(self._next_word_start, pos).lower()
        if self._next_word_code is not None:
            # The word's letters stop here: at a digit it is a code ("A12"),
            # and after an address unit so is one letter ("Apt. B is").
            ends = not (ch.isdigit() or (self._next_word_code and len(word) == 1 and not ch.isalpha()))
        elif self._next_word_ends_if is not None:
            # One letter is another initial ("J. A. Smith"), not "a" or "I".
            ends = word in self._next_word_ends_if and not (len(word) == 1 and ch == ".")
        else:
            ends = word not in self._next_word_ends_unless
        if ends:
            self._emit(self._cand_end)
        self._scan_text(ch, pos)

    def _is_false_end(self, next_ch: str) -> bool:
        """Whether the candidate ". X" is an abbreviation, initial or list marker."""
        if self._cand_list_marker:
            return True
        token = self._cand_token
        if not self._cand_single_dot or not token:
            return False
        key = token.lower()
        if key in _ABBREVIATIONS:
            return True
        if key in _SUFFIX_ABBREVIATIONS:
            return not next_ch.isupper()
        if next_ch.isdigit() and key in _NUMBER_ABBREVIATIONS:
            return True
        if len(token) == 1 and token.isupper():
            return True  # an initial: "J. Smith"
        parts = key.split(".")
        is_initialism = len(parts) > 1 and all(len(p) == 1 and p.isalpha() for p in parts)
        return is_initialism and key not in _CLAUSE_FINAL_DOTTED

    # -- words and run-ons ---------------------------------------------------

    def _track_words(self, ch: str, pos: int) -> None:
        if ch.isspace():
            if self._in_word:
                self._finish_word(pos)
                self._in_word = False
        elif not self._in_word:
            self._in_word = True
            self._word_start = pos
            self._word_starts.append(pos)

    def _finish_word(self, end: int) -> None:
        word = self._text(self._word_start, end)
        bare = word.rstrip("".join(_CLOSERS))
        self._after_colon = bare.endswith(":")
        if bare.endswith(_CLAUSE_PUNCTUATION) or bare.endswith(_DASHES):
            self._clause_cuts.append(end)  # cut after "word," / "word —"
        elif word.strip(string.punctuation).lower() in _CONJUNCTIONS:
            self._clause_cuts.append(self._word_start)  # cut before "and ..."

    def _cut_run_on(self) -> None:
        # The first word over the cap has just started; cut no later than it.
        cap = self._word_starts[self.max_words]
        cut = cap
        for candidate in reversed(self._clause_cuts):
            words_before = bisect.bisect_left(self._word_starts, candidate)
            if candidate <= cap and words_before >= _MIN_CLAUSE_WORDS:
                cut = candidate
                break
        self._emit(cut, force=True)

    def _cut_overlong(self, end: int) -> None:
        # Before the last word if there are several, else after the last
        # hyphen, slash or underscore, else right here.
        # (A word start after a space: the rest of a word cut here before
        # is no word of its own.)
        # (A word with only spaces before it, the segment's first after a
        # sentence end, is no place to cut: nothing would be emitted.)
        later_words = [w for w in self._word_starts if w > self._seg_start and self._text(w - 1, w).isspace()]
        if later_words and self._text(self._seg_start, later_words[-1]).strip():
            self._emit(later_words[-1], force=True)
            return
        if later_words:
            # Only whitespace before the last word: dropped, the word not cut
            # ("N" and "ext one here." after a run of spaces).
            self._advance(later_words[-1])
            return
        text = self._text(self._seg_start, end)
        breaks = [i for i, c in enumerate(text) if c in _LONG_WORD_BREAKS]
        self._emit(self._seg_start + breaks[-1] + 1 if breaks else end, force=True)

    def _cut_first_clause(self) -> None:
        # Only the newest boundary can newly qualify: the earlier ones were
        # checked when they were found, with the same words before them.
        cut = self._clause_cuts[-1]
        if bisect.bisect_left(self._word_starts, cut) >= self.first_clause_words:
            self._emit(cut, force=True)
            self.clause_cut = True

    def _emit(self, end: int, *, force: bool = False) -> None:
        """Emit the pending text up to ``end`` as one sentence, unless too short."""
        sentence = self._text(self._seg_start, end).strip()
        if not sentence and end > self._seg_start:
            # Only whitespace: nothing to say, and nothing to look at again.
            # Left pending, every later character past max_chars (and every
            # newline) scanned the whole run once more: a cost growing with
            # the square of the run, on the shared loop.
            self._advance(end)
            return
        if not sentence or (len(sentence) < self.min_chars and not force):
            return  # stays pending and joins the next sentence
        self._out.append(sentence)
        self._emitted_any = True
        self._advance(end)

    def _advance(self, end: int) -> None:
        """The pending text starts at ``end`` now."""
        self._seg_start = end
        # Keep only the word bookkeeping of the text after the cut.
        self._word_starts = [w for w in self._word_starts if w >= end]
        self._clause_cuts = [c for c in self._clause_cuts if c > end]
        if self._in_word and self._word_start < end:
            self._in_word = False  # CJK: the next character starts a new word
        if not self._word_starts:
            self._after_colon = False  # nothing before the next word any more


def _can_start_sentence(ch: str) -> bool:
    # Capitals, uncased scripts (CJK), numbers and prices start sentences;
    # a lowercase letter after "etc. " or "Well... " does not.
    return ch.isdigit() or ch in _CURRENCY or (ch.isalpha() and not ch.islower())
