"""The websocket side of the carrier transports, shared by the JSON-media
family (Twilio, Telnyx, Plivo, Exotel) and by Vonage's binary variant.

:meth:`WebSocketCall.serve` owns one connection: it dispatches text frames
by their ``event`` field to ``on_<event>`` handlers, binary frames to
``on_binary``, and turns any malformed or unknown message into a log line
(what the carriers themselves do: Twilio logs warnings 31950/31951 and goes
on). What a carrier sends ends the call only as its own stop or close, or
as a refusal (:class:`CallRefused`: a wrong carrier secret, a media format
the server cannot take), closed 1008 with the reason; a bug in one call
ends that call only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streaming.shown import shown_value
from voice.server.limits import CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_POLICY, CallEnd, CallGuard
from voice.transports.telephony import (
    CONTROL_FREE_CHARS,
    NO_AUDIO_COST,
    CallEnded,
    CallRefused,
    MalformedMessage,
    TelephonyCall,
    between_messages,
)

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]


# One JSON text frame from a client: generous for any real message.
MAX_TEXT_FRAME = 64 * 1024


def query_param(path: str, key: str) -> str | None:
    """One query-string value of a request path (percent-decoded, bounded)."""
    values = parse_qs(path.partition("?")[2]).get(key)
    return values[0][:128] if values else None


def header_values(request: Any, name: str) -> list[str]:
    """Every comma-separated value of a request header, however many times
    it was sent (a header sent twice is read, not a crash)."""
    values = request.headers.get_all(name) if request is not None else []
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def b64decode(value: object, what: str = "payload") -> bytes:
    if not isinstance(value, str):
        raise MalformedMessage(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessage(f"{what} is not valid base64") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    """``msg[key]`` that must be an object."""
    value = msg.get(key)
    if not isinstance(value, dict):
        raise MalformedMessage(f"'{key}' missing or not an object")
    return value


def optional_obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    """``msg[key]`` that may be absent (``{}``) but, when there, must be an
    object: a list or a string there is the caller's error, not a crash."""
    value = msg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedMessage(f"{key} is not an object")  # unquoted: a WARNING shows it
    return value


def as_int(value: object, what: str) -> int:
    """Carriers send numbers as ints or as strings ("8000", "42")."""
    if isinstance(value, bool):
        raise MalformedMessage(f"{what} is not a number")
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise MalformedMessage(f"{what} is not a number: {shown_value(value)}") from None


