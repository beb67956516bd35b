"""Vonage Voice API websockets: the carrier's side (docs/telephony.md).

A ``websocket:connected`` text message (``content-type: audio/l16;rate=…``,
plus the NCCO's headers) opens the call; audio is 16-bit linear PCM in
binary frames both ways; ``websocket:dtmf`` is a key. The server's
``{"action": "notify", "payload": …}`` is echoed as ``websocket:notify``
once the audio before it has played (a clear does not send them back), and
``{"action": "clear"}`` is acknowledged with ``websocket:cleared``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.callers.base import Clear, Mark, Message, ServerEvent, Wire


class Vonage(Wire):
    name = "vonage"
    path = "/vonage"
    binary_audio = True

    def __init__(
        self,
        *,
        rate: int = 16000,
        headers: dict[str, Any] | None = None,
        token: str | None = None,
        strict: bool = False,
    ) -> None:
        """``rate``: 8000 or 16000; ``headers``: the NCCO endpoint's headers,
        sent in ``websocket:connected``."""
        super().__init__(token=token, strict=strict)
        self.encoding, self.rate = "pcm16", rate
        self.call_headers = dict(headers or {})

    def opening(self) -> list[Message]:
        return [{"event": "websocket:connected", "content-type": f"audio/l16;rate={self.rate}", **self.call_headers}]

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        self._next_frame(timestamp_ms)
        return chunk

    def dtmf(self, digit: str) -> Message:
        return {"event": "websocket:dtmf", "digit": digit, "duration": 260}

    def played(self, name: Any) -> Message:
        return {"event": "websocket:notify", "payload": name}

    def cleared(self) -> Message:
        return {"event": "websocket:cleared"}

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        action = msg.get("action")
        if action == "notify":
            return [Mark(msg["payload"])]
        if action == "clear":
            return [Clear()]
        return []
