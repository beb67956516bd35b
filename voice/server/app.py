"""The websocket server: HTTP health endpoints, call admission, routing.

Routes: ``/v1/call`` (native protocol). ``/healthz`` answers 200 while the
process runs; ``/readyz`` answers 200 only once the models are warm. ``/``
(and ``/demo``) is the built-in browser call page, static files from
``voice/server/web/`` (off with ``--no-demo``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http
import ipaddress
import json
import logging
import signal
import time
from collections.abc import Sequence
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from streaming.addresses import Network, address_allowed, parse_networks
from voice.call.store import StoreError
from voice.server import client_secrets
from voice.server.admission import AdmissionController, Refusal
from voice.server.config import ServerConfig
from voice.server.limits import MALFORMED_FLOOD, CallEnd, FloodGuardedConnection, bind_source, guard_of
from voice.server.metrics import CONTENT_TYPE
from voice.server.registry import CallRegistry, CallTicket
from voice.server.routes import NATIVE_PATH, WS_ROUTES, CallHandler
from voice.server.runtime import Runtime
from voice.server.signatures import SIGNATURE_HEADER, candidate_urls
from voice.transports.audiosocket import start_audiosocket
from voice.transports.carriers import twilio
from voice.transports.carriers.parameters import RESUME_PARAMETER, SECRET_PARAMETER, resume_key
from voice.transports.media_json import header_values

log = logging.getLogger(__name__)
# After a drain, what the call handlers get to release their calls (a state
# write, a playout's close) beyond the close handshake's own limit.
HANDLERS_RELEASE_S = 5.0

# websockets' own hard cap, a quarter above the protocols' own frame limit
# (1 MiB, voice/transports/media_json.py): a frame between the two is read
# and refused with an error event, the call going on; only one past this
# closes the connection (1009, message too big).
WS_MAX_SIZE = (1 << 20) + (1 << 18)
# Frames websockets reads ahead of the handler per connection (its default
# is 16): with WS_MAX_SIZE frames that is the most a client that sends
# faster than its call reads can pin, 5 MiB here instead of 20. A call's
# frames are 20 ms of audio read as they come, so this only ever fills for
# a client pushing large frames; past it TCP holds the rest.
WS_MAX_QUEUE = 4

# The browser call page: URL path -> file in the voice.server.web package.
# A fixed allow-list, never a path joined from the request, so no URL can
# reach another file.
DEMO_FILES: dict[str, str] = {
    "/": "index.html",
    "/demo": "index.html",
    "/demo/app.js": "app.js",
    "/demo/capture-worklet.js": "capture-worklet.js",
    "/demo/style.css": "style.css",
    "/demo/favicon.svg": "favicon.svg",
    "/favicon.ico": "favicon.svg",  # browsers ask for it whatever the page says
}
_DEMO_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}
# Same-origin scripts and styles only: no inline code, no CDN, no frames.
# ws:/wss: are listed because older browsers do not count a websocket to the
# page's own host as 'self' (the server's Origin check refuses other sites).
DEMO_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self' ws: wss:; media-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _twiml(text: str) -> Response:
    body = text.encode()
    response = Response(http.HTTPStatus.OK.value, "OK", Headers())
    response.headers["Content-Type"] = "text/xml; charset=utf-8"
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-store"
    response.body = body
    return response


def _json_response(status: http.HTTPStatus, body: dict[str, object]) -> Response:
    response = Response(status.value, status.phrase, Headers())
    response.headers["Content-Type"] = "application/json"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.body = json.dumps(body).encode()
    response.headers["Content-Length"] = str(len(response.body))
    return response


def _refused(refusal: Refusal) -> Response:
    response = _json_response(http.HTTPStatus(refusal.status), {"error": refusal.message, "reason": refusal.reason})
    response.headers["Retry-After"] = str(refusal.retry_after_s)
    return response


def _redirect(location: str) -> Response:
    response = Response(http.HTTPStatus.PERMANENT_REDIRECT.value, "Permanent Redirect", Headers())
    response.headers["Location"] = location
    response.headers["Content-Length"] = "0"
    response.headers["Connection"] = "close"
    return response


def _demo_response(name: str) -> Response:
    body = resources.files("voice.server.web").joinpath(name).read_bytes()
    response = Response(http.HTTPStatus.OK.value, "OK", Headers())
    response.headers["Content-Type"] = _DEMO_TYPES[name.rsplit(".", 1)[-1]]
    response.headers["Content-Length"] = str(len(body))
    # Revalidate every time: an upgraded server must never run a stale app.js.
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = DEMO_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Permissions-Policy"] = "microphone=(self)"
    # websockets closes the connection after a non-upgrade answer; saying so
    # keeps browsers from reusing a socket that is about to go.
    response.headers["Connection"] = "close"
    response.body = body
    return response


def page_url(host: str, port: int) -> str:
    """The call page's URL as a browser on this machine reaches it."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"  # a wildcard bind is reachable on loopback
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


