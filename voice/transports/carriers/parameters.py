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
from voice.transports.telephony import CallRefused

SECRET_PARAMETER = "firstline_secret"
# Proof, put in the TwiML by /twilio/reconnect, that a stream may pick up
# its call's stored conversation (voice/transports/carriers/twilio.py).
RESUME_PARAMETER = "firstline_resume"
# Server credentials among the parameters: never passed on as metadata.
CREDENTIAL_PARAMETERS = (SECRET_PARAMETER, RESUME_PARAMETER)


def start_from_parameters(
    encoding: str,
    rate: int,
    params: dict[str, Any],
    config: Any = None,
    carrier: str | None = None,
    call_id: object = None,
) -> Start:
    """The call's Start from a carrier's custom parameters; ``config`` (the
    server's) says whether ``system_prompt`` may set the prompt and which
    ``firstline_secret`` is required. The rest is metadata. ``carrier`` and
    ``call_id`` (the carrier's own field, never a custom parameter, which
    whoever places the call writes) key the call's stored conversation
    (None: not kept)."""
    secret = getattr(config, "carrier_secret", None)
    if secret:
        given = params.get(SECRET_PARAMETER)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(errors="surrogatepass"), secret.encode()):
            raise CallRefused("unauthorized", "carrier secret missing or wrong")
    prompt = params.get("system_prompt") if getattr(config, "allow_custom_prompt", False) else None
    return Start(
        encoding=encoding,
        sample_rate=rate,
        system_prompt=prompt if isinstance(prompt, str) and prompt.strip() else None,
        # Credentials never reach metadata (events, logs, traces).
        metadata={str(k): v for k, v in params.items() if k not in CREDENTIAL_PARAMETERS},
        resume_key=resume_key(carrier, call_id),
    )


def resume_key(carrier: str | None, call_id: object) -> str | None:
    """The store key of a carrier's call: a stream that re-attaches for the
    same call (Twilio: <Connect action> -> a new <Stream>) picks it up."""
    key = call_id[:128] if isinstance(call_id, str) and call_id else None
    return f"{carrier}:{key}" if carrier and key else None
