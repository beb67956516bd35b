"""firstline's native websocket protocol, version 1 (see docs/protocol.md).

Client -> server: JSON text frames ``start`` / ``input.commit`` / ``stop`` /
``response.audio.played``, and audio as binary frames. Server -> client: JSON
text frames, and reply audio as binary frames when asked for. Parsing never
raises anything but :class:`ProtocolError`, whose ``code`` goes to the client
in an ``error`` event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from streaming.codecs import ENCODINGS, SAMPLE_RATES
from streaming.shown import shown_value
from voice.call.start import (
    MAX_GREETING,
    MAX_REPLY_TOKENS,
    MAX_SYSTEM_PROMPT,
    RESUME_TOKEN,
    ProtocolError,
    Start,
    new_resume_token,
)
from voice.transports.media_json import MAX_TEXT_FRAME

PROTOCOL_VERSION = 1


@dataclass
class Commit:
    pass


@dataclass
class Stop:
    pass


@dataclass
class Played:
    """The client played a reply sentence's audio to its end (echo of a
    ``response.audio.mark``); without these the playout clock decides."""

    name: str


ClientMessage = Start | Commit | Stop | Played


def parse_text(raw: str) -> ClientMessage:
    if len(raw) > MAX_TEXT_FRAME:
        raise ProtocolError("message_too_large", f"text frame over {MAX_TEXT_FRAME} bytes")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError, not just JSONDecodeError: an integer literal over
        # Python's 4300-digit limit raises a bare ValueError from json.
        raise ProtocolError("invalid_json", f"text frame is not JSON: {str(exc)[:200]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("invalid_message", "a message must be a JSON object")
    kind = msg.get("type")
    if kind == "start":
        return _parse_start(msg)
    if kind == "input.commit":
        return Commit()
    if kind == "stop":
        return Stop()
    if kind == "response.audio.played":
        name = msg.get("name")
        if not isinstance(name, str) or len(name) > 64:
            raise ProtocolError("invalid_message", "'response.audio.played' needs the mark's 'name'")
        return Played(name)
    if not isinstance(kind, str):
        raise ProtocolError("invalid_message", "message has no string 'type'")
    raise ProtocolError("unknown_event", f"unknown message type {kind[:64]!r}")


def _parse_start(msg: dict[str, Any]) -> Start:
    version = msg.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"protocol version {version!r} not supported (use 1)")
    audio = msg.get("audio", {})
    if not isinstance(audio, dict):
        raise ProtocolError("invalid_message", "'audio' must be an object")
    encoding = audio.get("encoding", "pcm16")
    if encoding not in ENCODINGS:
        raise ProtocolError(
            "unsupported_encoding", f"encoding {shown_value(encoding)} not supported; use one of {', '.join(ENCODINGS)}"
        )
    rate = audio.get("sample_rate", 16000)
    if isinstance(rate, bool) or rate not in SAMPLE_RATES:
        raise ProtocolError(
            "unsupported_sample_rate", f"sample_rate {shown_value(rate)} not supported; use one of {SAMPLE_RATES}"
        )
    if encoding in ("mulaw", "alaw") and rate != 8000:
        raise ProtocolError("unsupported_sample_rate", f"{encoding} is defined at 8000 Hz only")
    prompt = msg.get("system_prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_SYSTEM_PROMPT):
        raise ProtocolError("invalid_message", f"'system_prompt' must be a string of at most {MAX_SYSTEM_PROMPT} chars")
    metadata = msg.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ProtocolError("invalid_message", "'metadata' must be an object")
    options = msg.get("options", {})
    if not isinstance(options, dict):
        raise ProtocolError("invalid_message", "'options' must be an object")
    endpoint_ms = options.get("endpoint_silence_ms")
    if endpoint_ms is not None and (
        isinstance(endpoint_ms, bool) or not isinstance(endpoint_ms, int | float) or not 100 <= endpoint_ms <= 5000
    ):
        raise ProtocolError("invalid_message", "'options.endpoint_silence_ms' must be a number in 100..5000")
    grace_ms = options.get("resume_grace_ms")
    if grace_ms is not None and (
        isinstance(grace_ms, bool) or not isinstance(grace_ms, int | float) or not 0 <= grace_ms <= 5000
    ):
        raise ProtocolError("invalid_message", "'options.resume_grace_ms' must be a number in 0..5000 (0: off)")
    partials = options.get("partials")
    if partials is not None and not isinstance(partials, bool):
        raise ProtocolError("invalid_message", "'options.partials' must be a boolean")
    max_sentences = options.get("reply_max_sentences")
    if max_sentences is not None and (
        isinstance(max_sentences, bool) or not isinstance(max_sentences, int) or not 0 <= max_sentences <= 20
    ):
        raise ProtocolError("invalid_message", "'options.reply_max_sentences' must be an integer in 0..20 (0: no cap)")
    clause_words = options.get("first_clause_words")
    if clause_words is not None and (
        isinstance(clause_words, bool) or not isinstance(clause_words, int) or not 0 <= clause_words <= 20
    ):
        raise ProtocolError("invalid_message", "'options.first_clause_words' must be an integer in 0..20 (0: off)")
    max_tokens = options.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_REPLY_TOKENS
    ):
        raise ProtocolError("invalid_message", f"'options.max_tokens' must be an integer in 1..{MAX_REPLY_TOKENS}")
    reply_audio = options.get("reply_audio", False)
    if not isinstance(reply_audio, bool):
        raise ProtocolError("invalid_message", "'options.reply_audio' must be a boolean")
    sampling = options.get("sampling")
    if sampling is not None and (not isinstance(sampling, dict) or len(sampling) > 32):
        raise ProtocolError("invalid_message", "'options.sampling' must be an object of sampling fields")
    greetings = {}
    for key in ("greeting", "greeting_instructions"):
        value = options.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > MAX_GREETING):
            raise ProtocolError(
                "invalid_message", f"'options.{key}' must be a non-empty string of at most {MAX_GREETING} chars"
            )
        greetings[key] = value.strip() if value else None
    resume = options.get("resume")
    if resume is not None and (not isinstance(resume, str) or not RESUME_TOKEN.fullmatch(resume)):
        raise ProtocolError("invalid_message", "'options.resume' must be the resume_token of an earlier 'ready'")
    # A new call gets a token nobody can guess: whoever holds it gets the
    # call's conversation back, so it is handed only to this client.
    token = resume or new_resume_token()
    return Start(
        encoding=encoding,
        sample_rate=int(rate),
        system_prompt=prompt,
        resume_key=f"native:{token}",
        resume_token=token,
        may_resume=resume is not None,
        metadata=metadata,
        endpoint_silence_s=None if endpoint_ms is None else endpoint_ms / 1000.0,
        partials=partials,
        resume_grace_s=None if grace_ms is None else grace_ms / 1000.0,
        max_tokens=max_tokens,
        reply_max_sentences=max_sentences,
        first_clause_words=clause_words,
        reply_audio=reply_audio,
        sampling=sampling,
        greeting=greetings["greeting"],
        greeting_instructions=greetings["greeting_instructions"],
    )
