"""Short-lived client secrets for browsers: what a page gets instead of the
server's ``--auth-token``.

A browser cannot keep a secret: a page that connects with the server's own
token hands it to every user, for good (it opens the carrier routes too, and
only a restart with a new one takes it back). As OpenAI's Realtime API does
with its ephemeral keys, the operator's backend asks the server for a secret
that opens a browser call and nothing else, for a minute
(``GET /v1/client_secret`` with the server token), and gives the page that.

A secret is ``fl_ek_<expiry>.<nonce>.<mac>``: the expiry in Unix seconds, a
random nonce, and an HMAC-SHA256 over both keyed by a key derived from the
server token with scrypt (slow on purpose: a page user holds a secret and
its payload, and with the token as the HMAC key could test guesses of the
token offline at a GPU's speed; now each guess costs an scrypt). No
state: every replica that shares the token checks it (their clocks must
agree to a few seconds), and none has to remember what it minted. It opens a
call on :data:`ROUTES` only, any number of times until it expires (a page
that reconnects needs no new one within that time); a call it opened lasts
as long as the call.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import time

PREFIX = "fl_ek_"
# Where the operator's backend asks for one (GET: the websockets server
# parses no other method).
PATH = "/v1/client_secret"
# The routes a browser's call uses: the native protocol (the call page) and
# the Realtime endpoint. Not the carriers' media routes, and not the route
# that mints more.
ROUTES = frozenset({"/v1/call", "/v1/realtime"})
DEFAULT_TTL_S = 60
MAX_TTL_S = 600
# Every character is one a websocket subprotocol may hold (an HTTP token):
# the page sends it as one, out of the URL.
SHAPE = re.compile(r"fl_ek_(\d{1,12})\.([A-Za-z0-9_-]{16,64})\.([A-Za-z0-9_-]{43})")
_CONTEXT = b"firstline client secret|"


@functools.lru_cache(maxsize=4)
def mac_key(root: str) -> bytes:
    """The MAC key for this server token: the same on every replica, derived
    once, at the server's start (scrypt takes tens of milliseconds: on the
    first secret's check it held the event loop, every call's audio with it)."""
    return hashlib.scrypt(root.encode(), salt=_CONTEXT, n=2**14, r=8, p=1, maxmem=64 * 1024 * 1024, dklen=32)


def _mac(root: str, payload: str) -> str:
    digest = hmac.new(mac_key(root), _CONTEXT + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def mint(root: str, ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> tuple[str, int]:
    """A secret valid for ``ttl_s`` (1 s to MAX_TTL_S), and when it expires."""
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be between 1 and {MAX_TTL_S} s, got {ttl_s:g}")
    expires_at = int((time.time() if now is None else now) + ttl_s)
    payload = f"{expires_at}.{secrets.token_urlsafe(18)}"
    return f"{PREFIX}{payload}.{_mac(root, payload)}", expires_at


def valid(root: str, token: str, now: float | None = None) -> bool:
    """Whether ``token`` is a secret ``root`` minted that has not expired."""
    match = SHAPE.fullmatch(token)
    if match is None:
        return False
    expiry, nonce, mac = match.groups()
    if not hmac.compare_digest(mac.encode(), _mac(root, f"{expiry}.{nonce}").encode()):
        return False
    now = time.time() if now is None else now
    # An expiry further out than any mint allows was not minted here.
    return now < int(expiry) <= now + MAX_TTL_S + 5
