"""Twilio's own authentication of the media websocket: ``X-Twilio-Signature``
on the upgrade, an HMAC-SHA1 (or SHA-256 with a shared key) of the URL Twilio
connected to, keyed with the account's auth token.

The URL is the one Twilio saw, which behind a TLS proxy is not the one this
process serves: ``--public-url`` names it; without it the Host header and
the forwarded (or our own) scheme rebuild it. Checking uses the ``twilio``
library's :class:`RequestValidator`, so its rules (with and without the
default port, the query string as signed) are Twilio's, not a copy.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator, get_signature_algorithm

SIGNATURE_HEADER = "X-Twilio-Signature"
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"

_WS_SCHEME = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}


def candidate_urls(path: str, host: str | None, forwarded_proto: str | None, public_url: str | None) -> list[str]:
    """The URLs Twilio may have signed for a request to ``path`` (path plus
    query, as received). With ``public_url`` only that origin counts; without
    it, the Host header under the forwarded scheme, or under both ws and wss
    when no proxy says which (TLS usually ends before this process)."""
    if public_url:
        origin = urlsplit(public_url)
        schemes = [_WS_SCHEME.get(origin.scheme, origin.scheme)]
        netloc = origin.netloc
        prefix = origin.path.rstrip("/")
    else:
        if not host:
            return []
        proto = (forwarded_proto or "").split(",", 1)[0].strip().lower()
        schemes = [_WS_SCHEME[proto]] if proto in _WS_SCHEME else ["wss", "ws"]
        netloc, prefix = host, ""
    route, _, query = path.partition("?")
    urls = []
    for scheme in schemes:
        urls.append(urlunsplit((scheme, netloc, prefix + route, query, "")))
        # RequestValidator adds a default port for https only; wss's is 443 too.
        if scheme == "wss" and ":" not in netloc.rsplit("]", 1)[-1]:
            urls.append(urlunsplit((scheme, f"{netloc}:443", prefix + route, query, "")))
    return urls


class TwilioSignatures:
    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)

    def valid(self, urls: list[str], signature: str | None, settings_header: str | None = None) -> bool:
        """Whether ``signature`` signs one of ``urls`` (media websockets carry no body)."""
        if not signature:
            return False
        algorithm = get_signature_algorithm(settings_header)
        return any(self._validator.validate(url, {}, signature, algorithm) for url in urls)
