"""Exotel Voicebot streams: the carrier's side (docs/telephony.md).

Twilio's shape with ``stream_sid``: ``connected``, ``start`` (16-bit linear
PCM at 8 kHz, or 16 kHz when the stream asks for it), ``media`` of about
100 ms, ``dtmf``, ``mark`` echoes, ``stop``.
"""

from __future__ import annotations

import uuid
from typing import Any

from benchmarks.callers.base import MarkStyle, Message


class Exotel(MarkStyle):
    name = "exotel"
    path = "/exotel"
    sid_key = "stream_sid"
    frame_ms = 100  # Exotel sends about 100 ms per media message
    seq_key = "sequence_number"
    media_track = None
    numbered_replies = False

    def __init__(
        self,
        *,
        sid: str | None = None,
        rate: int = 8000,
        parameters: dict[str, Any] | None = None,
        token: str | None = None,
        strict: bool = False,
        call_sid: str | None = None,
    ) -> None:
        super().__init__(sid=sid or uuid.uuid4().hex[:10], token=token, strict=strict)
        # One per call, as Exotel's: the same one re-attaches to the call's stored conversation.
        self.call_sid = call_sid or uuid.uuid4().hex
        self.encoding = "pcm16"
        self.rate = rate
        self.parameters = dict(parameters or {})

    def opening(self) -> list[Message]:
        start = {
            "stream_sid": self.sid,
            "call_sid": self.call_sid,
            "account_sid": "acc",
            "from": "0",
            "to": "1",
            "custom_parameters": self.parameters,
            "media_format": {"encoding": "base64", "sample_rate": str(self.rate), "bit_rate": "16"},
        }
        return [
            {"event": "connected"},
            self.message("start", start),
        ]

    def dtmf(self, digit: str) -> Message:
        return self.message("dtmf", {"digit": digit, "duration": "120"}, numbered=False)

    def closing(self) -> list[Message]:
        stop = {"reason": "callended"}
        return [self.message("stop", stop)]
