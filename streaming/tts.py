"""Text to speech: the pluggable stage that turns reply sentences into audio.

:class:`TextToSpeech` is the interface every engine implements; the embedded
default is :class:`HibariTTS` (PyPI ``hibari-tts``: a Kokoro-distilled
English voice, numpy + onnxruntime, 24 kHz, its model inside the wheel, so
nothing is fetched at run time). Synthesis runs in a one-thread executor:
it is CPU work that must not stall the event loop, and one thread keeps TTS
from competing with Whisper and the LLM for more than one core.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streaming.priority_worker import PriorityWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TTSConfig:
    engine: str = "hibari"
    voice: str = "heart"  # the one hibari voice shipped in the wheel; others would be downloaded
    speed: float = 1.0
    threads: int = 1


class TTSError(RuntimeError):
    """The engine could not synthesize (not installed, bad voice, model error)."""


class TextToSpeech(Protocol):
    sample_rate: int

    async def warm(self) -> None:
        """Load and run once, so the first caller does not pay the load."""

    async def synthesize(self, text: str, due: float | None = None) -> np.ndarray:
        """Text -> mono float32 in [-1, 1] at :attr:`sample_rate`. ``due``:
        when (``time.monotonic()``) its audio is needed, the audio ahead of
        it run out (None: now); the one voice thread every call shares
        takes the sentence due soonest first."""
        ...

    def describe(self) -> dict[str, Any]: ...


# A run of more digits than this is an account, card or phone number: read
# digit by digit, as a person on the phone would. hibari reads any run as one
# number (15 sevens: 11.6 s of "seven hundred seventy-seven trillion..."),
# and fails outright from 37 digits on.
MAX_DIGITS_AS_NUMBER = 6
_LONG_DIGIT_RUN = re.compile(rf"\d{{{MAX_DIGITS_AS_NUMBER + 1},}}")
_CURRENCY = "$€£¥"
# A phone number written with dashes ("555-0100", "(415) 555-0100",
# "1-800-555-0100"): read digit by digit, a pause between groups, as on the
# phone. (hibari's own phone rule misses one right before a full stop, and
# every sentence ends in one.)
_PHONE_NUMBER = re.compile(r"(?<![\w-])(?:1-)?(?:\(\d{3}\) ?|\d{3}-)?\d{3}-\d{4}(?![\w-])")
# The same with dots ("415.555.0100": no amount has two decimal points), and
# an international number ("+44 20 7946 0958", "+1 (415) 555-0100"): read
# as they are, "four hundred fifteen point five..." or a string of amounts.
_DOTTED_PHONE = re.compile(r"(?<![\w.])(?:1\.)?\d{3}\.\d{3}\.\d{4}(?!\w|\.\d)")
_INTERNATIONAL_PHONE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]\(?\d{1,8}\)?){1,5}(?![\w-])")
# A North American number (+1) has ten digits after the 1: a number after
# them is not part of it ("+1 800 555 0100 24/7").
NANP_DIGITS = 10
# E.164: a country code and the number, at most 15 digits; fewer than 8 is
# no phone number ("+12 50").
_PHONE_DIGITS = range(8, 16)
# With spaces ("415 555 0100") it is a phone number only after a phone word
# ("Call us at 415 555 0100."): three numbers in a row may be anything.
_SPACED_PHONE = re.compile(r"(?<![\w.,])\d{3} \d{3} \d{4}(?![\w]|[.,]\d)")
# A number written with thousands separators is an amount ("1,250,000": one
# million two hundred fifty thousand) up to the trillions; past that nobody
# says it as one number, and hibari fails on 37 digits however written.
MAX_GROUPED_DIGITS = 15
_GROUPED_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+")


# A code is read digit by digit however short ("Your code is 123456", "PIN
# 4321", "zip code 94107", "card ending in 4242"): hibari reads a digit run
# as one number ("one hundred twenty-three thousand..."), which nobody says
# of a code. After a word that is always a code's, with "is", ":" or
# "number" between or nothing; after a word that may count something
# ("order", "claim", "account": "the minimum order is 250", "your claim is
# 2500") only with a marker that makes it an identifier ("order number",
# "case #", "card ending in"). Never an amount ("is 500 dollars").
_CODE_ALWAYS = r"code|pin|passcode|otp|zip|postcode|confirmation|verification|tracking|reference|extension|ext"
_CODE_IF_MARKED = r"ref|ticket|booking|reservation|account|card|order|member|membership|policy|claim|case|invoice"
_CODE_MARKER = r"(?:\s+(?:(?:number|num|id|ending in|ends in)\b|no\.)|\s*#)"
_CODE_FILLER = rf"(?:{_CODE_MARKER}|\s+is\b|\s*:)"
# Units after a number make it a quantity: a range's upper end ("200-1000
# mg"), or an amount, not a code ("order number 300 lbs" is still a weight).
_UNITS = (
    r"%|percent|mg|kg|ml|lbs?|pounds|oz|km|cm|mm|miles|feet|ft|mph|people|persons|dollars|euros|cents|usd|eur|gbp|"
    r"calories|words|pages|hours|minutes|seconds|days|weeks|months|years|times|units|items"
)
_NOT_AN_AMOUNT = rf"(?![\w-]|[.,]\d|\s*(?:{_UNITS})\b)"
_CODE_NUMBER = re.compile(
    rf"(?:\b(?:{_CODE_ALWAYS})\b\.?{_CODE_FILLER}*|\b(?:{_CODE_IF_MARKED})\b\.?{_CODE_FILLER}*{_CODE_MARKER}"
    rf"{_CODE_FILLER}*)\s*(\d{{3,{MAX_DIGITS_AS_NUMBER}}}){_NOT_AN_AMOUNT}",
    re.I,
)
# A card or account number in groups of four ("4111 1111 1111 1111",
# "4111-1111-1111-1111"): each group digit by digit, a pause between them;
# not a list of years ("in 2019 2020 2021").
_FOUR_DIGIT_GROUPS = re.compile(r"(?<![\w.,-])\d{4}(?:[ -]\d{4}){2,3}(?![\w-]|[.,]\d)")
_YEAR = re.compile(r"(?:19|20)\d\d")


def _four_digit_groups(match: re.Match[str]) -> str:
    groups = re.findall(r"\d+", match.group())
    return match.group() if all(_YEAR.fullmatch(g) for g in groups) else _read_groups(groups)


def _code_number(match: re.Match[str]) -> str:
    digits = match.group(1)
    return match.group()[: match.start(1) - match.start()] + " ".join(digits)


def _grouped(match: re.Match[str]) -> str:
    digits = match.group().replace(",", "")
    return " ".join(digits) if len(digits) > MAX_GROUPED_DIGITS else match.group()


def _digit_run(match: re.Match[str]) -> str:
    """A long run of digits, digit by digit, unless it is money: after a
    currency sign or with decimals it is an amount ("$2500000" is two and a
    half million dollars, not "two dollars, five, zero..."), up to the
    trillions, as for separators."""
    text, run = match.string, match.group()
    after = text[match.end() : match.end() + 2]
    money = (match.start() > 0 and text[match.start() - 1] in _CURRENCY) or (after[:1] == "." and after[1:].isdigit())
    return run if money and len(run) <= MAX_GROUPED_DIGITS else " ".join(run)


# A bare "ddd-dddd" is a phone number or a range. A phone word shortly
# before it makes it a phone number ("You'll get a text from 555-2123.");
# else a currency sign ("$500-1000"), "between"/"from" before it, a unit
# after it ("200-1000 mg") or a round upper end above the lower ("usually
# 500-1000") make it a range, and anything else is a phone number ("The
# front desk is 555-0142."). A second group with a leading zero is never a range.
_PHONE_CONTEXT = re.compile(r"\b(call|phone|number|dial|reach|text|fax|line|ext|extension|contact)\w*\b", re.I)
PHONE_CONTEXT_CHARS = 48
_RANGE_BEFORE = re.compile(r"\b(between|from)\s+$", re.I)
_RANGE_AFTER = re.compile(rf"^\s*({_UNITS})\b", re.I)


def _looks_like_a_range(text: str, match: re.Match[str], low: str, high: str) -> bool:
    if high.startswith("0"):
        return False
    if _PHONE_CONTEXT.search(text[max(0, match.start() - PHONE_CONTEXT_CHARS) : match.start()]):
        return False
    if _RANGE_BEFORE.search(text[max(0, match.start() - 12) : match.start()]):
        return True
    if _RANGE_AFTER.match(text[match.end() : match.end() + 16]):
        return True
    return high.endswith("00") and int(high) > int(low)


def _read_groups(groups: list[str]) -> str:
    """Digit by digit, a pause between the groups, as on the phone."""
    return ", ".join(" ".join(group) for group in groups)


def _phone_number(match: re.Match[str]) -> str:
    text, number = match.string, match.group()
    groups = re.findall(r"\d+", number)
    if match.start() > 0 and text[match.start() - 1] in _CURRENCY:
        return number  # money, whatever its shape
    if len(groups) == 2 and _looks_like_a_range(text, match, groups[0], groups[1]):
        return number
    return _read_groups(groups)


def _digit_groups(match: re.Match[str]) -> str:
    """A phone number digit by digit, a pause between its groups."""
    number, rest = match.group(), ""
    spans = list(re.finditer(r"\d+", number))
    if number.startswith("+") and spans[0].group() == "1":
        count = 0
        for at, span in enumerate(spans[1:], start=1):
            count += len(span.group())
            if count >= NANP_DIGITS:
                number, rest = number[: span.end()], number[span.end() :]
                spans = spans[: at + 1]
                break
    groups = [span.group() for span in spans]
    if number.startswith("+") and len("".join(groups)) not in _PHONE_DIGITS:
        return match.group()
    read = _read_groups(groups) + rest
    return f"plus {read}" if number.startswith("+") else read


def _spaced_phone(match: re.Match[str]) -> str:
    before = match.string[max(0, match.start() - PHONE_CONTEXT_CHARS) : match.start()]
    return _digit_groups(match) if _PHONE_CONTEXT.search(before) else match.group()


def speakable(text: str) -> str:
    """``text`` as the voice should read it: phone numbers and long digit
    runs digit by digit, amounts (separators, a currency sign, decimals) as
    amounts unless they run past the trillions."""
    text = _FOUR_DIGIT_GROUPS.sub(_four_digit_groups, text)
    text = _CODE_NUMBER.sub(_code_number, text)
    text = _INTERNATIONAL_PHONE.sub(_digit_groups, text)
    text = _DOTTED_PHONE.sub(_digit_groups, text)
    text = _SPACED_PHONE.sub(_spaced_phone, text)
    text = _PHONE_NUMBER.sub(_phone_number, text)
    return _LONG_DIGIT_RUN.sub(_digit_run, _GROUPED_NUMBER.sub(_grouped, text))


# How long a voice that failed to load (not for want of hibari) is not tried again.
LOAD_RETRY_S = 60.0


class HibariTTS:
    sample_rate = 24000

    def __init__(self, config: TTSConfig | None = None) -> None:
        self.config = config or TTSConfig()
        self._model: Any = None
        self._lock = threading.Lock()  # one load, even if two calls warm at once
        # One thread, the sentence due soonest first (streaming/priority_worker.py).
        self._executor = PriorityWorker("tts")
        self.load_s: float | None = None
        # A failed load, and until when it is not tried again: hibari not
        # installed for good; another failure (a voice hibari fetches, its
        # link down) for LOAD_RETRY_S, or every call's start tried it again,
        # one after another on the one voice thread, before its greeting.
        self._failed: TTSError | None = None
        self._failed_until = 0.0

    def _load(self) -> Any:
        with self._lock:
            if self._failed is not None and time.monotonic() < self._failed_until:
                raise self._failed
            if self._model is None:
                t0 = time.perf_counter()
                try:
                    model = self._new_model()
                except TTSError as exc:
                    if self._failed is not exc:  # not installed: set, for good
                        self._failed, self._failed_until = exc, time.monotonic() + LOAD_RETRY_S
                    raise
                self._model = model
                self.load_s = round(time.perf_counter() - t0, 3)
                log.info("hibari TTS warm in %.2f s", self.load_s)
            return self._model

    def _new_model(self) -> Any:
        try:
            from hibari import Hibari
        except ImportError as exc:
            self._failed = TTSError("hibari-tts is not installed: pip install 'firstline[tts]'")
            self._failed_until = math.inf
            raise self._failed from exc
        try:
            model = Hibari(voice=self.config.voice, threads=self.config.threads)
            # The first run allocates onnxruntime buffers and loads the
            # G2P lexicon: its failure too is a TTSError, which the
            # call survives without audio (anything else ended it).
            model("Ready.")
        except Exception as exc:  # no such voice, or one hibari could not fetch
            raise TTSError(f"cannot load hibari voice {self.config.voice!r}: {exc}") from exc
        return model

    def _synthesize(self, text: str) -> np.ndarray:
        model = self._load()
        audio = model(speakable(text), speed=self.config.speed)
        return np.asarray(audio, dtype=np.float32)

    async def warm(self) -> None:
        if self._model is not None:
            # Loaded: a new call's start must not queue behind every sentence
            # other calls have waiting on the one TTS thread.
            return
        # Ahead of every sentence: a call's start waits on it.
        await asyncio.wrap_future(self._executor.submit_due(-math.inf, self._load))

    async def synthesize(self, text: str, due: float | None = None) -> np.ndarray:
        if not text.strip():
            return np.zeros(0, dtype=np.float32)
        job = self._executor.submit_due(time.monotonic() if due is None else due, self._synthesize, text)
        return await asyncio.wrap_future(job)

    def describe(self) -> dict[str, Any]:
        return {"engine": "hibari", "voice": self.config.voice, "sample_rate": self.sample_rate}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def build_tts(config: TTSConfig) -> TextToSpeech:
    if config.engine == "hibari":
        return HibariTTS(config)
    raise TTSError(f"unknown TTS engine {config.engine!r} (use hibari)")


_shared: dict[TTSConfig, TextToSpeech] = {}


def shared_tts(config: TTSConfig | None = None) -> TextToSpeech:
    """One engine per process and config: the model is loaded once and every
    call's synthesis goes through its single worker thread, the sentence
    whose audio is needed soonest first."""
    config = config or TTSConfig()
    if config not in _shared:
        _shared[config] = build_tts(config)
    return _shared[config]
