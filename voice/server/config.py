"""Server settings: one object composed of each package's own config."""

from __future__ import annotations

from dataclasses import dataclass, field

from asr.config import ASRConfig
from llm.config import LLMConfig
from streaming.tts import TTSConfig
from voice.call.reply_policy import ReplyPolicy
from voice.server.admission import AdmissionConfig
from voice.server.limits import CallLimits


@dataclass
class ServerConfig:
    # Loopback unless told otherwise: a voice server is fronted by a proxy or
    # a carrier's media gateway, never exposed by accident.
    host: str = "127.0.0.1"
    port: int = 8765
    max_calls: int = 16
    # Sentences longer than this many words are cut at a clause boundary.
    sentence_max_words: int = 25
    # What of a reply the caller hears: sentence cap, loop guard (voice/call/reply_policy.py).
    reply: ReplyPolicy = field(default_factory=ReplyPolicy)
    # The agent speaks first on pickup: fixed text, or generated with these
    # instructions (None: the caller speaks first). Calls may set their own.
    greeting: str | None = None
    greeting_instructions: str | None = None
    asr: ASRConfig = field(default_factory=ASRConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # Per-call limits (idle timeout, stuck readers, drain deadline): voice/limits.py.
    limits: CallLimits = field(default_factory=CallLimits)
    # Load-based refusal of new calls beyond max_calls: voice/admission.py.
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    # Bearer token required on websocket upgrades (None: no auth; loopback bind).
    auth_token: str | None = None
    # Voice for the audio transports (telephony, Realtime); text-only calls never load it.
    tts: TTSConfig = field(default_factory=TTSConfig)
    # Asterisk AudioSocket is raw TCP, so it gets its own listener (None: off; 0: any free port).
    audiosocket_port: int | None = None
    # OpenTelemetry traces per turn (voice/tracing.py): off unless enabled.
    # Endpoint None with tracing on: the standard OTEL_EXPORTER_OTLP_* variables.
    tracing: bool = False
    otel_endpoint: str | None = None
    # The built-in browser call page (GET /, /demo; voice/server/web/). On by
    # default so `make serve` can be tried at once; production turns it off.
    demo_page: bool = True
