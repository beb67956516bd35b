"""Asterisk chan_websocket: Asterisk's side (docs/telephony.md).

Audio in binary frames both ways, in the channel's format (``ulaw``,
``alaw``, ``slin16`` or ``slin48``); control as plain-text commands
(``MEDIA_START key:value …``, ``DTMF_END digit:5``), or as JSON objects
with ``json=True``. The server's commands (``FLUSH_MEDIA`` on barge-in,
``MEDIA_XOFF``…) parse as :class:`~benchmarks.callers.base.Control`;
``FLUSH_MEDIA`` is also a :class:`~benchmarks.callers.base.Clear`. No marks.
"""

from __future__ import annotations

from typing import Any

from benchmarks.callers.base import Clear, Control, Message, ServerEvent, Wire

FORMATS = {"ulaw": ("mulaw", 8000), "alaw": ("alaw", 8000), "slin16": ("pcm16", 16000), "slin48": ("pcm16", 48000)}


class AsteriskWS(Wire):
    name = "asterisk_ws"
    path = "/asterisk"
    binary_audio = True

    def __init__(
        self,
        *,
        format: str = "ulaw",
        json: bool = False,
        connection_id: str = "abc123",
        channel: str = "WebSocket/test/0x1",
        token: str | None = None,
        strict: bool = False,
    ) -> None:
        """``format``: ``ulaw``, ``alaw``, ``slin16`` or ``slin48``; ``json``: control
        messages as JSON objects instead of plain text."""
        super().__init__(token=token, strict=strict)
        self.format = format
        self.encoding, self.rate = FORMATS[format]
        self.json_control = json
        self.connection_id, self.channel = connection_id, channel

    @property
    def frame_size(self) -> int:
        return self.bytes_per_s * self.frame_ms // 1000

    def command(self, name: str, **params: Any) -> Message:
        """A control message, in the call's control style."""
        if self.json_control:
            return {"event": name, **params}
        return " ".join([name, *(f"{k}:{v}" for k, v in params.items())])

    def opening(self) -> list[Message]:
        return [
            self.command(
                "MEDIA_START",
                connection_id=self.connection_id,
                channel=self.channel,
                format=self.format,
                optimal_frame_size=str(self.frame_size),
            )
        ]

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        self._next_frame(timestamp_ms)
        return chunk

    def dtmf(self, digit: str) -> Message:
        return f"DTMF_END digit:{digit}"

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        command = str(msg.get("command") or msg.get("text", ""))
        events: list[ServerEvent] = [Control(command, msg)]
        if command == "FLUSH_MEDIA":
            events.append(Clear())
        return events
