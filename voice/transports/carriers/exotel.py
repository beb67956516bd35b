"""Exotel Voicebot applet, bidirectional (AgentStream websocket protocol).

Twilio-like with snake_case names. Audio both ways is base64 raw slin:
16-bit little-endian mono, 8 kHz unless the URL or ``start`` asks for 16 or
24 kHz. Out: ``media`` chunks that meet Exotel's rule (a multiple of
320 B, at least 3.2 KB, at most 100 KB), ``mark`` after each
sentence, ``clear`` on barge-in.
"""

from __future__ import annotations

from typing import Any

from streaming.playout import OutFormat
from voice.transports.carriers.parameters import start_from_parameters
from voice.transports.media_json import (
    MarkStyleCall,
    as_int,
    b64decode,
    b64encode,
    obj,
    optional_obj,
    query_param,
)
from voice.transports.telephony import MalformedMessage, UnsupportedMedia

PATH = "/exotel"
RATES = (8000, 16000, 24000)
# Exotel's rule for outbound media: each chunk a multiple of 320 B, from
# 3.2 KB to 100 KB. 3.2 KB is 200 ms at 8 kHz and 100 ms at 16 kHz.
MIN_CHUNK = 3200
CHUNK_S = 0.1


def chunk_bytes(rate: int) -> int:
    """The smallest legal chunk of at least 100 ms: small chunks keep a clear precise."""
    size = max(MIN_CHUNK, round(rate * CHUNK_S) * 2)
    return -(-size // 320) * 320


# media_format.encoding values that name 16-bit slin: Exotel's own
# ("audio/x-raw"), and the payload's transfer encoding many Exotel clients
# and simulators send in its place.
RAW_ENCODINGS = frozenset({"audio/x-raw", "raw", "slin", "slin16", "base64"})


def sample_bits(value: object, rate: int) -> int:
    """media_format.bit_rate: bits per sample ("16", Exotel's documented
    value), or the stream's bit rate ("128kbps" at 8 kHz mono, as many
    clients send it); 0 for anything else (refused as unsupported, not
    malformed)."""
    text = str(value).strip().lower()
    try:
        if text.endswith("kbps"):
            kbps = int(text[:-4].strip())
            return kbps * 1000 // rate if rate and kbps * 1000 % rate == 0 else 0
        return int(text)
    except ValueError:
        return 0


class ExotelCall(MarkStyleCall):
    transport = "exotel"
    ignored_events = frozenset({"connected"})

    stream_sid: str | None = None

    async def on_start(self, msg: dict[str, Any]) -> None:
        if self.session.started:
            raise MalformedMessage("second 'start'")
        start = obj(msg, "start")
        fmt = optional_obj(start, "media_format")
        rate = as_int(fmt.get("sample_rate", self._query_rate()), "sample_rate")
        bits = sample_bits(fmt.get("bit_rate", 16), rate)
        encoding = str(fmt.get("encoding") or "audio/x-raw").lower()
        if rate not in RATES or bits != 16 or encoding not in RAW_ENCODINGS:
            raise UnsupportedMedia(
                f"unsupported media format: {bits or '?'}-bit at {rate} Hz, encoding {encoding[:24]!r}; "
                "Exotel streams 16-bit slin (audio/x-raw) at 8/16/24 kHz"
            )
        sid = msg.get("stream_sid") or start.get("stream_sid")
        if not isinstance(sid, str) or not sid:
            raise MalformedMessage("start without stream_sid")
        self.stream_sid = sid
        params = start.get("custom_parameters") or {}
        if not isinstance(params, dict):
            params = {}
        out = OutFormat("pcm16", rate, chunk_bytes=chunk_bytes(rate))
        await self.begin(
            start_from_parameters(
                "pcm16",
                rate,
                {**params, "call_sid": start.get("call_sid")},  # the carrier's own id over a parameter's
                self.runtime.config,
                carrier="exotel",
                call_id=start.get("call_sid"),
            ),
            out,
        )

    def _query_rate(self) -> int:
        """``wss://host/exotel?sample-rate=16000``: the applet's rate choice."""
        request = self.ws.request
        value = query_param(request.path, "sample-rate") if request is not None else None
        return int(value) if value is not None and value.isdigit() else 8000

    async def on_media(self, msg: dict[str, Any]) -> None:
        payload = b64decode(obj(msg, "media").get("payload"))
        if len(payload) % 2:
            raise MalformedMessage(f"slin payload of {len(payload)} B is not whole 16-bit samples")
        await self.audio(payload)

    async def send_audio(self, chunk: bytes) -> None:
        await self.send_json({"event": "media", "stream_sid": self.stream_sid, "media": {"payload": b64encode(chunk)}})

    async def send_mark(self, name: str) -> None:
        await self.send_json({"event": "mark", "stream_sid": self.stream_sid, "mark": {"name": name}})

    async def send_clear(self) -> None:
        await self.send_json({"event": "clear", "stream_sid": self.stream_sid})


handle_exotel = ExotelCall.handle
