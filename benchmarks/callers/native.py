"""firstline's native protocol, version 1: the client's side (docs/protocol.md).

``start`` (the audio format, options) opens the call; the caller's audio
goes as binary frames; ``input.commit`` ends a turn now; ``stop`` ends the
call. The server's JSON events parse as
:class:`~benchmarks.callers.base.Event`, but for reply audio
(``options.reply_audio``): binary frames, ``response.audio.mark`` after each
sentence (confirmed with ``response.audio.played``) and
``response.audio.clear`` on barge-in.
"""

from __future__ import annotations

from typing import Any

from benchmarks.callers.base import Clear, Event, Mark, Message, ServerEvent, Wire


class Native(Wire):
    name = "native"
    path = "/v1/call"
    binary_audio = True

    def __init__(
        self,
        *,
        encoding: str = "mulaw",
        rate: int = 8000,
        token: str | None = None,
        strict: bool = False,
        **start_fields: Any,
    ) -> None:
        """``start_fields``: the rest of :meth:`opening`'s ``start``
        (``version``, ``options``, ``system_prompt``…)."""
        super().__init__(token=token, strict=strict)
        self.encoding, self.rate = encoding, rate
        self.start_fields = start_fields

    def start(self, encoding: str, sample_rate: int, **fields: Any) -> dict[str, Any]:
        """The ``start`` message; the call's audio format from now on."""
        self.encoding, self.rate = encoding, sample_rate
        return {"type": "start", "audio": {"encoding": encoding, "sample_rate": sample_rate}, **fields}

    def opening(self) -> list[Message]:
        return [self.start(self.encoding, self.rate, **self.start_fields)]

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        self._next_frame(timestamp_ms)
        return chunk

    def commit(self) -> dict[str, Any]:
        return {"type": "input.commit"}

    def played(self, name: Any) -> dict[str, Any]:
        return {"type": "response.audio.played", "name": name}

    def closing(self) -> list[Message]:
        return [{"type": "stop"}]

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        kind = msg.get("type")
        if kind == "response.audio.mark":
            return [Mark(str(msg.get("name")))]
        if kind == "response.audio.clear":
            return [Clear()]
        return [Event(msg)]
