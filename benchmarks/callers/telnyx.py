"""Telnyx media streaming, bidirectional: the carrier's side (docs/telephony.md).

Twilio's shape with ``snake_case`` keys and ``stream_id``: ``connected``,
``start`` (``media_format`` PCMU or PCMA at 8 kHz), ``media`` with a
``chunk`` number (Telnyx does not promise order: the server reorders by it),
``dtmf``, ``mark`` echoes, ``stop``. The server's messages carry no stream id.
"""

from __future__ import annotations

import uuid
from typing import Any

from benchmarks.callers.base import MarkStyle, Message, b64

ENCODINGS = {"mulaw": "PCMU", "alaw": "PCMA"}


class Telnyx(MarkStyle):
    name = "telnyx"
    path = "/telnyx"
    sid_key = "stream_id"
    sid_in_replies = False

    def __init__(
        self,
        *,
        sid: str | None = None,
        encoding: str = "mulaw",
        parameters: dict[str, Any] | None = None,
        token: str | None = None,
        strict: bool = False,
    ) -> None:
        """``encoding``: ``mulaw`` (PCMU) or ``alaw`` (PCMA)."""
        super().__init__(sid=sid or str(uuid.uuid4()), token=token, strict=strict)
        self.encoding = encoding
        self.parameters = dict(parameters or {})

    def opening(self) -> list[Message]:
        start = {
            "user_id": "u",
            "call_control_id": "v3:cc",
            "call_session_id": "cs",
            "from": "+15550001111",
            "to": "+15550002222",
            "custom_parameters": self.parameters,
            "media_format": {"encoding": ENCODINGS[self.encoding], "sample_rate": 8000, "channels": 1},
        }
        return [
            {"event": "connected", "version": "1.0.0"},
            {"event": "start", "sequence_number": self.next_sequence(), "stream_id": self.sid, "start": start},
        ]

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        n, ts = self._next_frame(timestamp_ms)
        return {
            "event": "media",
            "sequence_number": self.next_sequence(),
            "stream_id": self.sid,
            "media": {"track": "inbound", "chunk": str(n), "timestamp": str(ts), "payload": b64(chunk)},
        }

    def dtmf(self, digit: str) -> Message:
        return {"event": "dtmf", "stream_id": self.sid, "dtmf": {"digit": digit}}

    def played(self, name: Any) -> Message:
        return {"event": "mark", "stream_id": self.sid, "mark": {"name": name}}

    def closing(self) -> list[Message]:
        return [{"event": "stop", "sequence_number": self.next_sequence(), "stream_id": self.sid, "stop": {}}]
