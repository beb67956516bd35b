"""Who is served first when calls compete for the shared ASR worker and LLM.

A call that feeds audio faster than the pace of speech (an endless talker
keeping just under the audio budget, a flood's first burst, a client
catching up) is served after the calls that feed it in real time: its ASR
jobs queue behind theirs (``asr/worker.py`` asks :class:`LowPriority`), it
gets no speculative work, and its replies wait to start while one of theirs
is under way (:class:`ReplyGate`). It is never refused work, only kept out
of the others' way: alone, or beside other fast calls, it runs at full speed.

Why intake and not usage: a new connection has used nothing yet, so a usage
share cannot see a flood's first burst, which is the damage it does before
the audio budget closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

# Intake is an exponentially decayed sum of audio seconds with this time
# constant; sum / TAU is the recent rate (x real time).
INTAKE_TAU_S = 5.0
# A turn waits at most this long for a first-sentence lane (FirstSentences.lane).
LANE_MAX_WAIT_S = 2.0


class IntakeRate:
    """One call's recent audio intake, in multiples of real time. A real-time
    caller reads ~1.0 once a few seconds have gone in (less before: a call's
    first seconds never look fast)."""

    def __init__(self, tau_s: float = INTAKE_TAU_S) -> None:
        self.tau_s = tau_s
        self._sum = 0.0
        self._at = time.monotonic()

    def add(self, audio_s: float, now: float | None = None) -> float:
        """Count ``audio_s`` of audio arriving now; returns the rate."""
        now = time.monotonic() if now is None else now
        self._sum = self._sum * math.exp(-max(0.0, now - self._at) / self.tau_s) + audio_s
        self._at = now
        return self._sum / self.tau_s


class LowPriority:
    """The calls served last right now (their intake is over ``fast_multiple``
    x real time). Shared by the ASR worker and the reply gate; updated by
    each call as its audio arrives."""

    def __init__(self, fast_multiple: float = 1.5) -> None:
        self.fast_multiple = fast_multiple  # 0: nobody is ever served last
        self._calls: set[str] = set()
        self.marked_total = 0  # times a call turned low-priority
        self.on_mark: Callable[[], None] | None = None  # the server's metrics

    def update(self, call_id: str, rate: float) -> None:
        if not self.fast_multiple:
            return
        if rate > self.fast_multiple:
            if call_id not in self._calls:
                self._calls.add(call_id)
                self.marked_total += 1
                if self.on_mark is not None:
                    self.on_mark()
        else:
            self._calls.discard(call_id)

    def forget(self, call_id: str) -> None:
        self._calls.discard(call_id)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._calls


class ReplyGate:
    """Keeps low-priority calls' turns from starting while a real-time
    call's turn (from its final decode to its last generated token) is under
    way. A generation in progress cannot be pre-empted, so the only way to
    keep an endless talker out of a caller's first sentence is not to start
    it then. The wait is bounded (``max_wait_s``): a low-priority call is
    served late, never starved."""

    def __init__(self, low: LowPriority, max_wait_s: float = 3.0) -> None:
        self.low = low
        self.max_wait_s = max_wait_s
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.waits = 0  # low-priority turns that had to wait
        self.on_wait: Callable[[], None] | None = None  # the server's metrics

    @property
    def busy(self) -> int:
        return self._busy

    @contextlib.asynccontextmanager
    async def turn(self, call_id: str) -> AsyncIterator[None]:
        if call_id in self.low:
            if self._busy:
                self.waits += 1
                if self.on_wait is not None:
                    self.on_wait()
                # asyncio.timeout, not wait_for: 3.11's wait_for loses a
                # cancel that lands as the wait completes, and an aborted
                # turn would then live on (holding the gate for every call).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.max_wait_s):
                        await self._idle.wait()
            yield
            return
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()


class FirstSentences:
    """Which turns are waiting for their first reply sentence (from their
    final decode until it exists), so a reply whose first sentence is already
    out can step aside for them (llm/yielding.py).

    Why: every turn's TTFS ends at its first sentence; a reply's later
    sentences are only needed once the caller has heard the earlier ones
    (seconds of speech). On a shared engine every sequence decoding in the
    same step slows the others, and the decoder shares the cores, so a
    second sentence generated while another call waits for its first costs
    that call time and buys its own caller nothing.

    The same holds between first sentences: with ``lanes`` set
    (``--first-sentence-lanes``), only that many replies generate their
    first sentence at once and the others wait their turn (:meth:`lane`)."""

    def __init__(self, lanes: int = 0, lane_max_wait_s: float = LANE_MAX_WAIT_S) -> None:
        self._waiting: set[object] = set()
        self._clear = asyncio.Event()
        self._clear.set()
        self.yields = 0  # replies that stepped aside
        self.on_yield: Callable[[], None] | None = None  # the server's metrics
        # How many first sentences generate at once (0: no limit); see lane().
        self.lanes = lanes
        self.lane_max_wait_s = lane_max_wait_s
        self._holders: set[object] = set()
        self._queue: list[_LaneWaiter] = []
        self._seq = itertools.count()
        self.lane_waits = 0  # generations that had to wait for a lane
        self.lane_timeouts = 0  # ... and went ahead after lane_max_wait_s

    def waiting(self, key: object) -> None:
        self._waiting.add(key)
        self._clear.clear()

    def done(self, key: object) -> None:
        """``key``'s first sentence is out, or its turn ended without one."""
        self._waiting.discard(key)
        if not self._waiting:
            self._clear.set()
        self.leave(key)

    @property
    def any_waiting(self) -> bool:
        return bool(self._waiting)

    async def step_aside(self, max_wait_s: float) -> None:
        """Wait until no turn waits for its first sentence, at most
        ``max_wait_s`` (a later sentence comes late, never not at all).
        The caller's own turn must be :meth:`done` already."""
        if not self._waiting:
            return
        self.yields += 1
        if self.on_yield is not None:
            self.on_yield()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait_s):  # not wait_for: see ReplyGate.turn
                await self._clear.wait()

    async def lane(self, key: object, urgent: Callable[[], bool]) -> float:
        """Wait for a lane to generate ``key``'s first sentence in; returns
        the seconds waited. :meth:`leave` gives the lane back (at the first
        sentence, or when the generation ends without one); call it also
        when this wait is cancelled, as a lane may have been granted.

        Why: on this CPU a llama.cpp step costs each sequence in it about
        what it costs alone, so two first sentences generated side by side
        both arrive when the second would have arrived one after the other
        (``benchmarks/results/first_sentence_lanes.json``). With one lane the
        turn that is ready first is answered first, and the next one starts
        on free cores. The next lane goes to a turn whose endpoint has fired
        (``urgent()``) before a preemptive one, then in arrival order. A
        generation in progress is never stopped for a waiter, so a waiter
        goes ahead after ``lane_max_wait_s`` (a holder stuck on a slow
        transport must not hold every call's reply)."""
        if not self.lanes:
            return 0.0
        if len(self._holders) < self.lanes and not self._queue:
            self._holders.add(key)
            return 0.0
        started = time.monotonic()
        waiter = _LaneWaiter(next(self._seq), key, urgent, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self.lane_waits += 1
        try:
            async with asyncio.timeout(self.lane_max_wait_s):  # not wait_for: see ReplyGate.turn
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            self.lane_timeouts += 1
            self._holders.add(key)  # goes ahead: counted as a holder until it leaves
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)
            if not waiter.granted.done():
                waiter.granted.cancel()
        return time.monotonic() - started

    def leave(self, key: object) -> None:
        """``key`` no longer needs its lane (idempotent)."""
        if key in self._holders:
            self._holders.discard(key)
            self._grant()

    @property
    def lanes_busy(self) -> int:
        return len(self._holders)

    def holds_lane(self, key: object) -> bool:
        return key in self._holders

    @property
    def endpointed_turn_waits(self) -> bool:
        """A turn whose endpoint fired waits for a lane: a preemptive
        generation holding one should step aside for it (voice/call/turn.py)."""
        return any(w.urgent() for w in self._queue if not w.granted.done())

    def _grant(self) -> None:
        while self._queue and len(self._holders) < self.lanes:
            best = min(self._queue, key=lambda w: (not w.urgent(), w.seq))
            self._queue.remove(best)
            if best.granted.done():
                continue
            self._holders.add(best.key)
            best.granted.set_result(None)


@dataclass(eq=False)
class _LaneWaiter:
    seq: int
    key: object
    urgent: Callable[[], bool]
    granted: asyncio.Future[None]
