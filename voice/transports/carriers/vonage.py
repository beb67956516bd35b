"""Vonage Voice API websocket endpoint (NCCO ``connect`` to a ``websocket``).

Vonage opens the socket, sends ``websocket:connected`` (JSON text, with the
``content-type`` audio/l16;rate=8000|16000|24000 and the NCCO headers at top
level), then raw L16 little-endian audio as binary messages of one 20 ms
frame each; DTMF arrives as ``websocket:dtmf`` text. Out: binary messages of
exactly one 20 ms frame (320 B at 8 kHz, 640 B at 16 kHz), which Vonage
requires; ``{"action":"clear"}`` on barge-in; ``{"action":"notify"}`` after
each sentence, whose ``websocket:notify`` echo marks it played.

Vonage buffers about 20 s of audio and has no documented mark, so the
sender stays at most ``lead_s`` ahead of real time and the playout clock
decides what the caller heard when the notify echo is missing.
There is no stop message: the call ends when Vonage closes the socket.
"""

from __future__ import annotations

import logging
from typing import Any

from streaming.playout import OutFormat
from voice.transports.carriers.parameters import start_from_parameters
from voice.transports.media_json import WebSocketCall
from voice.transports.telephony import MalformedMessage, UnsupportedMedia

log = logging.getLogger(__name__)

PATH = "/vonage"
RATES = (8000, 16000, 24000)
RESERVED = frozenset({"event", "content-type"})


def parse_content_type(value: object) -> int:
    """``audio/l16;rate=16000`` -> 16000."""
    if not isinstance(value, str):
        raise MalformedMessage("websocket:connected without content-type")
    kind, _, params = value.replace(" ", "").lower().partition(";")
    rate = dict(p.split("=", 1) for p in params.split(";") if "=" in p).get("rate", "")
    if kind != "audio/l16" or not rate.isdigit() or int(rate) not in RATES:
        raise UnsupportedMedia(f"unsupported content-type {value[:60]!r}; use audio/l16;rate=8000|16000|24000")
    return int(rate)


class VonageCall(WebSocketCall):
    transport = "vonage"
    echoes_marks = False
    lead_s = 2.0  # well inside Vonage's ~20 s buffer; less to flush on barge-in
    ignored_events = frozenset({"websocket:cleared"})

    frame_bytes = 640

    async def on_websocket_connected(self, msg: dict[str, Any]) -> None:
        if self.session.started:
            raise MalformedMessage("second websocket:connected")
        rate = parse_content_type(msg.get("content-type"))
        self.frame_bytes = rate // 50 * 2
        headers = {k: v for k, v in msg.items() if k not in RESERVED}
        # Vonage's custom headers are its custom parameters: the same policy
        # (carrier secret, custom prompt only if the server allows it).
        start = start_from_parameters("pcm16", rate, headers, self.runtime.config)
        await self.begin(start, OutFormat("pcm16", rate, chunk_bytes=self.frame_bytes))

    async def on_binary(self, frame: bytes) -> None:
        if not self.session.started:
            raise MalformedMessage("audio before websocket:connected")
        await self.audio(frame)

    async def on_websocket_dtmf(self, msg: dict[str, Any]) -> None:
        digit = msg.get("digit")
        if digit is None and isinstance(msg.get("dtmf"), dict):
            digit = msg["dtmf"].get("digits")  # the newer event shape
        self.on_dtmf_digit(digit)

    async def on_websocket_notify(self, msg: dict[str, Any]) -> None:
        payload = msg.get("payload")
        if isinstance(payload, dict) and isinstance(payload.get("name"), str):
            self.mark_played(payload["name"])

    async def on_websocket_error(self, msg: dict[str, Any]) -> None:
        self.note_peer_report("carrier error", msg)

    async def send_audio(self, chunk: bytes) -> None:
        await self.send_frame(chunk)

    async def send_mark(self, name: str) -> None:
        await self.send_json({"action": "notify", "payload": {"name": name}})

    async def send_clear(self) -> None:
        await self.send_json({"action": "clear"})


handle_vonage = VonageCall.handle