# How long a /metrics render is served again to addresses not exempt.
METRICS_REUSE_S = 1.0


def _address_of(connection: ServerConnection) -> str | None:
    """The peer's IP address (the proxy's, behind one)."""
    try:
        remote = connection.remote_address
    except Exception:  # a transport already gone
        return None
    return str(remote[0]) if remote else None


def _caller_address(connection: ServerConnection, request: Request, trusted: list[Network]) -> str | None:
    """The caller's address: the peer's, or behind a trusted proxy the
    right-most X-Forwarded-For entry that is not a trusted proxy (entries
    to its left were written by the caller and prove nothing)."""
    peer = _address_of(connection)
    if not trusted or not address_allowed(peer, trusted):
        return peer
    hops = [_without_port(h) for value in request.headers.get_all("X-Forwarded-For") for h in value.split(",")]
    for hop in reversed([h for h in hops if h]):
        if not address_allowed(hop, trusted):
            if _is_ip(hop):
                return hop
            # Garbage from a misconfigured hop: the proxy's, counted as one
            # caller, which caps the whole tier at one caller's share. Said
            # once (a misconfigured proxy would say it on every connection).
            global _garbage_hop_said
            if not _garbage_hop_said:
                _garbage_hop_said = True
                log.warning("X-Forwarded-For hop that is no address; callers behind %s count as one", peer)
            return peer
    return peer


_garbage_hop_said = False  # a misconfigured proxy's hop, said once per process


def _without_port(hop: str) -> str:
    """An X-Forwarded-For entry as an address: some balancers (Azure
    Application Gateway) write ``IP:port`` or ``[v6]:port``, and taken as
    garbage every caller behind them was the proxy, one source."""
    hop = hop.strip()
    if hop.startswith("["):
        return hop[1:].split("]", 1)[0]
    host, sep, port = hop.rpartition(":")
    if sep and host.count(":") == 0 and port.isdigit():  # IPv4:port (a bare IPv6 has several colons)
        return host
    return hop


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _origin_of(host: str | None, forwarded_proto: str | None) -> str | None:
    """``https://host`` as the carrier reached us (TLS ends at the proxy,
    which says so in X-Forwarded-Proto; no proxy: plain http)."""
    if not host or any(c in host for c in "/?#@ \\<>\"'"):
        return None
    proto = (forwarded_proto or "").split(",", 1)[0].strip().lower()
    origin = f"{'https' if proto == 'https' else 'http'}://{host}"
    try:
        urlsplit(origin).port  # noqa: B018 (parses it: "[x" or ":99999" raise ValueError)
    except ValueError:
        return None  # a 400, not a 500 with an ERROR traceback per request
    return origin


def _query_int(path: str, name: str, default: int) -> int:
    values = parse_qs(urlsplit(path).query).get(name)
    try:
        return max(1, min(1000, int(values[0]))) if values else default
    except ValueError:
        return default