class WebSocketCall(TelephonyCall):
    # Messages a carrier may send that need no action.
    ignored_events: frozenset[str] = frozenset()
    # Messages outside the allowance of other messages (CallLimits.control_*):
    # audio, which has its own budget, and the hang-up, which always counts.
    unmetered_events: frozenset[str] = frozenset({"media", "stop"})
    # The JSON field that names a message ("event" for carriers, "type" for Realtime).
    dispatch_key = "event"
    last_message: dict[str, Any] | None = None

    def __init__(self, ws: ServerConnection, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws = ws
        # Idle timeout, slow-reader protection and drain, as on the native
        # protocol: a carrier that stops reading cannot pin memory or stall
        # the reply task, and a silent socket is a dead call.
        # (No socket: a parser exercised on its own, as the fuzz tests do.)
        self.guard = CallGuard(ws, self.runtime.config.limits) if ws is not None else None
        if self.guard is not None and self.starts_with_message:
            self.guard.has_started = lambda: self.session.started  # CallLimits.start_timeout_s

    @classmethod
    async def handle(cls, ws: ServerConnection, runtime: Any) -> None:
        """The WS_ROUTES entry point."""
        await cls(ws, runtime).serve()

    # Why the call ended when the peer just closed the socket.
    closed_reason = "carrier_closed"
    # The call starts with a start message (CallLimits.start_timeout_s), not
    # with its connection (a Realtime session).
    starts_with_message = True

    async def serve(self) -> None:
        reason = self.closed_reason
        refused: CallRefused | None = None
        guard = self.guard
        assert guard is not None, "serve() needs a connection"
        try:
            # Inside: a failure or cancel while opening (a Realtime re-attach's
            # store round trips) still releases the call and its count.
            self.admit()
            await self.on_open()
            async with guard:
                handled = 0
                async for frame in self.ws:
                    bad_before = self.malformed
                    try:
                        if isinstance(frame, bytes):
                            await self.on_binary(frame)
                        else:
                            await self.on_text(frame)
                    except MalformedMessage as exc:
                        self.note_malformed(exc)
                        await self.on_malformed(exc)
                    if self.malformed == bad_before:
                        # Only a message that was used (not one refused or
                        # malformed) keeps the call from idling out: one bad
                        # message a minute held a slot for --max-call-s.
                        guard.touch()
                    handled += 1
                    await between_messages(handled, guard.end is not None)
        except CallRefused as refusal:
            self.note_refused(guard, refusal)
            reason, refused = str(refusal), refusal
        except CallEnded as end:
            reason = str(end) or "carrier_stop"
        except ConnectionClosed:
            reason = "connection_lost"
        except asyncio.CancelledError:
            # The guard ended the call (idle, stuck reader, drain); any other
            # cancellation is real and goes on up.
            if not guard.ended_by_guard():
                raise
            assert guard.end is not None
            reason = guard.end.reason
        except Exception:
            log.exception("call %s (%s) failed", self.call_id, self.transport)
            reason = "internal_error"
            await self.on_internal_error()
        finally:
            await self.finish(reason)
        await self.on_ended(reason)
        if refused is not None:
            await guard.close(CLOSE_POLICY, refused.text)
        elif guard.end is not None:
            await guard.close(guard.end.code, guard.end.text)
        else:
            await guard.close(CLOSE_NORMAL if reason != "internal_error" else CLOSE_INTERNAL, "")

    def end_call(self, end: CallEnd) -> None:
        if self.guard is not None:
            self.guard.finish(end)

    async def on_open(self) -> None:
        """The connection is up, before the first frame (Realtime greets here)."""

    async def on_malformed(self, exc: MalformedMessage) -> None:
        """A message was ignored; protocols with an error event send it here."""

    async def on_internal_error(self) -> None:
        """A bug ended this call; protocols with an error event say so here."""

    async def on_ended(self, reason: str) -> None:
        """The call is released, the socket still open (a farewell event)."""

    async def on_text(self, frame: str) -> None:
        # Until this frame parses, an error names no client event (not the
        # last good one's).
        self.last_message = None
        if len(frame) > MAX_TEXT_FRAME * 16:  # carriers send ~100 ms of audio per message; 1 MiB is abuse
            raise MalformedMessage(f"text frame of {len(frame)} chars")
        if len(frame) > MAX_TEXT_FRAME and not self.control_allowance_left():
            # Parsing it is the cost: a caller over its allowance (big
            # messages charge it by size) gets big frames refused unread.
            raise MalformedMessage(f"text frame of {len(frame)} chars while over the message allowance")
        try:
            msg = json.loads(frame)
        except (ValueError, RecursionError):  # ValueError: json's bare one for 4300+ digit ints
            raise MalformedMessage(f"not JSON: {frame[:40]!r}") from None
        if not isinstance(msg, dict):
            raise MalformedMessage("not a JSON object")
        self.last_message = msg
        event = msg.get(self.dispatch_key)
        if not isinstance(event, str):
            raise MalformedMessage(f"no string {self.dispatch_key!r}")
        handler = self.handler_for(event)
        if handler is None:
            if event not in self.ignored_events:
                raise MalformedMessage(f"unknown event {event[:40]!r}")
            self.take_control_event(len(frame))  # no action, but a message all the same
            return
        metered = event not in self.unmetered_events
        if metered:
            self.take_control_event(len(frame))
        audio_before, bytes_before = self.audio_messages, self.audio_bytes
        try:
            await handler(msg)
        except (KeyError, TypeError, ValueError, ArithmeticError, RecursionError) as exc:
            # ArithmeticError: a number JSON allows that float() cannot hold
            # (a 400-digit integer) must be a bad message, not a dead call;
            # RecursionError: a value nested just shallow enough to parse,
            # walked (or shown) deeper by a check.
            if isinstance(exc, MalformedMessage):
                raise
            shown = type(exc).__name__ if isinstance(exc, RecursionError) else repr(exc)
            raise MalformedMessage(f"bad {event!r}: {shown}") from None
        if not metered and self.audio_messages == audio_before:
            # An audio event that brought no audio (another track, a late
            # chunk, an empty payload) reached no audio budget: a message
            # other than audio, by its size. (The hang-up never gets here.)
            self.take_control_event(len(frame), cost=NO_AUDIO_COST)
        elif not metered:
            # The audio budget pays for the audio; the rest of the frame
            # (any other field, padded to a megabyte) is parsing work it does
            # not see: charged like a message of that size beyond its first
            # CONTROL_FREE_CHARS. base64: 4 characters per 3 bytes.
            rest = len(frame) - 4 * -(-(self.audio_bytes - bytes_before) // 3)
            if rest > CONTROL_FREE_CHARS:
                self.take_control_event(rest, cost=0.0)

    def handler_for(self, event: str) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
        """The handler of a message type: ``on_<type>`` (``.`` and ``:`` as
        ``_``), never one of the call's own lifecycle hooks (``on_ended``,
        ``on_session_event``, …): the peer names the event, so it must not be
        able to call those."""
        name = "on_" + event.replace(":", "_").replace(".", "_")
        if name in LIFECYCLE_HOOKS:
            return None
        return getattr(self, name, None)

    async def on_binary(self, frame: bytes) -> None:
        self.last_message = None
        raise MalformedMessage(f"binary frame of {len(frame)} B on a JSON-only protocol")

    # ---- sending ------------------------------------------------------

    async def send_json(self, msg: dict[str, Any]) -> None:
        await self.send_frame(json.dumps(msg, separators=(",", ":")))

    async def send_frame(self, frame: str | bytes) -> None:
        # A failed send means the carrier is gone (the read loop sees the
        # close and finish() releases the call) or stuck (the guard ends it).
        if self.guard is not None:
            await self.guard.send(frame)

    async def close(self, code: int = CLOSE_NORMAL, text: str = "") -> None:
        """End the call from the server side (shutdown, limits, an operator):
        the close handshake ends the read loop and finish() releases the call."""
        if self.guard is not None:
            await self.guard.close(code, text)


# The base classes' own ``on_*`` methods: hooks the read loop and the session
# call, not messages a peer may send.
LIFECYCLE_HOOKS = frozenset(name for name in dir(WebSocketCall) if name.startswith("on_"))


class MarkStyleCall(WebSocketCall):
    """Carriers shaped like Twilio Media Streams (Twilio, Telnyx, Exotel):
    ``dtmf`` / ``mark`` / ``stop`` events with the same fields."""

    async def on_dtmf(self, msg: dict[str, Any]) -> None:
        self.on_dtmf_digit(obj(msg, "dtmf").get("digit"))

    async def on_mark(self, msg: dict[str, Any]) -> None:
        name = obj(msg, "mark").get("name")
        if not isinstance(name, str):
            raise MalformedMessage("mark without a name")
        self.mark_played(name)

    async def on_stop(self, msg: dict[str, Any]) -> None:
        raise CallEnded("carrier_stop")
