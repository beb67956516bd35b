"""FreeSWITCH mod_audio_stream: FreeSWITCH's side (docs/telephony.md).

The metadata text (a JSON object with ``sample_rate``, 8000 or 16000, and
any custom parameters) opens the stream; the caller's audio goes as binary
16-bit linear PCM frames; the module sends no keys. The server's
``streamAudio`` messages carry one sentence of reply audio each (base64 raw
PCM at the stream's rate: the open-source module writes each to a file the
application plays), and ``{"type": "clear"}`` asks the application to stop
its playback (barge-in). No marks.
"""

from __future__ import annotations

from typing import Any

from benchmarks.callers.base import Audio, Clear, Message, ServerEvent, Wire, unb64


class FreeSwitch(Wire):
    name = "freeswitch"
    path = "/freeswitch"
    binary_audio = True

    def __init__(
        self,
        *,
        rate: int = 16000,
        metadata: dict[str, Any] | None = None,
        token: str | None = None,
        strict: bool = False,
    ) -> None:
        """``rate``: 8000 or 16000 (the command's ``8k``/``16k``);
        ``metadata``: the rest of the metadata object (custom parameters)."""
        super().__init__(token=token, strict=strict)
        self.encoding, self.rate = "pcm16", rate
        self.metadata = dict(metadata or {})

    def opening(self) -> list[Message]:
        return [{"sample_rate": self.rate, **self.metadata}]

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        self._next_frame(timestamp_ms)
        return chunk

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        kind = msg.get("type")
        if kind == "streamAudio":
            data = msg.get("data")
            ok = isinstance(data, dict) and data.get("audioDataType") == "raw" and data.get("sampleRate") == self.rate
            self.check(ok and isinstance(data.get("audioData"), str), msg, "streamAudio")  # type: ignore[union-attr]
            return [Audio(unb64(data["audioData"]))] if ok else []  # type: ignore[index]
        if kind == "clear":
            return [Clear()]
        self.check(False, msg, "unknown message")
        return []