class BadHeaders(ValueError):
    """A header the checks read came more than once: refused, not guessed at."""


def _header(request: Request, name: str) -> str | None:
    """One header's value. Sent twice, which one would a proxy have checked?"""
    values = request.headers.get_all(name)
    if len(values) > 1:
        raise BadHeaders(name)
    return values[0] if values else None


# A browser cannot set headers on a websocket; it can offer subprotocols,
# which stay out of URLs and so out of proxies' access logs. OpenAI's browser
# clients send the key as ``openai-insecure-api-key.<key>``; the call page
# sends ``firstline-token.<token>``.
TOKEN_SUBPROTOCOLS = ("openai-insecure-api-key.", "firstline-token.", "firstline-token-b64.")
# A token a subprotocol cannot hold as it is (a base64 one: '/', '='), base64url-encoded.
B64_TOKEN_SUBPROTOCOL = "firstline-token-b64."


def _select_subprotocol(connection: ServerConnection, offered: Sequence[str]) -> Subprotocol | None:
    """The first subprotocol offered that is not a credential (``realtime``
    from OpenAI's clients, ``firstline`` from the call page): a browser that
    offered some fails the connection unless one is echoed back, and a
    token is never echoed."""
    return next((Subprotocol(p) for p in offered if not p.startswith(TOKEN_SUBPROTOCOLS)), None)


