"""What every audio-out transport shares: one call = a CallSession + a Playout.

A carrier adapter (Twilio, Telnyx, Plivo, Exotel, Vonage, Asterisk,
AudioSocket, Realtime) subclasses :class:`TelephonyCall`: it parses its wire
messages into ``begin`` / ``audio`` / ``on_mark`` / ``on_dtmf`` / ``finish``
and implements ``send_audio`` / ``send_mark`` / ``send_clear`` in its own
framing. This base turns the session's events into speech and does the
parts that must behave the same on every carrier:

* each ``response.sentence`` goes to the call's Playout at once (sentence 1
  is synthesized and sent while the LLM still writes sentence 2);
* ``speech.started`` while the reply is playing is a barge-in: drop the
  queue, send the carrier's clear, and tell the session which sentences the
  caller heard (``reply_heard``) once that turn's ``response.done`` is in;
* time to first audio per turn: last voiced audio -> first reply audio byte
  sent, i.e. the session's ``ttfs_ms`` plus the TTS+encode time measured
  here. Logged, kept in :attr:`audio_metrics`, passed to ``on_audio_metrics``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from prometheus_client import Histogram

from streaming.playout import KEEP_TURNS, UNCONFIRMED_GRACE_S, OutFormat, Playout
from streaming.rate import TokenBucket
from streaming.tts import TextToSpeech, TTSError, shared_tts
from voice.call.audio_budget import AudioFlood
from voice.call.session import CallSession
from voice.call.start import ProtocolError, Start
from voice.server.limits import AUDIO_FLOOD, MALFORMED_FLOOD, MAX_CALL_LENGTH, SUPERSEDED, CallEnd, CallWatch
from voice.server.log_format import WarningBudget, loggable
from voice.server.runtime import Runtime

log = logging.getLogger(__name__)

DTMF_DIGITS = frozenset("0123456789*#ABCD")
# When to look whether a reply is over: just past the time Playout.busy
# still counts its last, unconfirmed sentence as playing.
SETTLE_MARGIN_S = UNCONFIRMED_GRACE_S + 0.1


_ttfa: dict[int, Histogram] = {}


def ttfa_histogram(runtime: Runtime) -> Histogram:
    """firstline_ttfa_seconds{transport}, in the runtime's metrics registry."""
    registry = getattr(getattr(runtime, "metrics", None), "registry", None)
    key = id(registry)
    if key not in _ttfa:
        _ttfa[key] = Histogram(
            "firstline_ttfa_seconds",
            "Caller's speech end -> first reply audio byte sent (audio transports)",
            ["transport"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
            registry=registry,
        )
    return _ttfa[key]


# Messages a call's read loop handles in a row before it lets the event
# loop run other calls: a socket read can hold hundreds of thousands of tiny
# messages, which are handled without ever suspending.
MESSAGES_PER_YIELD = 16


async def between_messages(handled: int, ended: bool) -> None:
    """After each message of a read loop: give the loop away now and then,
    and at once when the call has been ended (its cancel lands here, not
    after the rest of the buffered messages)."""
    if ended or handled % MESSAGES_PER_YIELD == 0:
        await asyncio.sleep(0)


class CallEnded(Exception):
    """The carrier said the call is over (stop): leave the read loop."""


class CallRefused(CallEnded):
    """The call may not go on (a wrong carrier secret): leave the read loop
    and close with 1008 and a reason the carrier's logs will show."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(reason)
        self.text = text


class UnsupportedMedia(CallRefused):
    """A start whose audio format this server cannot take. Refused, not
    malformed: every media frame after a malformed start counted as
    malformed too, the flood ended the call as abuse, and the carrier's
    media server (or the PBX) then cooled down for a minute."""

    def __init__(self, text: str) -> None:
        super().__init__("unsupported_media_format", text)


# Ends the server chose for the call itself, not for its connection: the
# call is over, and a re-attach must not carry it on (Twilio re-attaches
# whenever a stream closes, however it closed; voice/call/store.py).
ENDED_BY_SERVER = frozenset(end.reason for end in (MAX_CALL_LENGTH, MALFORMED_FLOOD, AUDIO_FLOOD))


class MalformedMessage(ValueError):
    """A carrier message we cannot use: logged and ignored, the call goes on."""


# A message other than audio up to this size costs one of the call's
# allowance of them; a bigger one one more per this many characters.
CONTROL_FREE_CHARS = 16 * 1024
# What an audio message that brought no audio costs (another track, a late
# chunk): a stream started with both tracks sends the other one at 50 a
# second, which must leave room for the call's marks and DTMF (allowance:
# 50 a second), while a flood of them is still cut.
NO_AUDIO_COST = 0.25


class TooManyEvents(MalformedMessage):
    """A valid message past the call's allowance of them (CallLimits.control_*)."""

    code = "rate_limit_exceeded"


class TelephonyCall:
    transport = "telephony"
    # Does the carrier echo marks once audio has played? If not, the playout
    # clock decides what the caller heard.
    echoes_marks = True
    # Most audio we keep ahead of the carrier's playback (None: it buffers all).
    lead_s: float | None = None
    # A start the session refuses (instructions the context cannot hold,
    # bad sampling) ends the call with 1008 and why (CallRefused): a carrier
    # or a PBX has no error event to hear it on, and a call left open
    # counted every media frame after it as malformed, until the flood ended
    # it as abuse and cooled the carrier's address down. Protocols with an
    # error event (native, Realtime) report it and take another start.
    refuse_bad_start = True
    # A turn whose speech recognition failed is answered, where the call
    # speaks, with the reply policy's fallback ("Sorry, could you say that
    # again?"): a phone caller hears no error event, and silence sounds like
    # a dropped call. Realtime and the native protocol put asr_failed on
    # the wire, and their client decides.
    says_asr_failures = True
    # Called with every new call: lets tests and tooling watch calls that
    # carriers cannot show (they carry no transcript events on the wire).
    observers: ClassVar[list[Callable[[TelephonyCall], None]]] = []

    def __init__(self, runtime: Runtime, tts: TextToSpeech | None = None) -> None:
        self.runtime = runtime
        self.session = CallSession(runtime, self._on_session_event)
        self.session.on_superseded = lambda: self.end_call(SUPERSEDED)
        self.session.heard_now = self.heard_so_far
        self.call_id = self.session.call_id
        self._tts = tts
        self.playout: Playout | None = None
        self.audio_metrics: dict[int, dict[str, float]] = {}
        self._first_sentence_at: dict[int, float] = {}
        self._first_audio: dict[int, tuple[float, float]] = {}  # turn -> (monotonic, tts+encode s)
        self._ttfs_ms: dict[int, float] = {}
        # Turns that answer keys alone: timed from the last key, the keypad
        # settle included, so kept out of the TTFA histogram (as of TTFS's).
        self._keys_only: set[int] = set()
        self._done_turns: set[int] = set()
        self._heard_pending: dict[int, str] = {}
        self._settle_timer: asyncio.TimerHandle | None = None
        self.barge_ins = 0
        # The turn whose reply the caller's speech cut last, until that speech
        # turns out to hold words (or held none: go_on_after_noise).
        self._cut_by_speech: int | None = None
        self.malformed = 0
        # Malformed-input warnings: a few per call, then a summary at the end.
        self._warnings = WarningBudget()
        limits = runtime.config.limits
        self._bad_input = TokenBucket(limits.malformed_burst, limits.malformed_per_s)
        self._control = TokenBucket(limits.control_burst, limits.control_per_s)
        # Messages that reached the audio budget (WebSocketCall meters an
        # audio event that did not as a control message).
        self.audio_messages = 0
        self.audio_bytes = 0  # decoded audio, all messages
        self.finished = False
        self.ending = False  # end_for has ended the call; the end has not landed yet
        self._counted = False
        # The session's events (deltas left out), for observers; bounded.
        self.events: deque[dict[str, Any]] = deque(maxlen=256)
        for observe in self.observers:
            observe(self)

    # ---- lifecycle -----------------------------------------------------

    def end_call(self, end: CallEnd) -> None:
        """End the call from the server side for ``end`` (the transport's
        guard does it its way: farewell, close code)."""

    def note_refused(self, watch: CallWatch, refusal: CallRefused) -> None:
        """The call is refused after admission: the registry counts and logs
        it (``watch.refused``), at most once a minute per address, as a
        refusal at the door (anyone can provoke one as fast as they connect).
        The text may quote what the peer sent: quoted values are caller data,
        and so is a number no format has ("sampleRate": a card number, or
        4,000 digits); the line is cut short as a malformed message's is."""
        said = loggable(refusal.text)
        log.debug("call %s (%s): refused: %s", self.call_id, self.transport, said)
        watch.refused = (str(refusal), said)

    def note_malformed(self, exc: Exception) -> None:
        """Log an ignored message: the first few at WARNING without the
        caller's content (quoted snippets redacted), everything at DEBUG; each
        line cut short, so no message can put its bulk into the log."""
        if self._warnings.take():
            said = loggable(str(exc))
            log.warning("call %s (%s): ignored message: %s", self.call_id, self.transport, said)
        log.debug("call %s (%s): ignored message: %s", self.call_id, self.transport, str(exc)[:500])
        self.count_bad_input()

    def take_control_event(self, size: int = 0, cost: float = 1.0) -> None:
        """One valid message other than audio, of ``size`` characters;
        TooManyEvents past the call's allowance (refused, and counted like a
        malformed one). A message over CONTROL_FREE_CHARS costs one more for
        each CONTROL_FREE_CHARS: parsing it was work in proportion."""
        if not self._control.available():
            raise self._too_many()
        extra = (size - 1) // CONTROL_FREE_CHARS if size > CONTROL_FREE_CHARS else 0
        self._control.charge(cost + extra)

    def control_allowance_left(self) -> bool:
        return self._control.available()

    def _too_many(self) -> TooManyEvents:
        limits = self.runtime.config.limits
        return TooManyEvents(
            f"too many events: at most {limits.control_burst} at once, then {limits.control_per_s:g} a second"
        )

    def count_bad_input(self) -> None:
        """One malformed or refused message; past the call's allowance
        (CallLimits.malformed_burst / malformed_per_s) the call is ended."""
        self.malformed += 1
        if not self._bad_input.take():
            self.end_for(MALFORMED_FLOOD, f"{self.malformed} malformed messages")

    def end_for(self, end: CallEnd, why: str) -> None:
        """End the call for the caller's abuse: said once. The messages
        already read in the same socket read (hundreds of thousands of tiny
        ones fit in one) reach here again before the end lands; they must
        not each write a WARNING line and end the call again."""
        if self.ending or self.finished:
            return
        self.ending = True
        log.warning("call %s (%s): %s; ending the call", self.call_id, self.transport, why)
        self.end_call(end)

    def note_peer_report(self, what: str, detail: object) -> None:
        """Something the peer told us or caused (a carrier error, an error
        event): the first few at WARNING without the peer's words (quoted
        parts redacted, free text at DEBUG only), so no caller can fill the log."""
        if self._warnings.take():
            log.warning("call %s (%s): %s", self.call_id, self.transport, loggable(what))
        log.debug("call %s (%s): %s: %s", self.call_id, self.transport, what, str(detail)[:500])

    def admit(self) -> None:
        self.runtime.active_calls += 1
        self._counted = True

    async def begin(self, start: Start, out: OutFormat | None) -> None:
        """Start the session; with ``out``, speak replies in that format."""
        if self.session.started:
            raise ProtocolError("already_started", "the call has already started")
        made = None
        if out is not None and self.playout is None:
            try:
                tts = self._tts or shared_tts(getattr(self.runtime.config, "tts", None))
                await tts.warm()
                made = self.playout = Playout(tts, out, self, lead_s=self.lead_s, on_first_audio=self._first_audio_sent)
            except (TTSError, ValueError) as exc:
                # No voice is better than no call: transcripts and text still flow.
                log.error("call %s: audio out disabled: %s", self.call_id, exc)
        try:
            await self.session.start(start)
        except BaseException as exc:
            # A refused start's audio format must not speak the next start's
            # replies (a text-only retry got 16 kHz PCM frames).
            if made is not None:
                self.playout = None
                await made.close()
            if isinstance(exc, ProtocolError) and self.refuse_bad_start:
                raise CallRefused(exc.code, exc.message) from None
            raise

    async def audio(self, payload: bytes, message_s: float | None = None) -> None:
        self.audio_messages += 1
        self.audio_bytes += len(payload)
        if not self.session.started:
            raise MalformedMessage("media before start")
        try:
            await self.session.audio(payload, message_s)
        except AudioFlood as exc:
            self.end_for(AUDIO_FLOOD, exc.message)
        except ProtocolError as exc:
            raise MalformedMessage(exc.message) from None

    async def finish(self, reason: str) -> None:
        """Hang-up or lost connection: release the playout and the session."""
        if self.finished:
            return
        self.finished = True
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        summary = self._warnings.summary()
        if summary is not None:
            log.warning("call %s (%s): %s", self.call_id, self.transport, summary)
        try:
            heard: dict[int, str] = {}
            try:
                heard = self.heard_so_far()
                if self.playout is not None:
                    await self.playout.close()
            finally:
                # Stopped however the playout's close ended (a cancel landing
                # in its wait): skipped, the call's turns, its silent-line
                # filler and its engine session ran on for good.
                await self.session.stop(reason, heard, ended_by_server=reason in ENDED_BY_SERVER)
        finally:
            # Counted off whatever the release raised: a call that leaves its
            # count behind holds a --max-calls slot for the server's life.
            if self._counted:
                self.runtime.active_calls -= 1
                self._counted = False
                metrics = getattr(self.runtime, "metrics", None)
                if metrics is not None:
                    metrics.call_ended(reason)

    def heard_so_far(self) -> dict[int, str]:
        """What the caller has heard of replies not settled yet: the one
        whose audio is still going out (by its carrier's marks, or by the
        playout clock where there are none) and cuts still waiting for their
        turn to end. Asked at the end of the call and for every stored
        snapshot: a lost socket or a drain keeps the conversation for a
        re-attach, which must not believe the rest was said."""
        heard = dict(self._heard_pending)
        playout, turn = self.playout, self.playing()
        if playout is not None and turn is not None:
            heard[turn] = playout.heard_so_far(turn, by_clock=not self.echoes_marks)
        return heard

    # ---- carrier events ------------------------------------------------

    def mark_played(self, name: str) -> None:
        if self.playout is None:
            return
        confirmed = sum(s.played for s in self.playout.segments)
        if self.playout.marked(name) is None:
            log.debug("call %s: mark %r is not ours or was flushed", self.call_id, name)
            return
        if sum(s.played for s in self.playout.segments) > confirmed:  # an echo repeated changes nothing
            self.session.playout_advanced()

    def on_dtmf_digit(self, value: object) -> None:
        digit = str(value).strip().upper()
        if len(digit) != 1 or digit not in DTMF_DIGITS:
            raise MalformedMessage(f"not a DTMF digit: {digit[:8]!r}")
        if not self.session.started:
            raise MalformedMessage("DTMF before start")
        # Digits are caller data (card numbers, PINs): never above DEBUG.
        log.debug("call %s: DTMF %s", self.call_id, digit)
        self.session.dtmf(digit)

    # ---- wire hooks (subclasses) ----------------------------------------

    async def send_audio(self, chunk: bytes) -> None:
        raise NotImplementedError

    async def send_mark(self, name: str) -> None:
        """Carriers with marks send one after each sentence's audio."""

    async def send_clear(self) -> None:
        """Tell the carrier to drop the audio it has buffered."""

    async def on_session_event(self, ev: dict[str, Any]) -> None:
        """Session events after the base has acted on them (Realtime forwards them)."""

    async def on_audio_metrics(self, turn: int, metrics: dict[str, float]) -> None:
        """Time to first audio is known for ``turn``."""

    # ---- session events --------------------------------------------------

    async def _on_session_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind != "response.delta":
            self.events.append(ev)
        metrics = getattr(self.runtime, "metrics", None)
        if metrics is not None:
            metrics.observe_event(ev, low_priority=self.call_id in self.runtime.low_priority)
        if kind == "speech.started" and ev.get("barge_in", True):
            await self.barge_in()
        elif kind == "turn.empty" and self._cut_by_speech is not None:
            # The speech that cut the reply held no words: a noise.
            cut, self._cut_by_speech = self._cut_by_speech, None
            self.session.go_on_after_noise(cut)
        elif kind in ("transcript.final", "error") or (
            kind == "response.sentence" and ev.get("turn") != self._cut_by_speech
        ):
            # The caller said something, the turn failed, or another reply
            # began (not a late sentence of the reply cut).
            self._cut_by_speech = None
        if kind == "response.sentence" and self.playout is not None:
            turn = int(ev["turn"])
            self._first_sentence_at.setdefault(turn, time.monotonic())
            self.playout.say(turn, int(ev["index"]), str(ev["text"]))
        elif kind == "response.done":
            turn = int(ev["turn"])
            self._done_turns.add(turn)
            if turn in self._heard_pending:
                self.session.reply_heard(turn, self._heard_pending.pop(turn))
            if self.playout is not None:
                self.playout.then(functools.partial(self._keep_what_went_out, turn, self.playout.generation))
            self._forget_turns_before(turn - KEEP_TURNS)
            self._save_when_played()
        elif kind == "turn.metrics" and ev.get("ttfs_ms") is not None:
            self._ttfs_ms[int(ev["turn"])] = float(ev["ttfs_ms"])
            if ev.get("keys_only"):
                self._keys_only.add(int(ev["turn"]))
            await self._publish_ttfa(int(ev["turn"]))
        elif kind == "error":
            self.note_peer_report(f"error {ev.get('code')}: {ev.get('message')}", ev.get("message"))
            if ev.get("code") == "asr_failed" and isinstance(ev.get("turn"), int):
                self._say_fallback(int(ev["turn"]))
        await self.on_session_event(ev)

    async def _keep_what_went_out(self, turn: int, generation: int) -> None:
        """Every sentence of ``turn`` has been through the playout: one whose
        audio failed (the TTS could not say it, a send broke) was never
        heard, and the history the next turns are answered from drops it.
        Not after a cut (``generation`` moved on): the cut kept what was
        heard already."""
        playout = self.playout
        if playout is None or playout.generation != generation or turn not in playout.failed_turns:
            return
        log.info("call %s: turn %d's reply audio failed in part; the history keeps what went out", self.call_id, turn)
        self.heard_up_to(turn, playout.sent(turn))

    def _say_fallback(self, turn: int) -> None:
        """Speak the reply policy's fallback for a turn that has no reply (its
        speech recognition failed), where this call speaks at all."""
        line = self.session.reply_policy.fallback
        if self.says_asr_failures and self.playout is not None and line:
            self.playout.say(turn, 0, line)

    def _save_when_played(self) -> None:
        """Once the reply's audio is over (marks, else the playout clock),
        the stored state takes it whole: a snapshot taken while it played
        was cut to what had been heard so far, and a carrier without marks
        says nothing when it ends."""
        if self.finished or self.playout is None or self._settle_timer is not None:
            return

        def check() -> None:
            self._settle_timer = None
            if self.finished or self.playout is None:
                return
            if self.playing() is not None:
                self._save_when_played()
                return
            self.session.playout_advanced()

        # Past the clock's end by the margin Playout.busy keeps an unconfirmed sentence.
        delay = max(0.0, self.playout.clock_end - time.monotonic()) + SETTLE_MARGIN_S
        self._settle_timer = asyncio.get_running_loop().call_later(delay, check)

    def _forget_turns_before(self, turn: int) -> None:
        """Bounded per-turn records over a call of hours (thousands of turns)."""
        for records in (self.audio_metrics, self._first_sentence_at, self._first_audio, self._ttfs_ms,
                        self._heard_pending):  # fmt: skip
            for old in [t for t in records if t < turn]:
                del records[old]
        self._done_turns = {t for t in self._done_turns if t >= turn}
        self._keys_only = {t for t in self._keys_only if t >= turn}

    async def barge_in(self) -> None:
        """The caller talks: stop the reply's audio if any is still out there."""
        # Something the caller had not heard yet is dropped: audio still to
        # play, or a reply still being written. Not the grace an unconfirmed
        # last sentence keeps the playout busy for: a cough just after a reply
        # ended would have it "go on" with a reply heard in full.
        dropping = self.playout is not None and (self.playout.unplayed or self.session.reply_in_flight())
        cut = await self.cut_reply("barge-in")
        if cut is not None:
            self.barge_ins += 1
            self._cut_by_speech = cut if dropping else None

    def playing(self) -> int | None:
        """The turn whose reply audio is queued or (by the clock) still
        playing, if any."""
        playout = self.playout
        if playout is None or not playout.busy:
            return None
        return playout.current_turn

    async def cut_reply(self, why: str) -> int | None:
        """Stop the reply's audio (a barge-in, a client's cancel): the
        carrier's buffer is cleared and the history keeps what was heard.
        The turn cut, or None when nothing was playing."""
        playout, turn = self.playout, self.playing()
        if playout is None or turn is None:
            return None
        # An earlier reply may still be playing ahead of this one (a Realtime
        # response created once the last one's text was done, its audio
        # still going out): the clear cuts it too, and its history must say
        # so, not keep it whole.
        earlier = sorted({s.turn for s in playout.segments if not s.played and s.turn != turn})
        playout.interrupt(by_clock=not self.echoes_marks)
        await self.send_clear()
        for cut in [*earlier, turn]:
            heard = playout.heard(cut)
            log.info("call %s: %s on turn %d; caller heard %d chars", self.call_id, why, cut, len(heard))
            log.debug("call %s: turn %d heard %r", self.call_id, cut, heard)
            self.heard_up_to(cut, heard)
        return turn

    def heard_up_to(self, turn: int, heard: str) -> None:
        """The caller heard only ``heard`` of ``turn``'s reply. Before the
        turn has ended its history entry is not written yet (the session
        writes it when the reply task ends): kept until then, so a cut that
        races the turn's end still takes."""
        if turn in self._done_turns:
            self.session.reply_heard(turn, heard)
        else:
            self._heard_pending[turn] = heard

    async def _first_audio_sent(self, turn: int, tts_s: float) -> None:
        self._first_audio[turn] = (time.monotonic(), tts_s)
        await self._publish_ttfa(turn)

    async def _publish_ttfa(self, turn: int) -> None:
        if turn in self.audio_metrics or turn not in self._first_audio or turn not in self._ttfs_ms:
            return
        at, tts_s = self._first_audio[turn]
        sentence_at = self._first_sentence_at.get(turn, at)
        metrics = {
            "ttfs_ms": self._ttfs_ms[turn],
            "tts_first_audio_ms": round(tts_s * 1000, 1),
            "ttfa_ms": round(self._ttfs_ms[turn] + (at - sentence_at) * 1000, 1),
        }
        self.audio_metrics[turn] = metrics
        log.info(
            "call %s (%s) turn %d: time to first audio %.0f ms", self.call_id, self.transport, turn, metrics["ttfa_ms"]
        )
        if turn not in self._keys_only:
            ttfa_histogram(self.runtime).labels(self.transport).observe(metrics["ttfa_ms"] / 1000)
        await self.on_audio_metrics(turn, metrics)
