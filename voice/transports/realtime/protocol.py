"""What every Realtime event family shares: the audio formats, the beta
event names, the limits, and the error a refused client event raises."""

from __future__ import annotations

import uuid

from voice.call.start import MAX_REPLY_TOKENS, MAX_SYSTEM_PROMPT
from voice.transports.telephony import MalformedMessage

PATH = "/v1/realtime"

# Session audio format -> (encoding, sample rate). GA names, then beta names.
GA_FORMATS: dict[str, tuple[str, int]] = {
    "audio/pcm": ("pcm16", 24000),
    "audio/pcmu": ("mulaw", 8000),
    "audio/pcma": ("alaw", 8000),
}
BETA_FORMATS: dict[str, str] = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
BETA_NAMES: dict[str, str] = {
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "conversation.item.added": "conversation.item.created",
}
# Reply audio per output_audio.delta: 100 ms.
OUT_CHUNK_S = 0.1
# One client field of instructions (the whole prompt is bounded by voice.call.history).
MAX_INSTRUCTIONS = MAX_SYSTEM_PROMPT
MAX_OUTPUT_TOKENS = MAX_REPLY_TOKENS


# response.create that starts a new reply (no caller turn behind it): 8 at
# once, then one every 2 s (a text chat asks for one per message it sends),
# for all of a source address's connections together (not for an exempt one's).
UNSPOKEN_REPLY_BURST = 8
UNSPOKEN_REPLIES_PER_S = 0.5


class RealtimeError(MalformedMessage):
    """A client event we refuse, with the Realtime error code and param."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def output_modalities(value: object, param: str) -> list[str]:
    """A session's or a response's ``output_modalities`` (beta
    ``modalities``): ``["audio"]`` (with or without "text": audio comes with
    its transcript) or ``["text"]``."""
    if not isinstance(value, list) or not value or not set(value) <= {"text", "audio"}:
        raise RealtimeError("output_modalities must be ['text'] or ['audio']", "invalid_value", param)
    return ["audio"] if "audio" in value else ["text"]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def format_obj(name: str) -> dict[str, object]:
    rate = GA_FORMATS[name][1]
    return {"type": name, "rate": rate} if name == "audio/pcm" else {"type": name}
