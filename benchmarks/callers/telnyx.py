"""Telnyx media streaming, bidirectional: the carrier's side (docs/telephony.md).

Twilio's shape with ``snake_case`` keys and ``stream_id``: ``connected``,
``start`` (``media_format`` PCMU or PCMA at 8 kHz), ``media`` with a
``chunk`` number (Telnyx does not promise order: the server reorders by it),
``dtmf``, ``mark`` echoes, ``stop``. The server's messages carry no stream id.
"""

from __future__ import annotations

import uuid
from typing import Any

from benchmarks.callers.base import MarkStyle, Message

ENCODINGS = {"mulaw": "PCMU", "alaw": "PCMA"}


class Telnyx(MarkStyle):
    name = "telnyx"
    path = "/telnyx"
    sid_key = "stream_id"
    sid_in_replies = False
    seq_key = "sequence_number"
    numbered_replies = False

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

    @property
    def reply_encoding(self) -> str:
        # Telnyx plays our audio in the stream's bidirectional codec (PCMU
        # unless set), whatever the caller's: the server is told it per call.
        named = str(self.parameters.get("bidirectional_codec", "PCMU")).upper()
        return {v: k for k, v in ENCODINGS.items()}[named]

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
            self.message("start", start),
        ]

    def dtmf(self, digit: str) -> Message:
        return self.message("dtmf", {"digit": digit}, numbered=False)

    def closing(self) -> list[Message]:
        return [self.message("stop", {})]
