"""Custom parameters a carrier passes through to the call (TwiML
``<Parameter>``, TeXML, Plivo extraHeaders, Exotel custom_parameters): one
reading for every carrier, so none imports another.

Whoever can place a call controls these values, so two of them are server
policy, not caller data: ``system_prompt`` is honoured only with
``--allow-custom-prompt``, and with ``--carrier-secret`` set the parameter
``firstline_secret`` must carry it (carriers without an upgrade signature
have nothing else that says the stream is really theirs)."""

from __future__ import annotations

import hmac
from typing import Any

from voice.call.start import Start
from voice.transports.media_json import CallRefused

SECRET_PARAMETER = "firstline_secret"
# Where the transports put the carrier's own call id among the parameters.
CALL_ID_PARAMETERS = ("callSid", "call_sid")


def start_from_parameters(
    encoding: str, rate: int, params: dict[str, Any], config: Any = None, carrier: str | None = None
) -> Start:
    """The call's Start from a carrier's custom parameters; ``config`` (the
    server's) says whether ``system_prompt`` may set the prompt and which
    ``firstline_secret`` is required. The rest is metadata. ``carrier``
    names whose call id (``callSid`` / ``call_sid``) keys the call's stored
    conversation (None: not kept)."""
    secret = getattr(config, "carrier_secret", None)
    if secret:
        given = params.get(SECRET_PARAMETER)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(errors="surrogatepass"), secret.encode()):
            raise CallRefused("unauthorized", "carrier secret missing or wrong")
    prompt = params.get("system_prompt") if getattr(config, "allow_custom_prompt", False) else None
    # The carrier's call id keys the conversation: a stream that re-attaches
    # for the same call (Twilio: <Connect action> -> a new <Stream>) picks it up.
    call_id = next((params[k] for k in CALL_ID_PARAMETERS if isinstance(params.get(k), str) and params[k]), None)
    return Start(
        encoding=encoding,
        sample_rate=rate,
        system_prompt=prompt if isinstance(prompt, str) and prompt.strip() else None,
        # The secret never reaches metadata (events, logs, traces).
        metadata={str(k): v for k, v in params.items() if k != SECRET_PARAMETER},
        resume_key=f"{carrier}:{call_id[:128]}" if carrier and call_id else None,
    )
