"""Twilio Media Streams, bidirectional: the carrier's side (docs/telephony.md).

JSON text frames only: ``connected`` and ``start`` open the stream, ``media``
carries 20 ms of base64 μ-law 8 kHz, ``dtmf`` a key, ``mark`` echoes the
server's marks once the audio before them has played (and at once on
``clear``), ``stop`` ends it. Every message but ``connected`` has the next
``sequenceNumber``; media also numbers its ``chunk``.

firstline's benchmark side channel (``parameters={"firstline_events": "1"}``)
brings the session's events as ``{"event": "firstline", "firstline": …}``:
they parse as :class:`~benchmarks.callers.base.Event`.
"""

from __future__ import annotations

import uuid
from typing import Any

from benchmarks.callers.base import Event, MarkStyle, Message, ServerEvent

ACCOUNT_SID = "AC" + "0" * 32


class Twilio(MarkStyle):
    name = "twilio"
    path = "/twilio"

    def __init__(
        self,
        *,
        sid: str | None = None,
        call_sid: str | None = None,
        parameters: dict[str, Any] | None = None,
        token: str | None = None,
        strict: bool = False,
    ) -> None:
        """``parameters``: the ``<Parameter>``s of the TwiML, as
        ``start.customParameters``."""
        super().__init__(sid=sid or "MZ" + uuid.uuid4().hex, token=token, strict=strict)
        self.call_sid = call_sid or "CA" + uuid.uuid4().hex
        self.parameters = dict(parameters or {})

    def opening(self) -> list[Message]:
        start = {
            "accountSid": ACCOUNT_SID,
            "streamSid": self.sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": self.parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        return [
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            self.message("start", start),
        ]

    def dtmf(self, digit: str) -> Message:
        return self.message("dtmf", {"track": "inbound_track", "digit": digit})

    def closing(self) -> list[Message]:
        stop = {"accountSid": ACCOUNT_SID, "callSid": self.call_sid}
        return [self.message("stop", stop)]

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        if msg.get("event") == "firstline":  # the benchmark side channel
            return [Event(msg["firstline"])]
        return super().text_events(msg)
