"""Server settings: one object composed of each package's own config."""

from __future__ import annotations

from dataclasses import dataclass, field

from asr.config import ASRConfig
from llm.config import LLMConfig


@dataclass
class ServerConfig:
    # Loopback unless told otherwise: a voice server is fronted by a proxy or
    # a carrier's media gateway, never exposed by accident.
    host: str = "127.0.0.1"
    port: int = 8765
    max_calls: int = 16
    # Sentences longer than this many words are cut at a clause boundary.
    sentence_max_words: int = 25
    asr: ASRConfig = field(default_factory=ASRConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