def _unb64(text: str) -> str:
    """A base64url token subprotocol's token; one that does not decode is
    kept as sent (it matches no token)."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return text


def _token_of(request: Request) -> str | None:
    scheme, _, token = (_header(request, "Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for offered in header_values(request, "Sec-WebSocket-Protocol"):
        for prefix in TOKEN_SUBPROTOCOLS:
            if offered.startswith(prefix) and len(offered) > len(prefix):
                token = offered[len(prefix) :]
                return _unb64(token) if prefix == B64_TOKEN_SUBPROTOCOL else token
    # Carriers' media websockets cannot set headers; they can only put the
    # token in the stream URL, percent-encoded like any query value. (The
    # log filter redacts it by value, both forms.)
    tokens = parse_qs(request.path.partition("?")[2]).get("token")
    return tokens[0] if tokens else None


def _origin_ok(request: Request, allowed: list[str], public_url: str | None) -> bool:
    """A browser's websocket must come from this server's own page (or an
    allowed origin): browsers apply no same-origin rule to websockets, so any
    site a user visits could otherwise drive calls here. Carriers and SDKs
    send no Origin and are not affected."""
    origin = _header(request, "Origin")
    if origin is None:
        return True
    if origin.rstrip("/").lower() in allowed:
        return True
    try:
        host = urlsplit(origin).netloc.lower()
    except ValueError:  # "http://[x": refused like any foreign origin, not a 500 with a traceback
        return False
    return host == (_header(request, "Host") or "").lower() and _own_name(host, public_url)


def _own_name(host: str, public_url: str | None) -> bool:
    """A page's own host names this server only when it is an address, a
    loopback name or --public-url's host. Any other name may be a site that
    re-pointed its DNS here (DNS rebinding: the page and the Host header
    then agree), so it must be named with --allow-origin."""
    try:
        name = urlsplit("//" + host).hostname or ""
    except ValueError:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return public_url is not None and urlsplit(public_url).hostname == name


class VoiceServer:
    def __init__(self, config: ServerConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime(config)
        # A borrowed runtime (tests: a second listener on the warm models) is
        # neither started nor closed here.
        self._owns_runtime = runtime is None
        self._server: Server | None = None
        self.audiosocket: asyncio.Server | None = None
        self.admission = AdmissionController(config.admission, config.max_calls)
        self.runtime.metrics.ttfs_listeners.append(self.admission.record_ttfs)
        # Auth, admission (one max_calls for every listener), per-address
        # cap and drain: voice/server/registry.py.
        self.registry = CallRegistry(self.runtime, self.admission, config)
        # Websocket connections admitted at the upgrade -> their ticket. Counted
        # there, not in the handler, so a burst of simultaneous upgrades cannot
        # all slip past max_calls before the first handler runs.
        self._tickets: dict[ServerConnection, CallTicket] = {}
        self._trusted_proxies = parse_networks(config.trusted_proxies)
        # /metrics is open (docs/security.md: block it at the proxy); past an
        # exempt address (a local Prometheus, --per-address-exempt) a render
        # is served again for METRICS_REUSE_S: a flood of scrapes from
        # anywhere else costs the shared loop one render a second, not each.
        self._metrics_rendered: tuple[float, bytes] | None = None
        if self._owns_runtime:  # the gauge counts every listener's calls, not one transport family's
            self.runtime.metrics.active.set_function(self.registry.live_calls)
        self._hurry = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self.registry.draining

    @property
    def ready(self) -> bool:
        # Live calls stay up while the LLM restarts (their turns get an error
        # event or wait for it); readiness tells a load balancer to send new
        # ones elsewhere once the outage outlasts the admission grace.
        grace = self.registry.admission.config.llm_down_grace_s
        if grace is None:  # admission never refuses for the LLM: readiness still says whether one is up
            return self.runtime.ready and not self.draining and self.runtime.llm_available
        return self.runtime.ready and not self.draining and self.runtime.llm_refusal(grace) is None

    def _metrics_body(self, address: str | None) -> bytes:
        """The metrics as now, or (asked from an address not exempt) as
        rendered up to METRICS_REUSE_S ago: each render takes the loop
        every call shares for milliseconds."""
        now = time.monotonic()
        rendered = self._metrics_rendered
        if self.registry.exempt_address(address) or rendered is None or now - rendered[0] >= METRICS_REUSE_S:
            rendered = self._metrics_rendered = (now, self.runtime.metrics.render())
        return rendered[1]

    def _live_calls(self) -> int:
        """Calls up on every listener (websockets and AudioSocket together)."""
        return self.registry.live_calls()

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _json_response(http.HTTPStatus.OK, {"status": "ok"})
        if path == "/readyz":
            status = http.HTTPStatus.OK if self.ready else http.HTTPStatus.SERVICE_UNAVAILABLE
            body: dict[str, object] = {"ready": self.ready, "startup_s": self.runtime.startup_s}
            if self.draining:
                body["draining"] = True
            if self.runtime.ready and not self.runtime.llm_available:
                body["llm_available"] = False
            return _json_response(status, body)
        if path == "/metrics":
            response = Response(http.HTTPStatus.OK.value, "OK", Headers())
            response.headers["Content-Type"] = CONTENT_TYPE
            response.body = self._metrics_body(_caller_address(connection, request, self._trusted_proxies))
            response.headers["Content-Length"] = str(len(response.body))
            return response
        if self.config.demo_page and path in DEMO_FILES and "Upgrade" not in request.headers:
            return _demo_response(DEMO_FILES[path])
        if self.config.demo_page and path == "/demo/" and "Upgrade" not in request.headers:
            # The page's links are relative: from /demo/ they would miss.
            # A relative Location keeps a proxy's path prefix.
            return _redirect("../demo")
        if path == client_secrets.PATH and "Upgrade" not in request.headers:
            return self._client_secret(request, _caller_address(connection, request, self._trusted_proxies))
        if path == twilio.RECONNECT_PATH and "Upgrade" not in request.headers:
            return await self._twilio_reattach(request, _caller_address(connection, request, self._trusted_proxies))
        if path not in WS_ROUTES:
            return _json_response(http.HTTPStatus.NOT_FOUND, {"error": f"no such route; calls go to {NATIVE_PATH}"})
        address = _caller_address(connection, request, self._trusted_proxies)
        try:
            refused = self._authenticate(path, request, address)
        except BadHeaders as exc:
            self.registry.unauthorized(path, address, f"{exc} header sent more than once")
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"error": f"duplicate {exc} header"})
        if refused is not None:
            return refused
        ticket = self.registry.admit(path, address, gone=lambda: connection.state is State.CLOSED)
        if isinstance(ticket, Refusal):
            return _refused(ticket)
        ticket.stop = lambda end: self._end_ws(connection, end)
        bind_source(connection, None if ticket.exempt else ticket.address, self.registry.per_source)
        if isinstance(connection, FloodGuardedConnection):
            # Flooded before its call has a guard (pings in the same write as
            # the upgrade, read while this ran or before the handler built
            # it): ended as abuse all the same, its address cooled down.
            connection.on_flood = lambda: self.registry.release(ticket, MALFORMED_FLOOD)
            if connection.flooded:
                connection.on_flood()
        # An upgrade that fails after admission never reaches the handler
        # that would pop its entry: forget those here.
        self._tickets = {c: t for c, t in self._tickets.items() if c.state is not State.CLOSED}
        self._tickets[connection] = ticket
        return None

    def _client_secret(self, request: Request, address: str | None) -> Response:
        """A short-lived secret for a browser's call (client_secrets.py),
        for the operator's backend, which holds the server's token: only
        that token in the Authorization header mints one (not a query or a
        subprotocol, which a page would have to hold; not a client secret)."""
        root = self.config.auth_token
        if root is None:
            return _json_response(
                http.HTTPStatus.NOT_FOUND, {"error": "no --auth-token: calls need no token, so no client secret"}
            )
        try:
            scheme, _, given = (_header(request, "Authorization") or "").partition(" ")
        except BadHeaders:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"error": "duplicate Authorization header"})
        # No route: the server's token only, never a client secret.
        if scheme.lower() != "bearer" or not self.registry.token_ok(given.strip() or None):
            self.registry.unauthorized(client_secrets.PATH, address, "missing or wrong bearer token")
            response = _json_response(http.HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
            response.headers["WWW-Authenticate"] = 'Bearer realm="firstline"'
            return response
        asked = parse_qs(urlsplit(request.path).query).get("ttl_s", [str(client_secrets.DEFAULT_TTL_S)])[0]
        try:
            value, expires_at = client_secrets.mint(root, float(asked))
        except ValueError as exc:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"error": f"ttl_s: {exc}"[:200]})
        response = _json_response(
            http.HTTPStatus.OK, {"value": value, "expires_at": expires_at, "routes": sorted(client_secrets.ROUTES)}
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _twilio_reattach(self, request: Request, address: str | None) -> Response:
        """TwiML for a call whose stream closed without the call ending
        (voice/transports/carriers/twilio.py): a new stream to this public
        URL, where the call picks up its stored conversation. A call the
        server ended (max_call_length, a flood: CallState.ended) is hung up."""
        path = request.path
        try:
            host, proto = _header(request, "Host"), _header(request, "X-Forwarded-Proto")
            signature = _header(request, SIGNATURE_HEADER)
        except BadHeaders as exc:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"error": f"duplicate {exc} header"})
        signed = self.registry.twilio is not None and self.registry.twilio.valid(
            candidate_urls(path, host, proto, self.config.public_url, websocket=False), signature
        )
        if self.registry.twilio is not None and not signed:
            self.registry.unauthorized(twilio.RECONNECT_PATH, address, "X-Twilio-Signature missing or wrong")
            return _json_response(http.HTTPStatus.FORBIDDEN, {"error": "invalid Twilio signature"})
        if self.config.auth_token is not None and self.registry.twilio is None:
            # /twilio would want the bearer token, which Twilio cannot send
            # and an unsigned answer must not hand out: the stream named here
            # would be refused (401) after the caller heard it reconnect.
            return _json_response(
                http.HTTPStatus.FORBIDDEN,
                {"error": "re-attach with --auth-token needs --twilio-auth-token (Twilio's streams are signed)"},
            )
        parameters = {}
        if self.config.carrier_secret:
            if not signed:  # the secret goes only to a request Twilio signed
                return _json_response(
                    http.HTTPStatus.FORBIDDEN,
                    {"error": "re-attach with --carrier-secret needs --twilio-auth-token (signed requests)"},
                )
            parameters[SECRET_PARAMETER] = self.config.carrier_secret
        call_sid = parse_qs(urlsplit(path).query).get("CallSid", [""])[0]
        if await self._ended_by_server(resume_key("twilio", call_sid)):
            return _twiml(twilio.HANGUP_TWIML)
        if signed and call_sid and self.config.twilio_auth_token:
            # Twilio signed this request, CallSid included: the stream it names
            # may pick up that call's conversation, and no other stream may.
            parameters[RESUME_PARAMETER] = twilio.resume_proof(self.config.twilio_auth_token, call_sid)
        origin = self.config.public_url or _origin_of(host, proto)
        if origin is None:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"error": "no usable Host header and no --public-url"})
        attempt = _query_int(path, "attempt", default=1)
        return _twiml(twilio.reattach_twiml(origin.rstrip("/"), attempt, parameters))

    async def _ended_by_server(self, key: str | None) -> bool:
        """Whether the call stored under ``key`` is a tombstone. A store that
        does not answer says no: the stream's start asks again."""
        if key is None:
            return False
        try:
            state = await self.runtime.store.load(key)
        except StoreError as exc:
            # DEBUG: anyone may ask this route; the stream's start reports it.
            log.debug("re-attach: stored call state not read (%s)", exc)
            return False
        return state is not None and bool(state.ended)

    def _authenticate(self, path: str, request: Request, address: str | None) -> Response | None:
        """None when the upgrade may go on to admission; else the refusal."""
        if not _origin_ok(request, self.config.allowed_origins, self.config.public_url):
            self.registry.unauthorized(path, address, "websocket from another site's page (Origin)")
            return _json_response(http.HTTPStatus.FORBIDDEN, {"error": "origin not allowed"})
        if path == twilio.PATH and self.registry.twilio is not None:
            # Twilio cannot send a bearer token; it signs the upgrade instead.
            # Refused here, before the handshake, so no audio is ever read.
            urls = candidate_urls(
                request.path,
                _header(request, "Host"),
                _header(request, "X-Forwarded-Proto"),
                self.config.public_url,
            )
            signature = _header(request, SIGNATURE_HEADER)
            if not self.registry.twilio.valid(urls, signature):
                why = "missing X-Twilio-Signature" if not signature else "X-Twilio-Signature does not match"
                self.registry.unauthorized(path, address, why)
                return _json_response(http.HTTPStatus.FORBIDDEN, {"error": "invalid Twilio signature"})
        elif not self.registry.token_ok(_token_of(request), path):
            self.registry.unauthorized(path, address, "missing or wrong bearer token")
            response = _json_response(http.HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
            response.headers["WWW-Authenticate"] = 'Bearer realm="firstline"'
            return response
        return None

    def _end_ws(self, ws: ServerConnection, end: CallEnd) -> object:
        guard = guard_of(ws)
        if guard is not None:
            guard.finish(end)  # the transport says goodbye, then closes (1001 on drain)
            return None
        # Transports without a guard just get the close frame; their handler
        # sees the connection end like a hang-up.
        return ws.close(end.code, end.text)

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        ticket = self._tickets.pop(ws, None)
        if ticket is None:  # not through _process_request (never in practice): count it anyway
            ticket = self.registry.track(CallTicket(ws.request.path.split("?", 1)[0], _address_of(ws)))
            ticket.stop = lambda end: self._end_ws(ws, end)
        self.registry.started(ticket)
        try:
            await self.route(ws.request.path.split("?", 1)[0])(ws, self.runtime)
        finally:
            guard = guard_of(ws)
            self.registry.refused_in_call(ticket, guard)
            self.registry.release(ticket, guard.end if guard is not None else None)

    def route(self, path: str) -> CallHandler:
        """The transport serving ``path`` (a server with other routes, e.g.
        the benchmarks' naive cascade, overrides this, not the handler: the
        registry's accounting stays in one place)."""
        return WS_ROUTES[path]

    async def start(self) -> None:
        if self.config.auth_token is not None:
            client_secrets.mac_key(self.config.auth_token)  # derived now, not on a call's first check
        self._server = await serve(
            self._handler,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=WS_MAX_SIZE,
            max_queue=WS_MAX_QUEUE,
            select_subprotocol=_select_subprotocol,
            # Audio must not queue behind a slow reader for long; small
            # buffers make backpressure visible instead of growing memory.
            write_limit=self.config.limits.write_limit,
            compression=None,  # audio does not compress; deflate only adds latency
            # Counted against its source from accept (the registry's
            # connection cap), before any handshake byte is read.
            create_connection=functools.partial(FloodGuardedConnection, gate=self.registry.connection_opened),
            open_timeout=self.config.limits.open_timeout_s,
        )
        # Both listeners are bound before the models load (a port in use
        # fails at once, not after a minute of warm-up); calls that come
        # meanwhile are refused as warming_up, on either.
        if self.config.audiosocket_port is not None:  # Asterisk AudioSocket: TCP, beside the websockets
            host = self.config.audiosocket_host or self.config.host
            allow = parse_networks(self.config.audiosocket_allow)
            if not allow and self.config.auth_token is not None:
                # AudioSocket carries no credential: with auth on, only an
                # allow-list (--audiosocket-allow) or this host may connect.
                allow = parse_networks(["127.0.0.1/32", "::1/128"])
            self.audiosocket = await start_audiosocket(
                self.runtime, host, self.config.audiosocket_port, registry=self.registry, allow=allow
            )
        if self._owns_runtime or not self.runtime.ready:
            await self.runtime.start()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self, handlers_timeout_s: float | None = None) -> None:
        """Stop listening and release the runtime. ``handlers_timeout_s``:
        the longest the call handlers still releasing get (None: as long as
        they take); past it the server stops without them, or one stuck
        handler held the process up after its drain until it was killed."""
        if self._server is not None:
            self._server.close()
            try:
                async with asyncio.timeout(handlers_timeout_s):
                    await self._server.wait_closed()
            except TimeoutError:
                log.error("calls still releasing %g s after the listener closed: stopping without them",
                          handlers_timeout_s)  # fmt: skip
        if self.audiosocket is not None:
            self.audiosocket.close()
            await self.audiosocket.wait_closed()
        if self.admission.record_ttfs in self.runtime.metrics.ttfs_listeners:
            self.runtime.metrics.ttfs_listeners.remove(self.admission.record_ttfs)
        if self._owns_runtime:
            await self.runtime.close()

    async def drain(self, deadline_s: float | None = None) -> None:
        """Stop taking calls, let live ones finish, then end the rest (1001).

        Readiness goes false at once so a load balancer stops routing here;
        the listener stays up meanwhile so /readyz and refusals still answer.
        """
        await self.registry.drain(self.config.limits.drain_timeout_s if deadline_s is None else deadline_s, self._hurry)

    async def serve_forever(self) -> None:
        await self.start()
        log.info("firstline listening on ws://%s:%d%s", self.config.host, self.port, NATIVE_PATH)
        if self.config.demo_page:
            url = page_url(self.config.host, self.port)
            log.info("talk to it from a browser: %s (--no-demo turns the page off)", url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            # First signal: drain. A second one: stop waiting for calls.
            if stop.is_set():
                self._hurry.set()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await stop.wait()
        await self.drain()
        await self.close(handlers_timeout_s=self.config.limits.close_timeout_s + HANDLERS_RELEASE_S)
        log.info("firstline stopped")
