"""Per-call audio out: reply sentences -> TTS -> the stream's codec -> frames.

One :class:`Playout` per call. Sentences are synthesized strictly in order by
one worker task, each as soon as the LLM has finished it, so sentence 1 is
on the wire while sentence 2 is still being written. The audio goes through
a per-call :class:`StreamResampler` (no clicks at sentence edges), is encoded
in the call's codec, cut into the message size the carrier wants, and handed
to the transport's :class:`PlayoutSink`; after each sentence the sink may
send a mark so the carrier reports when it has really played.

A playout clock estimates when the far end will have played what was sent
(carriers play in real time from the moment audio arrives). It paces the
sender where a carrier's buffer is bounded (``lead_s``) and tells which
sentences were heard on carriers that echo no marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from streaming.codecs import SAMPLE_BYTES, StreamResampler, encode, float_to_int16
from streaming.tts import TextToSpeech

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

SILENCE_BYTE = {"pcm16": b"\x00", "mulaw": b"\xff", "alaw": b"\xd5"}
# TTS output is fed to the per-call resampler followed by at least this much
# silence, and more until all of it has come out (StreamResampler
# process_whole): a mark then lands after all of its sentence's audio, and a
# reply's tail does not wait in the filter to open the next reply as a click
# (at 24 -> 8 kHz a fixed 30 ms left ~20 ms of each sentence behind).
TAIL_PAD_S = 0.03
KEEP_SEGMENTS = 64
# Per-turn records kept for the newest this many turns (a call of hours has
# thousands): marks, first-audio times, what was heard, audio metrics.
KEEP_TURNS = 16
# How long past its end by the clock a sentence whose mark has not come
# back still counts as playing (a carrier's echo runs a little late).
UNCONFIRMED_GRACE_S = 1.0


@dataclass(frozen=True)
class OutFormat:
    encoding: str  # pcm16 | mulaw | alaw
    sample_rate: int
    chunk_bytes: int  # bytes per outgoing message (a multiple of the sample size)

    @classmethod
    def framed(cls, encoding: str, sample_rate: int, frame_s: float) -> OutFormat:
        """Messages of ``frame_s`` of audio each."""
        return cls(encoding, sample_rate, round(sample_rate * frame_s) * SAMPLE_BYTES[encoding])

    @property
    def sample_bytes(self) -> int:
        return SAMPLE_BYTES[self.encoding]

    @property
    def bytes_per_s(self) -> int:
        return self.sample_rate * self.sample_bytes

    def frame_bytes(self, seconds: float) -> int:
        return round(self.sample_rate * seconds) * self.sample_bytes


@dataclass
class Segment:
    """One sentence's audio as sent, on the playout clock (monotonic s)."""

    turn: int
    index: int
    text: str
    name: str
    start_s: float
    end_s: float
    played: bool = False
    sent_at: float = 0.0  # when its first frame went to the sink (monotonic s)


class PlayoutSink(Protocol):
    async def send_audio(self, chunk: bytes) -> None: ...

    async def send_mark(self, name: str) -> None: ...


FirstAudio = Callable[[int, float], Awaitable[None]]
AfterAudio = Callable[[], Awaitable[None]]


