"""Plivo Audio Streams, bidirectional (``<Stream bidirectional="true">``).

In: ``start`` (``mediaFormat`` audio/x-mulaw 8 kHz or audio/x-l16 8/16 kHz),
``media``, ``dtmf``, ``playedStream`` (a checkpoint was reached: the audio
before it played), ``clearedAudio``. Plivo sends no stop event: the socket
closes. Out: ``playAudio`` in the stream's own content type, a
``checkpoint`` after each sentence, ``clearAudio`` on barge-in.
"""

from __future__ import annotations

import logging
from typing import Any

from streaming.playout import OutFormat
from voice.transports.carriers.parameters import start_from_parameters
from voice.transports.media_json import (
    WebSocketCall,
    as_int,
    b64decode,
    b64encode,
    obj,
    optional_obj,
)
from voice.transports.telephony import CallEnded, MalformedMessage, UnsupportedMedia

log = logging.getLogger(__name__)

PATH = "/plivo"
FORMATS = {("audio/x-mulaw", 8000): "mulaw", ("audio/x-l16", 8000): "pcm16", ("audio/x-l16", 16000): "pcm16"}


def _extra_headers(value: object) -> dict[str, Any]:
    """``extraHeaders="k=v,k2=v2"`` arrives as a string or already as an object."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        pairs = (p.split("=", 1) for p in value.replace(";", ",").split(",") if "=" in p)
        return {k.strip(): v.strip() for k, v in pairs}
    return {}


class PlivoCall(WebSocketCall):
    transport = "plivo"

    stream_id: str | None = None
    content_type = "audio/x-mulaw"
    rate = 8000

    async def on_start(self, msg: dict[str, Any]) -> None:
        if self.session.started:
            raise MalformedMessage("second 'start'")
        start = obj(msg, "start")
        fmt = optional_obj(start, "mediaFormat")
        content_type = str(fmt.get("encoding", "audio/x-mulaw")).split(";", 1)[0]
        rate = as_int(fmt.get("sampleRate", 8000), "sampleRate")
        encoding = FORMATS.get((content_type, rate))
        if encoding is None:
            raise UnsupportedMedia(f"unsupported media format {content_type[:24]!r} at {rate} Hz")
        sid = start.get("streamId") or msg.get("streamId")
        if not isinstance(sid, str) or not sid:
            raise MalformedMessage("start without streamId")
        self.stream_id, self.content_type, self.rate = sid, content_type, rate
        params = _extra_headers(msg.get("extra_headers", start.get("extra_headers")))
        out = OutFormat.framed(encoding, rate, 0.02)
        await self.begin(
            start_from_parameters(encoding, rate, {**params, "callId": start.get("callId")}, self.runtime.config), out
        )

    async def on_media(self, msg: dict[str, Any]) -> None:
        media = obj(msg, "media")
        if media.get("track", "inbound") != "inbound":
            return
        await self.audio(b64decode(media.get("payload")))

    async def on_dtmf(self, msg: dict[str, Any]) -> None:
        self.on_dtmf_digit(obj(msg, "dtmf").get("digit"))

    async def on_playedStream(self, msg: dict[str, Any]) -> None:
        name = msg.get("name")
        if not isinstance(name, str):
            raise MalformedMessage("playedStream without a name")
        self.mark_played(name)

    async def on_clearedAudio(self, msg: dict[str, Any]) -> None:
        log.debug("call %s (plivo): audio cleared", self.call_id)

    async def on_stop(self, msg: dict[str, Any]) -> None:
        raise CallEnded("carrier_stop")  # not in Plivo's protocol; accepted from proxies that add one

    async def send_audio(self, chunk: bytes) -> None:
        await self.send_json(
            {
                "event": "playAudio",
                "streamId": self.stream_id,
                "media": {"contentType": self.content_type, "sampleRate": self.rate, "payload": b64encode(chunk)},
            }
        )

    async def send_mark(self, name: str) -> None:
        await self.send_json({"event": "checkpoint", "streamId": self.stream_id, "name": name})

    async def send_clear(self) -> None:
        await self.send_json({"event": "clearAudio", "streamId": self.stream_id})


handle_plivo = PlivoCall.handle
