"""OpenAI Realtime over a raw websocket: the client's side (docs/realtime.md).

``/v1/realtime?model=…`` with a bearer token; ``session.update`` sets the
audio formats, modalities and turn detection (GA shape, or the beta one
with ``beta=True`` and the ``OpenAI-Beta: realtime=v1`` header); audio goes
as ``input_audio_buffer.append``; ``conversation.item.truncate`` tells the
server how much of a reply played. Every server event parses as
:class:`~benchmarks.callers.base.Event`; an audio delta is also
:class:`~benchmarks.callers.base.Audio`.
"""

from __future__ import annotations

from typing import Any

from benchmarks.callers.base import Audio, Event, Message, ServerEvent, Wire, b64, unb64

FORMATS = {"audio/pcm": ("pcm16", 24000), "audio/pcmu": ("mulaw", 8000), "audio/pcma": ("alaw", 8000)}
BETA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")  # GA, beta
SERVER_VAD: dict[str, Any] = {"type": "server_vad"}


class Realtime(Wire):
    name = "realtime"
    path = "/v1/realtime"
    token_in_url = False  # a bearer header, as OpenAI's clients send it

    def __init__(
        self,
        *,
        fmt: str = "audio/pcm",
        audio_out: bool = True,
        beta: bool = False,
        turn_detection: dict[str, Any] | None = SERVER_VAD,
        instructions: str | None = None,
        model: str = "firstline",
        token: str | None = None,
        strict: bool = False,
        resume: str | None = None,
    ) -> None:
        """``fmt``: ``audio/pcm`` (24 kHz), ``audio/pcmu`` or ``audio/pcma``,
        both ways; ``audio_out``: reply audio (else text only);
        ``turn_detection``: the session's (``None``: push-to-talk)."""
        super().__init__(token=token, strict=strict)
        self.format = fmt
        self.encoding, self.rate = FORMATS[fmt]
        self.audio_out = audio_out
        self.beta = beta
        self.turn_detection = None if turn_detection is None else dict(turn_detection)
        self.instructions = instructions
        self.model = model
        # session.created's resume_token of an earlier session: re-attach to its conversation.
        self.resume = resume

    def query(self) -> dict[str, str]:
        return {"model": self.model, **({"resume": self.resume} if self.resume else {})}

    def headers(self) -> dict[str, str] | None:
        headers = dict(super().headers() or {})
        if self.beta:
            headers["OpenAI-Beta"] = "realtime=v1"
        return headers or None

    def session_update(self, event_id: str | None = "evt_update") -> dict[str, Any]:
        td = self.turn_detection
        if self.beta:
            session: dict[str, Any] = {
                "modalities": ["text", "audio"] if self.audio_out else ["text"],
                "input_audio_format": BETA_FORMATS[self.format],
                "output_audio_format": BETA_FORMATS[self.format],
                "turn_detection": td,
            }
        else:
            fmt: dict[str, Any] = {"type": self.format}
            if self.format == "audio/pcm":
                fmt["rate"] = 24000
            session = {
                "type": "realtime",
                "output_modalities": ["audio"] if self.audio_out else ["text"],
                "audio": {"input": {"format": fmt, "turn_detection": td}, "output": {"format": fmt}},
            }
        if self.instructions is not None:
            session["instructions"] = self.instructions
        msg: dict[str, Any] = {"type": "session.update", "session": session}
        if event_id is not None:
            msg["event_id"] = event_id
        return msg

    def opening(self) -> list[Message]:
        return [self.session_update()]

    def media(self, chunk: bytes, timestamp_ms: int | None = None) -> Message:
        self._next_frame(timestamp_ms)
        return {"type": "input_audio_buffer.append", "audio": b64(chunk)}

    def truncate(self, item_id: str, audio_end_ms: int) -> Message:
        """The caller heard ``audio_end_ms`` of item ``item_id``'s audio (barge-in)."""
        return {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                "audio_end_ms": audio_end_ms}  # fmt: skip

    def text_events(self, msg: dict[str, Any]) -> list[ServerEvent]:
        events: list[ServerEvent] = [Event(msg)]
        if msg.get("type") in AUDIO_DELTAS:
            events.append(Audio(unb64(msg.get("delta", "")), item=msg.get("item_id")))
        return events