class Playout:
    def __init__(
        self,
        tts: TextToSpeech,
        fmt: OutFormat,
        sink: PlayoutSink,
        *,
        lead_s: float | None = None,
        on_first_audio: FirstAudio | None = None,
    ) -> None:
        if fmt.chunk_bytes <= 0 or fmt.chunk_bytes % fmt.sample_bytes:
            raise ValueError(f"chunk of {fmt.chunk_bytes} B is not whole {fmt.encoding} samples")
        self.tts = tts
        self.fmt = fmt
        self.sink = sink
        self.lead_s = lead_s
        self.on_first_audio = on_first_audio
        # (turn, sentence index, text, generation, callback): a callback item
        # (from then()) runs in order instead of speaking.
        self._queue: asyncio.Queue[tuple[int, int, str, int, AfterAudio | None]] = asyncio.Queue()
        self._generation = 0  # bumped by interrupt(): older queued or in-flight audio is dropped
        # The sentence being synthesized: a barge-in cancels it, so a job still
        # queued for the TTS thread every call shares never runs.
        self._synthesis: asyncio.Future[np.ndarray] | None = None
        self._resampler = StreamResampler(tts.sample_rate, fmt.sample_rate)
        self._pending = b""  # encoded bytes short of one chunk
        self._clock_end = 0.0  # when everything sent so far will have played
        self._busy = False
        # Sentences sent, for marks and what was heard: the current turn's
        # all (a greeting may have hundreds), earlier turns' KEEP_SEGMENTS.
        self.segments: deque[Segment] = deque()
        self._said_at: dict[int, float] = {}
        self._first_audio_sent: set[int] = set()
        self.current_turn: int | None = None  # the newest turn queued
        # The turn whose sentence is being sent now: a sink that labels its
        # audio with a turn (Realtime's response ids) reads this one, not
        # current_turn, which is already the next reply's once it is queued.
        self.sending_turn: int | None = None
        # The turn a barge-in or cancel cut: its later sentences are dropped,
        # not queued behind the carrier's clear (its generation stops a
        # moment later, and the sends in between may wait).
        self._cut_turn: int | None = None
        self.failed: str | None = None
        # Turns with a sentence that did not go out whole (its TTS or its
        # send failed): the caller never heard it, whatever the text says.
        self.failed_turns: set[int] = set()
        self._worker = asyncio.create_task(self._run())

    # ---- control -------------------------------------------------------

    def say(self, turn: int, index: int, text: str) -> None:
        """Queue one sentence; it plays after every sentence queued before it."""
        if turn == self._cut_turn:
            return
        if turn != self.current_turn:
            self._forget_before(turn - KEEP_TURNS)
        self._said_at.setdefault(turn, time.monotonic())
        self.current_turn = turn
        self._queue.put_nowait((turn, index, text, self._generation, None))

    def _forget_before(self, turn: int) -> None:
        """A call of hours has thousands of turns: keep the last few's records."""
        self._said_at = {t: at for t, at in self._said_at.items() if t >= turn}
        self._first_audio_sent = {t for t in self._first_audio_sent if t >= turn}
        self.failed_turns = {t for t in self.failed_turns if t >= turn}

    def then(self, callback: AfterAudio) -> None:
        """Run ``callback`` once everything queued before it has been sent
        (or flushed by a barge-in): Realtime's ``response.done`` must follow
        the response's last audio delta."""
        self._queue.put_nowait((-1, -1, "", self._generation, callback))

    def duration_s(self, turn: int) -> list[tuple[str, float]]:
        """(sentence, seconds of audio) for each sentence of ``turn`` sent
        and still known, in order."""
        return [(s.text, s.end_s - s.start_s) for s in self.segments if s.turn == turn]

    @property
    def busy(self) -> bool:
        """:attr:`unplayed`, or a sentence whose mark has not come back within
        UNCONFIRMED_GRACE_S of its end by the clock."""
        if self.unplayed:
            return True
        since = time.monotonic() - UNCONFIRMED_GRACE_S
        return any(not s.played and s.end_s > since for s in self.segments)

    @property
    def unplayed(self) -> bool:
        """Audio queued, being synthesized, or still playing by the clock:
        :attr:`busy` without the grace an unconfirmed last sentence gets (a
        cut now drops something the caller has not heard)."""
        return self._busy or not self._queue.empty() or self._clock_end > time.monotonic()

    def interrupt(self, by_clock: bool = False) -> None:
        """Barge-in: drop queued and in-flight sentences; the transport sends
        its carrier's clear. What had played is settled now, from the marks
        echoed so far or, for carriers without marks, from the playout
        clock; sentences still unplayed were flushed and are forgotten, so a
        late echo of their mark counts for nothing."""
        self._generation += 1
        self._cut_turn = self.current_turn
        if self._synthesis is not None:
            self._synthesis.cancel()
        callbacks = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item[4] is not None:
                callbacks.append(item)  # bookkeeping, not audio: keep it
        for item in callbacks:
            self._queue.put_nowait(item)
        self._pending = b""
        # Fresh filter state: the old one holds the tail of audio nobody hears.
        self._resampler = StreamResampler(self.tts.sample_rate, self.fmt.sample_rate)
        now = time.monotonic()
        if by_clock:
            for seg in self.segments:
                seg.played = seg.played or seg.end_s <= now
        kept = [s for s in self.segments if s.played]
        self.segments.clear()
        self.segments.extend(kept)
        self._clock_end = now

    @property
    def clock_end(self) -> float:
        """When (monotonic s) the audio sent so far ends, by the playout clock."""
        return self._clock_end

    def delay(self, since: float, stall: float, late: float) -> None:
        """The far end got no audio for ``stall`` s from ``since`` (a transport
        that writes on its own clock stalled and, not to burst, skipped those
        slots): what was queued before the stall plays that much later; what
        was sent after it, and the clock's end, ``late`` later (the transport
        measures it from its queue: a playout that woke first has counted
        part of the stall as played already). Without this the clock counted
        the queued audio played, paced the next sentences in on top of it
        and took it for heard."""
        if stall <= 0:
            return
        late = max(0.0, late)  # a clock already past the queue stays where it is
        for seg in self.segments:
            if seg.sent_at >= since:  # sent on a clock that counted the stall as played
                seg.start_s += late
                seg.end_s += late
            elif seg.end_s > since:
                seg.end_s += stall
                seg.start_s += stall if seg.start_s > since else 0.0
        self._clock_end += late

    def marked(self, name: str) -> Segment | None:
        """The carrier echoed a mark: that sentence (and all before it) played."""
        hit = None
        for seg in self.segments:
            if seg.name == name:
                hit = seg
                break
        if hit is None:
            return None
        for seg in self.segments:
            seg.played = True
            if seg is hit:
                break
        return hit

    @property
    def generation(self) -> int:
        """Moves on at each :meth:`interrupt`."""
        return self._generation

    def sent(self, turn: int) -> str:
        """The sentences of ``turn`` whose audio went out whole, in order."""
        return " ".join(s.text for s in self.segments if s.turn == turn)

    def heard(self, turn: int) -> str:
        """The sentences of ``turn`` the caller heard in full (after
        :meth:`interrupt`: confirmed by a mark or by the playout clock)."""
        return self.heard_so_far(turn, by_clock=False)

    def heard_so_far(self, turn: int, by_clock: bool) -> str:
        """As :meth:`heard`, without interrupting: confirmed by a mark, or
        (``by_clock``) over by the playout clock now. For a call that ends
        with its reply still going out."""
        now = time.monotonic()
        return " ".join(s.text for s in self.segments if s.turn == turn and (s.played or (by_clock and s.end_s <= now)))

    async def close(self) -> None:
        self._generation += 1
        # Cancel until it is done: a cancel can be lost inside library code
        # (3.11's wait_for swallows one that races a completed send), and a
        # worker that survives its call is a leaked task per hang-up.
        while not self._worker.done():
            self._worker.cancel()
            await asyncio.wait({self._worker}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            self._worker.result()

    # ---- worker --------------------------------------------------------

    async def _run(self) -> None:
        while True:
            turn, index, text, generation, callback = await self._queue.get()
            if callback is not None:
                try:
                    await callback()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("playout callback failed")
                continue
            if generation != self._generation:
                continue
            self._busy = True
            try:
                await self._play(turn, index, text, generation)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A TTS or send failure loses this call's audio, not the call:
                # the transcript and text reply still flow.
                self.failed = str(exc)
                self.failed_turns.add(turn)
                log.warning("playout of turn %d sentence %d failed: %s", turn, index, exc)
            finally:
                self._busy = False

    async def _play(self, turn: int, index: int, text: str, generation: int) -> None:
        # Due when the audio ahead of it runs out: now for a reply's first
        # sentence (or any whose call has gone quiet), later for one with
        # audio still playing ahead of it.
        due = max(time.monotonic(), self._clock_end)
        self._synthesis = asyncio.ensure_future(self.tts.synthesize(text, due=due))
        try:
            audio = await self._synthesis
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if generation != self._generation and task is not None and not task.cancelling():
                return  # interrupt() cancelled the sentence, not the worker
            self._synthesis.cancel()
            raise
        finally:
            self._synthesis = None
        if generation != self._generation or len(audio) == 0:
            return
        resampled = self._resampler.process_whole(audio, TAIL_PAD_S)
        data = self._pending + encode(float_to_int16(resampled), self.fmt.encoding)  # type: ignore[arg-type]
        # Whole chunks only: the remainder is padded with codec silence so the
        # mark after this sentence sits right after its last sample.
        short = -len(data) % self.fmt.chunk_bytes
        data += SILENCE_BYTE[self.fmt.encoding] * short
        self._pending = b""
        sent_at = time.monotonic()
        start = max(self._clock_end, sent_at)
        self.sending_turn = turn
        for offset in range(0, len(data), self.fmt.chunk_bytes):
            await self._pace()
            if generation != self._generation:
                return
            await self.sink.send_audio(data[offset : offset + self.fmt.chunk_bytes])
            if generation != self._generation:
                # Interrupted while the send waited (a full socket buffer):
                # the clear has gone out, so no clock, segment or mark for
                # this sentence after it (its late mark echo made it "heard").
                return
            now = time.monotonic()
            self._clock_end = max(self._clock_end, now) + self.fmt.chunk_bytes / self.fmt.bytes_per_s
            if turn not in self._first_audio_sent:
                self._forget_before(turn - KEEP_TURNS)
                self._first_audio_sent.add(turn)
                if self.on_first_audio is not None:
                    await self.on_first_audio(turn, now - self._said_at.get(turn, now))
        name = f"t{turn}s{index}"
        self.segments.append(Segment(turn, index, text, name, start, self._clock_end, sent_at=sent_at))
        while len(self.segments) > KEEP_SEGMENTS and self.segments[0].turn != turn:
            self.segments.popleft()
        await self.sink.send_mark(name)

    async def _pace(self) -> None:
        """Keep at most ``lead_s`` of audio ahead of the far end's playback."""
        if self.lead_s is None:
            return
        ahead = self._clock_end - time.monotonic() - self.lead_s
        if ahead > 0:
            await asyncio.sleep(ahead)
