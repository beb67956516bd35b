"""How a call starts, whatever its transport: the parameters every transport
turns its own handshake into (:class:`Start`), the error a caller's input
raises (:class:`ProtocolError`, whose ``code`` goes back to the client), and
the per-frame audio check the session applies to every transport's audio.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

# The token a client re-attaches a call with (native ready.resume_token,
# Realtime session.created.session.resume_token): 24 random bytes, URL-safe
# base64. Whoever holds it gets the call's conversation back.
RESUME_TOKEN_BYTES = 24
RESUME_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")


def new_resume_token() -> str:
    return secrets.token_urlsafe(RESUME_TOKEN_BYTES)


MAX_AUDIO_FRAME = 64 * 1024  # 2 s of 16 kHz pcm16; real clients send 20-100 ms
MAX_SYSTEM_PROMPT = 8 * 1024
MAX_GREETING = 1024
# The longest reply a call may ask for (native options, Realtime, sampling).
MAX_REPLY_TOKENS = 1024


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Start:
    encoding: str = "pcm16"
    sample_rate: int = 16000
    system_prompt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    endpoint_silence_s: float | None = None
    partials: bool | None = None
    resume_grace_s: float | None = None  # None: the server's (asr_config.resume_grace_s)
    max_tokens: int | None = None
    reply_max_sentences: int | None = None  # None: the server's (--reply-max-sentences)
    # The reply's first piece may be a clause of this many words (0: whole
    # sentences; None: the server's --first-clause-words): for a client
    # whose TTS takes fragments well.
    first_clause_words: int | None = None
    # False: no server-side end of turn; the client commits (push-to-talk).
    auto_turns: bool = True
    # Native protocol: speak the reply back as binary frames in the call's own
    # encoding and rate (default: text only, for clients with their own TTS).
    reply_audio: bool = False
    # The agent speaks first: this text, or a reply generated with these
    # instructions (default: the server's --greeting / --greeting-instructions).
    greeting: str | None = None
    # False: the server's greeting is not spoken on this call (a Realtime
    # client greets with its own response.create, as on OpenAI; the server's
    # would be generated with no response to carry it, unseen and unheard,
    # and hold off the client's first create).
    server_greeting: bool = True
    # False: the caller's speech does not stop a reply; the client does
    # (Realtime with turn_detection null or interrupt_response false, as on
    # OpenAI). speech.started still goes out, marked barge_in: false.
    barge_in: bool = True
    # Per-call sampling overrides (llm/sampling.py field names), checked at start.
    sampling: dict[str, Any] | None = None
    greeting_instructions: str | None = None
    # Where the call's conversation is kept between turns and, when a call
    # re-attaches under the same key, picked up from (voice/call/store.py):
    # "twilio:<callSid>", "native:<resume token>"; None: not kept.
    resume_key: str | None = None
    # Native protocol: the token handed back in ready.resume_token (a
    # client re-attaches with start.options.resume = it).
    resume_token: str | None = None
    # Whether something may be stored under resume_key already: a token this
    # server just made up cannot have a past, so the store is not asked.
    may_resume: bool = True

    def fresh_token(self) -> None:
        """A new resume token (and key) in place of the client's."""
        assert self.resume_token and self.resume_key and self.resume_key.endswith(self.resume_token)
        token = new_resume_token()
        self.resume_key = self.resume_key[: -len(self.resume_token)] + token
        self.resume_token = token


def check_audio_frame(payload: bytes, encoding: str) -> None:
    if len(payload) > MAX_AUDIO_FRAME:
        raise ProtocolError("frame_too_large", f"audio frame of {len(payload)} bytes; the limit is {MAX_AUDIO_FRAME}")
    if encoding == "pcm16" and len(payload) % 2:
        raise ProtocolError("invalid_audio", f"pcm16 frame has an odd number of bytes ({len(payload)})")
