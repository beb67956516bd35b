"""Twilio's own authentication of the media websocket: ``X-Twilio-Signature``
on the upgrade, an HMAC-SHA1 of the URL Twilio connected to, keyed with the
account's auth token. (Twilio's HMAC-SHA256 mode is keyed with a separate
SharedKey secret, which this server does not hold: such upgrades are refused.)

The URL is the one Twilio saw, which behind a TLS proxy is not the one this
process serves: ``--public-url`` names it; without it the Host header and
the forwarded (or our own) scheme rebuild it. Checking uses the ``twilio``
library's :class:`RequestValidator`, so its rules (with and without the
default port, the query string as signed) are Twilio's, not a copy.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"

_WS_SCHEME = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}
_HTTP_SCHEME = {"https": "https", "http": "http", "wss": "https", "ws": "http"}


def candidate_urls(
    path: str, host: str | None, forwarded_proto: str | None, public_url: str | None, websocket: bool = True
) -> list[str]:
    """The URLs Twilio may have signed for a request to ``path`` (path plus
    query, as received). With ``public_url`` only that origin counts; without
    it, the Host header under the forwarded scheme, or under both ws and wss
    when no proxy says which (TLS usually ends before this process).
    ``websocket=False``: an HTTP request (the TwiML re-attach), http(s) URLs."""
    names = _WS_SCHEME if websocket else _HTTP_SCHEME
    if public_url:
        origin = urlsplit(public_url)
        schemes = [names.get(origin.scheme, origin.scheme)]
        netloc = origin.netloc
        prefix = origin.path.rstrip("/")
    else:
        if not host:
            return []
        proto = (forwarded_proto or "").split(",", 1)[0].strip().lower()
        schemes = [names[proto]] if proto in names else sorted(set(names.values()), reverse=True)
        netloc, prefix = host, ""
    route, _, query = path.partition("?")
    urls = []
    for scheme in schemes:
        urls.append(urlunsplit((scheme, netloc, prefix + route, query, "")))
        # RequestValidator adds a default port for https only; wss's is 443 too.
        if scheme in ("wss", "https") and ":" not in netloc.rsplit("]", 1)[-1]:
            urls.append(urlunsplit((scheme, f"{netloc}:443", prefix + route, query, "")))
    return urls


class TwilioSignatures:
    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)

    def valid(self, urls: list[str], signature: str | None) -> bool:
        """Whether ``signature`` signs one of ``urls`` (media websockets carry no body)."""
        if not signature:
            return False
        for url in urls:
            try:
                if self._validator.validate(url, {}, signature):
                    return True
            except ValueError:  # a caller's Host that is no URL ("evil:xx", "[::1"): not signed by Twilio
                continue
        return False


def check_public_url(value: str) -> str:
    """``--public-url``: the origin Twilio connects to, with its scheme; a bare
    host would make every signature check fail, so it is refused at start.
    Given as the stream's own ``wss://`` (or ``ws://``) it is kept as
    ``https://`` (``http://``): the re-attach TwiML's callback is an HTTP
    URL, and its stream URL is made from it."""
    parts = urlsplit(value)
    if parts.scheme not in _WS_SCHEME or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"--public-url must look like https://voice.example.com (got {value!r})")
    return urlunsplit((_HTTP_SCHEME[parts.scheme], parts.netloc, parts.path.rstrip("/"), "", ""))
