"""Custom parameters a carrier passes through to the call (TwiML
``<Parameter>``, TeXML, Plivo extraHeaders, Exotel custom_parameters): one
reading for every carrier, so none imports another."""

from __future__ import annotations

from typing import Any

from voice.call.start import Start


def start_from_parameters(encoding: str, rate: int, params: dict[str, Any]) -> Start:
    """Custom parameters a carrier passes through (TwiML ``<Parameter>``,
    TeXML, Plivo extraHeaders…): ``system_prompt`` sets the call's prompt;
    the rest is metadata."""
    prompt = params.get("system_prompt")
    return Start(
        encoding=encoding,
        sample_rate=rate,
        system_prompt=prompt if isinstance(prompt, str) and prompt.strip() else None,
        metadata={str(k): v for k, v in params.items()},
    )
