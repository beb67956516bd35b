"""The protocol-neutral half of the caller clients.

A caller client is a *wire* (one class per protocol, one module each in this
package) driven by a *driver* that owns the socket and the clock. The wire
knows the protocol and nothing else: the URL and headers of the upgrade, the
messages that open and close a call, how the caller's audio, a key press and
a playback confirmation are framed, and what each server message means,
reduced to a few protocol-neutral events (:class:`Audio`, :class:`Mark`,
:class:`Clear`, :class:`Event`, :class:`Control`). It does no I/O.

The drivers: the test fakes (``tests/fake_carrier.py``: simulated playout),
the load generator's callers (``benchmarks/loadgen.py``: a timeline), the
native caller of the tests and benchmarks (``benchmarks/client.py``) and the
SIP sample's bridge (``samples/sip/bridge.py``: RTP on the other side). A
protocol fix made in its wire reaches all of them.

Misbehaving on purpose (garbage frames, a wrong handshake, shuffled chunks)
stays a driver's business: a driver sends any :data:`Message` it likes, and
each wire takes options for what a test varies (custom parameters, a token,
stream ids, formats).

Standard library only: the SIP bridge imports this package from its own
process, which has pjsua2, websockets and numpy and nothing else.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlencode

# One websocket message as a driver hands it over: a JSON object (sent as
# text), text as is, or a binary frame.
Message = dict[str, Any] | str | bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def to_wire(msg: Message) -> str | bytes:
    """What goes on the socket: compact JSON for an object, anything else as is."""
    return json.dumps(msg, separators=(",", ":")) if isinstance(msg, dict) else msg


def decode(text: str) -> dict[str, Any]:
    """A server text message as an object: ``{"text": …}`` when it is not
    JSON (Asterisk's plain-text commands), ``{"json": …}`` when it is JSON
    but not an object."""
    try:
        msg = json.loads(text)
    except ValueError:
        return {"text": text}
    return msg if isinstance(msg, dict) else {"json": msg}


# ---- what a server message means to the caller --------------------------------


@dataclass(frozen=True, slots=True)
class Audio:
    """Reply audio, in the call's codec (already base64-decoded)."""

    data: bytes
    item: str | None = None  # Realtime: the conversation item it belongs to


@dataclass(frozen=True, slots=True)
class Mark:
    """A marker after the audio sent so far: confirm it once that has played
    (:meth:`Wire.played`)."""

    name: Any


@dataclass(frozen=True, slots=True)
class Clear:
    """Barge-in: drop the audio buffered and not played yet."""


@dataclass(frozen=True, slots=True)
class Event:
    """A session event (the native protocol's events, the Twilio benchmark side
    channel, every Realtime server event), as the server sent it."""

    msg: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Control:
    """A protocol command with no neutral meaning (Asterisk's ``MEDIA_XOFF``…)."""

    command: str
    msg: dict[str, Any]


ServerEvent = Audio | Mark | Clear | Event | Control


class WireError(ValueError):
    """A server message that breaks the protocol (strict wires only)."""


# ---- the protocol's side of one call --------------------------------------------


class Wire:
    """One call's client side of a wire protocol. Holds the call's identity
    and counters (stream id, sequence numbers), so: one instance per call.

    ``token``: the server's bearer token, sent as an ``Authorization`` header
    and, where carriers put it, as ``?token=`` in the URL. ``strict``: check
    every server message against the protocol (the test fakes) instead of
    taking what can be read (load against other servers, the SIP bridge)."""

    name: ClassVar[str] = "abstract"
    path: ClassVar[str] = "/"
    binary_audio: ClassVar[bool] = False  # audio travels as binary websocket frames, both ways
    echo_flushed: ClassVar[bool] = False  # on clear, the marks pending come back at once
    token_in_url: ClassVar[bool] = True
    frame_ms: int = 20  # the caller's audio per media message, as the platform frames it

    def __init__(self, *, token: str | None = None, strict: bool = False) -> None:
        self.token = token
        self.strict = strict
        self.encoding = "mulaw"
        self.rate = 8000
        self.frames = 0  # media messages built so far

    # ---- opening ------------------------------------------------------------

    def query(self) -> dict[str, str]:
        return {"token": self.token} if self.token and self.token_in_url else {}

    def url(self, base: str) -> str:
        """The websocket URL of a call on the server at ``base`` (``ws://host:port``)."""
        query = self.query()
        return base.rstrip("/") + self.path + (f"?{urlencode(query)}" if query else "")

    def headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {self.token}"} if self.token else None

    def opening(self) -> list[Message]:
        """The messages after the upgrade, before any audio."""
        return []

    # ---- the caller's side ------------------------------------------------

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        """One frame of the caller's audio (codec bytes). ``timestamp_ms``:
        the frame's place on the stream's clock, by default its index times
        :attr:`frame_ms` (a driver that drops frames passes its own)."""
        raise NotImplementedError

    def dtmf(self, digit: str) -> Message:
        raise NotImplementedError(f"{self.name} has no key presses")

    def played(self, name: Any) -> Message | None:
        """The confirmation that the audio before mark ``name`` has played."""
        return None

    def cleared(self) -> Message | None:
        """The acknowledgement of a clear, where the protocol has one."""
        return None

    def closing(self) -> list[Message]:
        """The messages of a hang-up, before the socket closes."""
        return []

    def _next_frame(self, timestamp_ms: int | None) -> tuple[int, int]:
        """(1-based frame number, timestamp in ms) of the next media message."""
        self.frames += 1
        return self.frames, (self.frames - 1) * self.frame_ms if timestamp_ms is None else timestamp_ms

    # ---- the server's side ------------------------------------------------

    def parse(self, raw: str | bytes) -> list[ServerEvent]:
        """What a message from the server means: zero or more events."""
        return self.events(raw if isinstance(raw, bytes) else decode(raw))

    def events(self, msg: dict[str, Any] | bytes) -> list[ServerEvent]:
        """:meth:`parse` for a message already decoded (:func:`decode`)."""
        if isinstance(msg, bytes):
            return [Audio(msg)] if self.binary_audio else []
        return self.text_events(msg)

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        return []

    def check(self, ok: bool, msg: dict[str, Any], what: str) -> None:
        if self.strict and not ok:
            raise WireError(f"{self.name}: {what}: {msg!r}"[:500])

    # ---- the audio format -----------------------------------------------

    @property
    def bytes_per_s(self) -> int:
        return self.rate * (2 if self.encoding == "pcm16" else 1)

    @property
    def reply_encoding(self) -> str:
        """The codec the reply audio comes back in: the caller's, except
        where the carrier sets its own (Telnyx's bidirectional codec)."""
        return self.encoding


class MarkStyle(Wire):
    """Twilio's media / mark / clear events, which Telnyx and Exotel copy: only
    the stream id's key and the sequence numbering differ."""

    sid_key: ClassVar[str] = "streamSid"
    sid_in_replies: ClassVar[bool] = True  # the server's messages name the stream
    echo_flushed = True  # a clear sends every pending mark back at once

    def __init__(self, *, sid: str, token: str | None = None, strict: bool = False) -> None:
        super().__init__(token=token, strict=strict)
        self.sid = sid
        self.sequence = 0  # of the last message sent that carries one

    def next_sequence(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    # How the three spell the same messages.
    seq_key: ClassVar[str] = "sequenceNumber"
    media_track: ClassVar[str | None] = "inbound"  # media.track (Exotel sends none)
    numbered_replies: ClassVar[bool] = True  # Twilio numbers dtmf and mark echoes too

    def message(self, event: str, body: dict[str, Any] | None, numbered: bool = True) -> Message:
        """``{"event", <sequence>, <stream id>, <event>: body}`` in this carrier's keys."""
        msg: dict[str, Any] = {"event": event}
        if numbered:
            msg[self.seq_key] = self.next_sequence()
        msg[self.sid_key] = self.sid
        if body is not None:
            msg[event] = body
        return msg

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        n, ts = self._next_frame(timestamp_ms)
        media = {"chunk": str(n), "timestamp": str(ts), "payload": b64(chunk)}
        if self.media_track is not None:
            media = {"track": self.media_track, **media}
        return self.message("media", media)

    def played(self, name: Any) -> Message:
        return self.message("mark", {"name": name}, numbered=self.numbered_replies)

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        if self.sid_in_replies:
            self.check(msg.get(self.sid_key) == self.sid, msg, f"not this stream's {self.sid_key}")
        event = msg.get("event")
        if event == "media":
            payload = (msg.get("media") or {}).get("payload")
            self.check(isinstance(payload, str), msg, "media without a payload")
            return [Audio(unb64(payload))] if isinstance(payload, str) else []
        if event == "mark":
            name = (msg.get("mark") or {}).get("name")
            self.check(name is not None, msg, "mark without a name")
            return [Mark(name)] if name is not None else []
        if event == "clear":
            return [Clear()]
        return []
