"""Asterisk chan_websocket (``Dial(WebSocket/…)`` or ARI externalMedia with
``transport=websocket``): Asterisk dials this route.

Media travels as binary frames of raw codec bytes; control as text frames,
either plain (``MEDIA_START connection_id:… format:ulaw optimal_frame_size:160``)
or JSON (``control_message_format = json``), and we answer in the form we
were spoken to. Out: audio in whole multiples of ``optimal_frame_size``
(Asterisk drops a ragged tail), ``FLUSH_MEDIA`` on barge-in. Asterisk's
queue holds ~1000 frames and says ``MEDIA_XOFF`` / ``MEDIA_XON``: the sender
stops on XOFF, and stays at most ``lead_s`` ahead anyway so a barge-in has
little to flush. Asterisk plays from its queue in real time and echoes no
marks, so the playout clock decides what the caller heard.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from streaming.playout import OutFormat
from voice.call.start import Start
from voice.transports.media_json import WebSocketCall
from voice.transports.telephony import CallEnded, MalformedMessage, UnsupportedMedia

log = logging.getLogger(__name__)

PATH = "/asterisk"
FORMATS = {
    "ulaw": ("mulaw", 8000),
    "alaw": ("alaw", 8000),
    "slin": ("pcm16", 8000),
    "slin12": ("pcm16", 12000),
    "slin16": ("pcm16", 16000),
    "slin24": ("pcm16", 24000),
    "slin32": ("pcm16", 32000),
    "slin44": ("pcm16", 44100),
    "slin48": ("pcm16", 48000),  # a WebRTC (Opus) leg's native rate
}
MAX_MESSAGE = 65500  # Asterisk's largest websocket message
MIN_MESSAGE_S = 0.02  # the least audio one reply message carries
XOFF_WAIT_S = 30.0  # a queue that never drains means Asterisk is stuck: drop audio rather than hang


def parse_control(frame: str) -> tuple[str, dict[str, str], bool]:
    """-> (command, parameters, was_json)."""
    text = frame.strip()
    if text.startswith("{"):
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):  # ValueError: json's bare one for 4300+ digit ints
            raise MalformedMessage(f"bad JSON control message {text[:40]!r}") from None
        if not isinstance(msg, dict):
            raise MalformedMessage("JSON control message is not an object")
        command = msg.get("event") or msg.get("command") or msg.get("type")
        if not isinstance(command, str):
            raise MalformedMessage("JSON control message without event")
        return command, {str(k): str(v) for k, v in msg.items()}, True
    if not text:
        raise MalformedMessage("empty control message")
    command, *rest = text.split()
    params = dict(p.split(":", 1) for p in rest if ":" in p)
    return command, params, False


class AsteriskWebSocketCall(WebSocketCall):
    transport = "asterisk_ws"
    echoes_marks = False
    lead_s = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.json_control = False
        self.frame_bytes = 160
        self._xon = asyncio.Event()
        self._xon.set()
        self._flushes = 0  # FLUSH_MEDIA sent: a send woken by one drops its chunk
        self.xoffs = 0

    async def on_text(self, frame: str) -> None:
        if len(frame) > 4096:
            raise MalformedMessage(f"control message of {len(frame)} chars")
        command, params, was_json = parse_control(frame)
        if command != "HANGUP":
            # Every listener's allowance of messages other than audio: a
            # stream of XON or STATUS lines is no cheaper than any other.
            self.take_control_event()
        if command == "MEDIA_START":
            await self._media_start(params, was_json)
        elif command == "ERROR":
            # Asterisk's own report (a command of ours it could not parse):
            # the peer's words, not bad input.
            self.note_peer_report("Asterisk reported an error", params)
        elif command == "MEDIA_XOFF":
            self.xoffs += 1
            self._xon.clear()
        elif command == "MEDIA_XON":
            self._xon.set()
        elif command in ("DTMF_END", "DTMF"):
            self.on_dtmf_digit(params.get("digit", ""))
        elif command == "HANGUP":
            raise CallEnded("carrier_stop")
        elif command in ("STATUS", "QUEUE_DRAINED", "MEDIA_BUFFERING_COMPLETED", "DTMF_BEGIN"):
            log.debug("call %s (asterisk): %s %s", self.call_id, command, params)
        else:
            raise MalformedMessage(f"unknown control message {command[:40]!r}")

    async def _media_start(self, params: dict[str, str], was_json: bool) -> None:
        if self.session.started:
            raise MalformedMessage("second MEDIA_START")
        fmt = FORMATS.get(params.get("format", ""))
        if fmt is None:
            raise UnsupportedMedia(
                f"unsupported format {str(params.get('format'))[:24]!r}; use one of {', '.join(FORMATS)}"
            )
        encoding, rate = fmt
        size = params.get("optimal_frame_size", "")
        sample = 2 if encoding == "pcm16" else 1
        # isascii: "²" is a digit to str.isdigit, not to int().
        given = size.isascii() and size.isdigit() and 0 < int(size) <= MAX_MESSAGE
        self.frame_bytes = int(size) if given else rate // 50 * sample
        if self.frame_bytes % sample:
            raise MalformedMessage(f"optimal_frame_size {size} is not whole samples")
        self.json_control = was_json
        # Several frames per message: fewer messages, still whole frames,
        # and never under MIN_MESSAGE_S of audio: a peer's frame size of 2
        # bytes made a reply thousands of messages a second, stalling the
        # event loop every call shares.
        fewest = -(-round(rate * sample * MIN_MESSAGE_S) // self.frame_bytes)
        frames = min(max(fewest, min(5, MAX_MESSAGE // self.frame_bytes)), MAX_MESSAGE // self.frame_bytes)
        chunk = self.frame_bytes * max(1, frames)
        start = Start(encoding=encoding, sample_rate=rate, metadata={k: v for k, v in params.items() if k != "event"})
        await self.begin(start, OutFormat(encoding, rate, chunk_bytes=chunk))

    async def on_binary(self, frame: bytes) -> None:
        if not self.session.started:
            raise MalformedMessage("media before MEDIA_START")
        await self.audio(frame)

    async def send_control(self, command: str) -> None:
        await self.send_frame(json.dumps({"command": command}) if self.json_control else command)

    async def send_audio(self, chunk: bytes) -> None:
        if not self._xon.is_set():
            flushes = self._flushes
            try:
                async with asyncio.timeout(XOFF_WAIT_S):
                    await self._xon.wait()
            except TimeoutError:
                log.warning("call %s (asterisk): queue full for %.0f s; dropping audio", self.call_id, XOFF_WAIT_S)
                return
            if self._flushes != flushes:
                # Woken by a flush (a barge-in): this chunk is of the reply
                # just cut, and must not play after FLUSH_MEDIA.
                return
        await self.send_frame(chunk)

    async def send_clear(self) -> None:
        self._flushes += 1
        await self.send_control("FLUSH_MEDIA")
        self._xon.set()  # a flushed queue is empty


handle_asterisk_ws = AsteriskWebSocketCall.handle
