"""Telnyx media streaming, bidirectional RTP mode (TeXML ``<Stream>`` or Call
Control ``streaming_start`` with ``stream_bidirectional_mode=rtp``).

In: ``connected``, ``start`` (``media_format`` PCMU or PCMA at 8 kHz),
``media``, ``dtmf``, ``mark``, ``error``, ``stop``. Telnyx does not
guarantee message order, so inbound media goes through a small reorder
buffer keyed by ``chunk`` before it reaches the ASR: late chunks are
dropped, a gap is skipped once a few later chunks have piled up. Out:
``media`` (20 ms frames in the stream's bidirectional codec, PCMU unless
``--telnyx-outbound-codec`` or the call's ``bidirectional_codec`` custom
parameter says PCMA), ``mark`` after each sentence,
``clear`` on barge-in.
"""

from __future__ import annotations

import logging
from typing import Any

from streaming.playout import OutFormat
from voice.call.start import ProtocolError, check_audio_frame
from voice.transports.carriers.parameters import start_from_parameters
from voice.transports.media_json import (
    MarkStyleCall,
    as_int,
    b64decode,
    b64encode,
    obj,
    optional_obj,
)
from voice.transports.telephony import CallEnded, MalformedMessage, UnsupportedMedia

log = logging.getLogger(__name__)

PATH = "/telnyx"
ENCODINGS = {"PCMU": "mulaw", "PCMA": "alaw"}
# Chunks held waiting for a missing one: 5 x 20 ms. Beyond that the gap is
# lost audio, and waiting longer only delays the caller's words.
REORDER_DEPTH = 5


class Reorder:
    """Releases numbered chunks in order, tolerating reordering and loss."""

    def __init__(self, depth: int = REORDER_DEPTH) -> None:
        self.depth = depth
        self.next: int | None = None
        self.held: dict[int, bytes] = {}
        self.late = 0
        self.skipped = 0

    def push(self, number: int, payload: bytes) -> list[bytes]:
        if self.next is None:
            # Telnyx numbers chunks from 1; a stream joined late starts where it is.
            self.next = 1 if number <= self.depth else number
        if number < self.next or number in self.held:
            self.late += 1  # its place in the stream has been played past
            return []
        self.held[number] = payload
        out: list[bytes] = []
        while self.held:
            if self.next in self.held:
                out.append(self.held.pop(self.next))
                self.next += 1
            elif len(self.held) > self.depth:
                first = min(self.held)
                self.skipped += first - self.next
                self.next = first
            else:
                break
        return out

    def drain(self) -> list[bytes]:
        out = [self.held[n] for n in sorted(self.held)]
        self.held.clear()
        return out


class TelnyxCall(MarkStyleCall):
    transport = "telnyx"
    ignored_events = frozenset({"connected"})

    stream_id: str | None = None
    inbound_encoding = "mulaw"  # the start's media_format, once it came

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reorder = Reorder()

    async def on_start(self, msg: dict[str, Any]) -> None:
        if self.session.started:
            raise MalformedMessage("second 'start'")
        start = obj(msg, "start")
        fmt = optional_obj(start, "media_format")
        named = str(fmt.get("encoding", "PCMU"))
        encoding = ENCODINGS.get(named.upper())
        rate = as_int(fmt.get("sample_rate", 8000), "sample_rate")
        if encoding is None or rate != 8000:
            raise UnsupportedMedia(f"unsupported media format {named[:24]!r} at {rate} Hz; use PCMU or PCMA at 8000 Hz")
        sid = msg.get("stream_id")
        self.stream_id = sid if isinstance(sid, str) else None
        params = start.get("custom_parameters") or {}
        if not isinstance(params, dict):
            params = {}
        # Telnyx plays what we send in its bidirectional codec, set apart
        # from the caller's (PCMU unless the stream set another): A-law sent
        # to a PCMU stream plays as noise.
        named_out = str(params.get("bidirectional_codec") or self.runtime.config.telnyx_outbound_codec)
        outbound = ENCODINGS.get(named_out.upper())
        if outbound is None:
            # Refused, not malformed: every media frame after a malformed
            # start counts as malformed too, and the flood cooled the Telnyx
            # media server's address down for every call from it.
            raise UnsupportedMedia(f"unsupported bidirectional_codec {named_out[:24]!r}; use PCMU or PCMA")
        self.inbound_encoding = encoding
        await self.begin(
            start_from_parameters(
                encoding, rate, {**params, "call_control_id": start.get("call_control_id")}, self.runtime.config
            ),
            OutFormat(outbound, 8000, chunk_bytes=160),
        )

    async def on_media(self, msg: dict[str, Any]) -> None:
        media = obj(msg, "media")
        if media.get("track", "inbound") != "inbound":
            return
        payload = b64decode(media.get("payload"))
        try:
            # Checked before the reorder buffer holds it (the session checks
            # again on release): chunks numbered ahead wait there until the
            # stream's end, each up to the websocket frame's size.
            check_audio_frame(payload, self.inbound_encoding)
        except ProtocolError as exc:
            raise MalformedMessage(exc.message) from None
        number = media.get("chunk", msg.get("sequence_number"))
        if number is None:
            await self.audio(payload)  # unnumbered: nothing to reorder by
            return
        for ready in self.reorder.push(as_int(number, "chunk"), payload):
            await self.audio(ready)

    async def on_error(self, msg: dict[str, Any]) -> None:
        self.note_peer_report("carrier error", msg.get("payload", msg))

    async def on_stop(self, msg: dict[str, Any]) -> None:
        try:
            for ready in self.reorder.drain():
                await self.audio(ready)
        except MalformedMessage as exc:
            # A held chunk that is refused (over budget, before start) must
            # not swallow the stop: the call would last until the socket closed.
            self.note_malformed(exc)
        raise CallEnded("carrier_stop")

    async def send_audio(self, chunk: bytes) -> None:
        await self.send_json({"event": "media", "media": {"payload": b64encode(chunk)}})

    async def send_mark(self, name: str) -> None:
        await self.send_json({"event": "mark", "mark": {"name": name}})

    async def send_clear(self) -> None:
        await self.send_json({"event": "clear"})


handle_telnyx = TelnyxCall.handle
