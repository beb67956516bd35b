"""Plivo Audio Streams, bidirectional: the carrier's side (docs/telephony.md).

``start`` (``mediaFormat`` audio/x-mulaw 8 kHz or audio/x-l16 8/16 kHz, the
``extraHeaders`` as ``extra_headers``), ``media``, ``dtmf``. The server
answers with ``playAudio`` in the stream's own format, a ``checkpoint`` after
each sentence (echoed as ``playedStream`` once reached; a clear does not
send them back) and ``clearAudio`` (acknowledged with ``clearedAudio``).
Plivo sends no stop: the socket closes.
"""

from __future__ import annotations

import uuid
from typing import Any

from benchmarks.callers.base import Audio, Clear, Mark, Message, ServerEvent, Wire, b64, unb64

CONTENT_TYPES = {"mulaw": "audio/x-mulaw", "pcm16": "audio/x-l16"}


class Plivo(Wire):
    name = "plivo"
    path = "/plivo"

    def __init__(
        self,
        *,
        sid: str | None = None,
        encoding: str = "mulaw",
        rate: int = 8000,
        extra_headers: str | dict[str, Any] | None = None,
        token: str | None = None,
        strict: bool = False,
    ) -> None:
        """``encoding``: ``mulaw`` (8 kHz) or ``pcm16`` (8 or 16 kHz);
        ``extra_headers``: the ``extraHeaders`` string (``"k=v,k2=v2"``)."""
        super().__init__(token=token, strict=strict)
        self.sid = sid or str(uuid.uuid4())
        self.encoding, self.rate = encoding, rate
        self.extra_headers = extra_headers
        self.sequence = -1  # start is number 0

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.encoding]

    def opening(self) -> list[Message]:
        start = {
            "callId": "c1",
            "streamId": self.sid,
            "accountId": "a1",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": self.content_type, "sampleRate": self.rate},
        }
        msg: dict[str, Any] = {"event": "start", "sequenceNumber": self.next_sequence(), "start": start}
        if self.extra_headers is not None:
            msg["extra_headers"] = self.extra_headers
        return [msg]

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        n, ts = self._next_frame(timestamp_ms)
        return {
            "event": "media",
            "sequenceNumber": self.next_sequence(),
            "streamId": self.sid,
            "media": {"track": "inbound", "timestamp": str(ts), "chunk": n, "payload": b64(chunk)},
        }

    def dtmf(self, digit: str) -> Message:
        return {"event": "dtmf", "streamId": self.sid, "dtmf": {"track": "inbound", "digit": digit, "timestamp": "0"}}

    def played(self, name: Any) -> Message:
        return {"event": "playedStream", "streamId": self.sid, "name": name}

    def cleared(self) -> Message:
        return {"event": "clearedAudio", "streamId": self.sid}

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        self.check(msg.get("streamId") == self.sid, msg, "not this stream's streamId")
        event = msg.get("event")
        if event == "playAudio":
            media = msg["media"]
            fmt = (media.get("contentType"), media.get("sampleRate"))
            self.check(fmt == (self.content_type, self.rate), msg, "not the stream's audio format")
            return [Audio(unb64(media["payload"]))]
        if event == "checkpoint":
            return [Mark(msg["name"])]
        if event == "clearAudio":
            return [Clear()]
        return []
