"""Per-call limits a transport enforces on its websocket: idle timeout,
maximum call length, slow-reader protection on the send side, and server-initiated ends (drain).

A :class:`CallGuard` wraps one call's connection. The transport calls
:meth:`CallGuard.touch` for every frame it receives and sends through
:meth:`CallGuard.send`. When the guard decides the call must end (idle,
stuck reader, server shutdown) it cancels the transport's handler task and
records why in :attr:`CallGuard.end`; the transport catches that
cancellation, releases the call and closes with :meth:`CallGuard.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

from streaming.addresses import refusal_bytes
from streaming.rate import KeyedBuckets, TokenBucket

if TYPE_CHECKING:
    from streaming.addresses import ConnectionSlot

log = logging.getLogger(__name__)

# Close codes (RFC 6455) the server uses when it ends a call itself.
CLOSE_NORMAL = 1000  # idle timeout: the call simply ended
CLOSE_GOING_AWAY = 1001  # server draining / shutting down
CLOSE_POLICY = 1008  # client broke a limit (stopped reading)
CLOSE_INTERNAL = 1011


# RFC 6455: a close frame's payload is at most 125 bytes, two of them the code.
MAX_CLOSE_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame holds, on a character boundary.
    A refusal's reason may quote the peer's own value (a codec name), and
    websockets raises on a longer one instead of closing."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


@dataclass
class CallLimits:
    # A call that sends no frame for this long is closed (1000, "idle timeout").
    # Phone audio arrives every 20 ms, so a silent socket is a dead caller.
    idle_timeout_s: float = 60.0
    # A call is ended after this long however busy it is (0: no limit), so
    # a line left open (a stuck IVR, a bot calling a bot) cannot hold a slot
    # for good. 4 h is Twilio's own default call time limit.
    max_call_s: float = 4 * 3600.0
    # One outbound frame may wait this long for the client to read; after
    # that the client is stuck and the call is dropped (1008). Without it a
    # reply task would block on a full socket forever, holding an LLM slot.
    send_timeout_s: float = 5.0
    # websockets' outbound buffer high-water mark per connection: the most
    # server memory a non-reading client can pin (plus one frame).
    write_limit: int = 256 * 1024
    # On SIGTERM live calls get this long to finish before a 1001 close.
    drain_timeout_s: float = 30.0
    # Bound on the close handshake with a peer that may never answer.
    close_timeout_s: float = 2.0
    # A call must start (its start message; AudioSocket: its first audio)
    # within this long of the connection, or it is ended (1008 "no start";
    # 0: no deadline). Messages before the start kept the idle clock going:
    # a connection sending a "connected" event a minute held a call slot,
    # without any credential a start is checked for (--carrier-secret),
    # for the whole --max-call-s. Carriers start within a second.
    start_timeout_s: float = 10.0
    # Bound on the opening handshake (websockets' default is 10 s): a peer
    # that connects and sends no upgrade holds a socket, and a slot of its
    # source's connection cap, this long.
    open_timeout_s: float = 5.0
    # Audio may arrive at most this many times faster than real time, averaged
    # over audio_rate_window_s (a burst of multiple x window seconds of audio
    # is fine); 0: no limit. Excess frames are dropped with an error; a call
    # that keeps it up is closed (1008). voice/call/audio_budget.py.
    # 3x: a phone line sends at 1x; the rest is for a client catching up
    # (15 s of audio at once fits). benchmarks/hostile.py measured 8x: a call
    # speaking just under it tripled the others' TTFS p95.
    audio_rate_multiple: float = 3.0
    audio_rate_window_s: float = 5.0
    # And at most this multiple sustained over this window (0: no sustained
    # limit): a client that keeps feeding audio well past real time is an
    # endless talker, not a line catching up (benchmarks/hostile.py).
    audio_rate_sustained_multiple: float = 1.5
    audio_rate_sustained_window_s: float = 20.0
    # A call whose audio intake (decayed over ~5 s) is over this many times
    # real time is served after the real-time calls: its ASR jobs queue behind
    # theirs and its turns wait for theirs (streaming/fair_share.py). 0: off.
    low_priority_multiple: float = 1.5
    # An address whose call was ended for abuse (audio flood, not reading)
    # gets no new call for this long (HTTP 429): otherwise each reconnect
    # starts with a full audio budget. 0: off. Exempt addresses are exempt.
    abuse_cooldown_s: float = 60.0
    # Malformed or refused messages a call may send (each is answered with an
    # error or logged): this many at once, this many more a second. Past it
    # the call is closed (1008) and its address cooled down: a client sending
    # garbage as fast as it can kept the event loop busy for everyone.
    malformed_burst: int = 50
    malformed_per_s: float = 5.0
    # Valid messages other than audio (Realtime text items, session.update,
    # buffer clears, marks, DTMF): this many at once, this many more a
    # second. Past it each is refused as above (rate_limit_exceeded) and
    # counts toward the malformed allowance: valid events sent as fast as a
    # client can each cost the shared loop a parse, a change of the
    # conversation and an answer. Audio has its own budget.
    control_burst: int = 200
    control_per_s: float = 50.0


@dataclass(frozen=True)
class CallEnd:
    """Why the server ended a call: protocol reason, close code, close text."""

    reason: str
    code: int
    text: str


IDLE = CallEnd("idle_timeout", CLOSE_NORMAL, "idle timeout")
SLOW_READER = CallEnd("slow_reader", CLOSE_POLICY, "client not reading")
SHUTDOWN = CallEnd("server_shutdown", CLOSE_GOING_AWAY, "server shutting down")
AUDIO_FLOOD = CallEnd("audio_rate_exceeded", CLOSE_POLICY, "audio faster than real time")
MALFORMED_FLOOD = CallEnd("malformed_flood", CLOSE_POLICY, "too many malformed messages")
MAX_CALL_LENGTH = CallEnd("max_call_length", CLOSE_NORMAL, "call too long")
NO_START = CallEnd("no_start", CLOSE_POLICY, "the call did not start")
# The call re-attached on another connection, which now owns its conversation.
SUPERSEDED = CallEnd("call_reattached", CLOSE_NORMAL, "call re-attached on another connection")

# Connection -> its guard, so the server can end guarded calls the transport's
# way (farewell event, then close) and fall back to a bare close otherwise.
_guards: weakref.WeakKeyDictionary[ServerConnection, CallGuard] = weakref.WeakKeyDictionary()


def guard_of(ws: ServerConnection) -> CallGuard | None:
    return _guards.get(ws)


# Connection -> the source its allowances are kept under (the address the
# per-address cap counts) and the server's table of them, set at admission;
# none for an exempt source, whose connections carry many callers.
PerSource = Callable[[str, float, float], KeyedBuckets]  # (name, burst, per_s) -> that allowance's table
_sources: weakref.WeakKeyDictionary[ServerConnection, tuple[str, PerSource]] = weakref.WeakKeyDictionary()


def bind_source(ws: ServerConnection, source: str | None, per_source: PerSource) -> None:
    if source is not None:
        _sources[ws] = (source, per_source)


def source_allowance(ws: ServerConnection | None, name: str, burst: float, per_s: float) -> TokenBucket:
    """The allowance ``name`` of ``ws``'s source, shared by all its
    connections; one of the connection's own where there is no source to
    keep it under (exempt, or not through the server's door)."""
    bound = _sources.get(ws) if ws is not None else None
    if bound is None:
        return TokenBucket(burst, per_s)
    source, per_source = bound
    return per_source(name, burst, per_s).bucket(source)


class CallWatch:
    """Idle timeout and server-initiated ends for one call on any listener
    (the websocket guard below, AudioSocket's TCP stream): the owner calls
    :meth:`touch` per message received; :meth:`finish` cancels the task that
    entered the watch and records why in :attr:`end`."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self.end: CallEnd | None = None
        self._last_rx = time.monotonic()
        self._task: asyncio.Task[object] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # Whether the call has started (set by the transport; None: it starts
        # with its connection, as a Realtime session does).
        self.has_started: Callable[[], bool] | None = None
        # Set by the transport when it refused the call after admission (a
        # wrong carrier secret, an audio format it cannot take): (reason, why
        # with caller data redacted). The registry counts and logs it as it does
        # refusals at the door, at most once a minute per address at WARNING.
        self.refused: tuple[str, str] | None = None

    async def __aenter__(self) -> CallWatch:
        self._task = asyncio.current_task()
        self._last_rx = time.monotonic()
        deadlines = (self.limits.idle_timeout_s, self.limits.max_call_s, self.limits.start_timeout_s)
        if any(limit > 0 for limit in deadlines):
            self._watchdog = asyncio.create_task(self._watch(), name="call-watchdog")
        if self.end is not None and self._task is not None:
            # Ended (a drain) before the handler got here: do not start the call.
            self._task.cancel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # From here on the handler is releasing the call: never cancel it again.
        self._task = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    def touch(self) -> None:
        self._last_rx = time.monotonic()

    def finish(self, end: CallEnd) -> None:
        """End the call from outside the transport's read loop (idempotent)."""
        if self.end is not None:
            return
        self.end = end
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def ended_by_guard(self) -> bool:
        """Call from the transport's ``except CancelledError``: True when the
        cancellation was this guard's (swallow it), False for a real one."""
        task = asyncio.current_task()
        if self.end is None or task is None:
            return False
        task.uncancel()
        return True

    async def _watch(self) -> None:
        idle, longest = self.limits.idle_timeout_s, self.limits.max_call_s
        ends_at = time.monotonic() + longest if longest > 0 else float("inf")
        start_by = self.limits.start_timeout_s
        starts_by = time.monotonic() + start_by if start_by > 0 and self.has_started is not None else float("inf")
        while True:
            now = time.monotonic()
            if starts_by <= now:
                assert self.has_started is not None
                if not self.has_started():
                    log.info("no start %.0f s after the connection: closing it", start_by)
                    self.finish(NO_START)
                    return
                starts_by = float("inf")
            idle_at = self._last_rx + idle if idle > 0 else float("inf")
            if idle_at <= now:
                log.info("no frame for %.0f s: closing the call", idle)
                self.finish(IDLE)
                return
            if ends_at <= now:
                log.info("call longer than %.0f s: closing it", longest)
                self.finish(MAX_CALL_LENGTH)
                return
            await asyncio.sleep(min(idle_at, ends_at, starts_by) - now)


class CallGuard(CallWatch):
    """A :class:`CallWatch` on a websocket, plus slow-reader protection on
    the send side and a bounded close handshake."""

    def __init__(self, ws: ServerConnection, limits: CallLimits) -> None:
        super().__init__(limits)
        self.ws = ws
        _guards[ws] = self

    async def send(self, text: str | bytes) -> bool:
        """Send one frame; False when it was not sent (call over or client stuck)."""
        if self.end is SLOW_READER:
            return False  # nothing more goes into a buffer nobody drains
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow
            # a cancel that lands as the send completes, and the playout task
            # sending here would then outlive its call.
            async with asyncio.timeout(self.limits.send_timeout_s):
                await self.ws.send(text)
        except TimeoutError:
            log.warning("client not reading for %.1f s: dropping the call", self.limits.send_timeout_s)
            if self.end is None:
                # Cancels the handler (at its next await when it is the sender).
                self.finish(SLOW_READER)
            else:
                self.end = SLOW_READER  # already ending: just skip the farewell
            return False
        except ConnectionClosed:
            return False
        return True

    async def close(self, code: int, text: str) -> None:
        """Close handshake bounded in time: a stuck peer cannot hold the
        handler (websockets' close waits for the outbound buffer to drain)."""
        try:
            async with asyncio.timeout(self.limits.close_timeout_s):
                await self.ws.close(code, close_reason(text))
        except (TimeoutError, ConnectionClosed):
            self.ws.transport.abort()


# Pings and pongs a websocket may send: this many at once, this many more a
# second. websockets answers a ping inside its socket read, before any call
# sees it, so pings reached no message allowance: a client pinging as fast
# as it could held the event loop for as long as answering them took, and
# queued its unread pongs far past write_limit. Past it the call ends
# as a malformed flood (its address cooled down).
CONTROL_FRAME_BURST = 50
CONTROL_FRAMES_PER_S = 10.0
# Small continuation frames that do not end their message (under
# SMALL_FRAGMENT_BYTES) a websocket may send: this many at once, this many
# more a second. Only the finished message reaches a call's allowances, and
# websockets parses and joins each fragment in the shared loop: a message
# cut into thousands of empty fragments was one audio budget charge for as
# much parsing as thousands of messages. Larger fragments are bounded by the
# bytes they carry, which the audio budget counts (websocket-sharp, in
# Unity, cuts every message into 1016-byte fragments), and a message's last
# fragment by the message allowances. Past it the call ends as a malformed
# flood.
CONTINUATION_FRAME_BURST = 256
CONTINUATION_FRAMES_PER_S = 64.0
SMALL_FRAGMENT_BYTES = 512
# Unsent bytes (pongs a peer does not read) past this many times the write
# buffer's limit: the same. Replies wait for the buffer to drain; pongs do not.
UNSENT_PAST_LIMIT = 4


# What a connection past its source's cap gets before it is closed: no
# handshake is read, but a client (or the operator's curl) is told why.
TOO_MANY_CONNECTIONS = refusal_bytes(
    429,
    "Too Many Requests",
    {"reason": "connection_limit", "error": "too many connections open from one address"},
)


class FloodGuardedConnection(ServerConnection):
    """Every websocket listener's connection: counted against its source
    from accept (``gate``: the registry's connection_opened), and its pings
    and pongs are counted, a flood of them ending the call (see
    CONTROL_FRAME_BURST)."""

    def __init__(
        self, *args: Any, gate: Callable[[str | None], ConnectionSlot | None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._control_frames = TokenBucket(CONTROL_FRAME_BURST, CONTROL_FRAMES_PER_S)
        self._continuations = TokenBucket(CONTINUATION_FRAME_BURST, CONTINUATION_FRAMES_PER_S)
        self.flooded = False
        # Ends the admitted call as abuse when the flood comes before its
        # guard exists (set by the server at admission).
        self.on_flood: Callable[[], None] | None = None
        self._gate = gate
        self._slot: ConnectionSlot | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._gate is None:
            return
        peer = transport.get_extra_info("peername")
        self._slot = self._gate(str(peer[0]) if peer else None)
        if self._slot is None:
            # Nothing of it is read: its handshake waits for a request that
            # never comes and ends when the socket does.
            self.transport.pause_reading()
            self.transport.write(TOO_MANY_CONNECTIONS)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is not None:
            self._slot.close()
        super().connection_lost(exc)

    def process_event(self, event: Event) -> None:
        if not self.flooded and isinstance(event, Frame):
            if event.opcode in (Opcode.PING, Opcode.PONG) and not self._control_frames.take():
                self._flood(f"websocket pings past {CONTROL_FRAME_BURST} at once and {CONTROL_FRAMES_PER_S:g} a second")
            elif (
                event.opcode is Opcode.CONT
                and not event.fin
                and len(event.data) < SMALL_FRAGMENT_BYTES
                and not self._continuations.take()
            ):
                self._flood(
                    f"small message fragments past {CONTINUATION_FRAME_BURST} at once"
                    f" and {CONTINUATION_FRAMES_PER_S:g} a second"
                )
        super().process_event(event)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.flooded and self.transport is not None:
            limit = UNSENT_PAST_LIMIT * max(self.transport.get_write_buffer_limits()[1], 64 * 1024)
            if self.transport.get_write_buffer_size() > limit:
                self._flood(f"over {limit} bytes of pongs unread")

    def _flood(self, why: str) -> None:
        self.flooded = True
        log.warning("%s: ending the call", why)
        # Nothing more is read (or answered), and nothing queued is sent:
        # the call's end is decided here, its handler only releases it.
        self.transport.pause_reading()
        guard = guard_of(self)
        if guard is not None:
            if guard.end is None:
                guard.finish(MALFORMED_FLOOD)
        elif self.on_flood is not None:
            self.on_flood()
        self.transport.abort()
