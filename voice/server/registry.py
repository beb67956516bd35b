"""One call registry for every listener (websocket routes, AudioSocket TCP,
whatever comes next): authentication, admission under one ``max_calls``, a
per-address cap, drain, metrics and the logs that go with them.

A listener asks :meth:`CallRegistry.admit` before it reads a byte of audio
and gets a :class:`CallTicket` or a :class:`Refusal`; it hands the ticket
back with :meth:`CallRegistry.release` when the call is over. A listener
that does not go through here cannot count towards ``max_calls``, so the
server's limits are the sum of all its doors, not a limit per door.

Transport-agnostic on purpose: nothing here imports a transport; a
listener passes in how to end one of its calls (``stop``) and how to tell
that its connection is gone (``gone``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from streaming.addresses import (
    ConnectionCounts,
    ConnectionSlot,
    Network,
    address_allowed,
    normalize_address,
    parse_networks,
)
from streaming.rate import KeyedBuckets
from voice.server import client_secrets
from voice.server.admission import AdmissionController, Refusal
from voice.server.config import ServerConfig
from voice.server.limits import AUDIO_FLOOD, MALFORMED_FLOOD, SHUTDOWN, SLOW_READER, CallEnd, CallWatch
from voice.server.runtime import Runtime
from voice.server.signatures import TwilioSignatures

log = logging.getLogger(__name__)

# Refusals anyone can provoke are logged at WARNING this often per address.
WARN_EVERY_S = 60.0
# Ends that put the caller's address in the cool-down (CallLimits.abuse_cooldown_s).
ABUSE_ENDS = (AUDIO_FLOOD, SLOW_READER, MALFORMED_FLOOD)
COOLDOWN_MAX_ADDRESSES = 4096


@dataclass(eq=False)
class CallTicket:
    """One admitted call, from admission until its listener releases it."""

    listener: str
    address: str | None  # the source as counted (an IPv6 address's /64)
    # No per-address limit or cool-down (decided on the real address: an
    # exempt gateway need not be a whole /64).
    exempt: bool = False
    # True once the connection is gone without a release (a websocket whose
    # upgrade failed after admission never reaches a handler).
    gone: Callable[[], bool] = lambda: False
    # Ends the call the listener's way (farewell, then close); set by the listener.
    stop: Callable[[CallEnd], object] | None = None
    task: asyncio.Task[object] | None = None


class CallRegistry:
    def __init__(self, runtime: Runtime, admission: AdmissionController, config: ServerConfig) -> None:
        self.runtime = runtime
        self.admission = admission
        self.config = config
        self.draining = False
        self._tickets: set[CallTicket] = set()
        self._exempt = parse_networks(config.per_address_exempt)
        self.twilio = TwilioSignatures(config.twilio_auth_token) if config.twilio_auth_token else None
        # address -> when its refusals were last logged at WARNING or INFO (bounded).
        self._warned: dict[tuple[str | None, int], float] = {}
        # address -> until when it gets no new call (bounded).
        self._cooldown: dict[str, float] = {}
        # source -> connections open on the websocket and AudioSocket
        # listeners (an entry lives as long as one of its connections).
        self._connections = ConnectionCounts()
        self._connection_exempt = self._exempt + parse_networks(config.trusted_proxies)
        # source -> its allowance of new calls (ServerConfig.call_rate_per_address).
        # The burst: twice the per-address cap (off with the cap).
        self._call_starts = KeyedBuckets(max(1, 2 * config.max_calls_per_address), config.call_rate_per_address / 60)
        # Allowances a transport keeps per source across all its connections,
        # by name (limits.source_allowance): one kept per connection is reset
        # by reconnecting.
        self._per_source: dict[str, KeyedBuckets] = {}

    # ---- auth ----------------------------------------------------------

    def token_ok(self, token: str | None, route: str | None = None) -> bool:
        """The bearer token check every listener that carries one uses: the
        server's token, or on a browser's ``route`` a client secret it
        minted that has not expired (voice/server/client_secrets.py)."""
        expected = self.config.auth_token
        if expected is None:
            return True
        if token is None:
            return False
        if hmac.compare_digest(token.encode(errors="surrogatepass"), expected.encode()):
            return True
        return route in client_secrets.ROUTES and client_secrets.valid(expected, token)

    def unauthorized(self, listener: str, address: str | None, why: str) -> None:
        """Count and log a refusal for credentials (never the credential
        itself)."""
        self.runtime.metrics.call_refused("unauthorized")
        self._log_refusal(logging.WARNING, listener, address, why)

    def refused_in_call(self, ticket: CallTicket, watch: CallWatch | None) -> None:
        """A call its transport refused after admission (``watch.refused``):
        a wrong carrier secret counts as ``unauthorized``, as a wrong token
        at the door does; the rest (an audio format it cannot take, a start
        it cannot use) under their own reason. Logged as refusals at the door."""
        if watch is None or watch.refused is None:
            return
        reason, why = watch.refused
        if reason == "unauthorized":
            self.unauthorized(ticket.listener, ticket.address, why)
        else:
            self.runtime.metrics.call_refused(reason)
            self._log_refusal(logging.WARNING, ticket.listener, ticket.address, why)

    def _log_refusal(self, level: int, listener: str, address: str | None, why: str) -> None:
        """Anyone can provoke refusals, as fast as they can connect: at
        ``level`` at most once a minute per address, the rest at DEBUG
        (every one is counted in the metrics)."""
        now = time.monotonic()
        address = normalize_address(address)  # an IPv6 host's /64 is one source here too
        key = (address, level)
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned.pop(key, None)  # re-inserted last: the oldest entries go first
            if len(self._warned) >= 1024:
                # Dropping all at once let a source that cycles addresses
                # log again at once for every address it had used.
                del self._warned[next(iter(self._warned))]
            self._warned[key] = now
            log.log(level, "%s: refused a call from %s: %s (more from it this minute at DEBUG)",
                    listener, address or "?", why)  # fmt: skip
        else:
            log.debug("%s: refused a call from %s: %s", listener, address or "?", why)

    # ---- connections, before any handshake ----------------------------

    def connection_opened(self, address: str | None, listener: str = "websocket") -> ConnectionSlot | None:
        """Count a connection from ``address`` at accept; None when its
        source already holds the cap (ServerConfig.max_connections_per_address),
        and the listener turns it away before reading a byte of it."""
        cap = self._connections.cap = self.config.connections_per_address
        if self._connection_exempt and address_allowed(address, self._connection_exempt):
            return ConnectionSlot(None, self._connections.counts)
        slot = self._connections.open(address)
        if slot is None:
            self.runtime.metrics.call_refused("connection_limit")
            key = normalize_address(address) or address or "?"
            self._log_refusal(logging.INFO, listener, key, f"over {cap} connections open from one address")
        return slot

    def connections_open(self, address: str) -> int:
        return self._connections.open_from(address)

    # ---- admission -----------------------------------------------------

    def live(self) -> list[CallTicket]:
        """Calls holding a slot now. A connection that is gone is not a call
        any more: counting it would refuse a caller who redials the moment
        the last call hung up."""
        self._tickets = {t for t in self._tickets if not t.gone()}
        return list(self._tickets)

    def live_calls(self) -> int:
        return len(self.live())

    def admit(self, listener: str, address: str | None, gone: Callable[[], bool] | None = None) -> CallTicket | Refusal:
        """A slot for a new call, or why not. Counted at once (before any
        handler runs), so a burst of connections cannot all slip past the cap."""
        refusal: Refusal | None
        exempt = self.exempt_address(address)
        address = normalize_address(address)
        live = self.live()
        per_address = self.config.max_calls_per_address
        if self.draining:
            refusal = Refusal("draining", "server is shutting down", retry_after_s=5)
        elif not self.runtime.ready:
            refusal = Refusal("warming_up", "warming up", retry_after_s=5)
        elif (no_llm := self.runtime.llm_refusal(self.admission.config.llm_down_grace_s)) is not None:
            refusal = Refusal("llm_unavailable", no_llm, retry_after_s=5)
        elif not exempt and (cooling := self._cooling_s(address)) > 0:
            # Exempt: cool-downs are kept per /64, and a neighbour's flood
            # must not cool down a gateway the operator exempted in it.
            refusal = Refusal(
                "abuse_cooldown",
                "a call from this address was just ended for abuse (audio flood, message flood or not reading)",
                retry_after_s=cooling,
                status=429,
            )
        elif per_address > 0 and not exempt and _count(live, address) >= per_address:
            refusal = Refusal("per_address_limit", f"too many calls from one address (limit {per_address})", status=429)
        else:
            refusal = self.admission.check(len(live), self.runtime.asr.queue_depth)
        rate = self.config.call_rate_per_address if per_address > 0 else 0.0  # no cap: no per-address limits
        if refusal is None and rate > 0 and not exempt and not self._call_starts.bucket(address).take():
            refusal = Refusal(
                "call_rate",
                f"too many new calls from one address (limit {rate:g} a minute)",
                retry_after_s=max(1, math.ceil(60 / rate)),
                status=429,
            )
        if refusal is not None:
            self.runtime.metrics.call_refused(refusal.reason)
            self._log_refusal(logging.INFO, listener, address, refusal.reason)
            return refusal
        ticket = CallTicket(listener, address, exempt=exempt, gone=gone or (lambda: False))
        self._tickets.add(ticket)
        return ticket

    def started(self, ticket: CallTicket) -> None:
        """The admitted call's handler runs (a websocket upgrade that failed
        after admission never gets here, and is not counted as a call)."""
        ticket.task = asyncio.current_task()
        self.runtime.metrics.call_admitted()

    def track(self, ticket: CallTicket) -> CallTicket:
        """Count a call admitted some other way (it still holds a slot)."""
        self._tickets.add(ticket)
        return ticket

    def release(self, ticket: CallTicket, end: CallEnd | None = None) -> None:
        """The call is over; ``end``: why, when the server ended it."""
        self._tickets.discard(ticket)
        cooldown = self.config.limits.abuse_cooldown_s
        if end in ABUSE_ENDS and cooldown > 0 and not ticket.exempt:
            if len(self._cooldown) >= COOLDOWN_MAX_ADDRESSES:
                now = time.monotonic()
                self._cooldown = {a: t for a, t in self._cooldown.items() if t > now}
            if len(self._cooldown) >= COOLDOWN_MAX_ADDRESSES:
                # Full of live cool-downs (many sources abusing at once): the
                # one nearest its end makes room, so the newest abuser is
                # cooled down too (it was let straight back in).
                del self._cooldown[min(self._cooldown, key=self._cooldown.__getitem__)]
            assert ticket.address is not None and end is not None
            self._cooldown[ticket.address] = time.monotonic() + cooldown
            log.info("%s: %s ended a call (%s): no new call from it for %g s",
                     ticket.listener, ticket.address, end.reason, cooldown)  # fmt: skip

    def per_source(self, name: str, burst: float, per_s: float) -> KeyedBuckets:
        """The allowance ``name`` of every source on this server (made on first use)."""
        table = self._per_source.get(name)
        if table is None:  # made once per name, not per call asking
            table = self._per_source[name] = KeyedBuckets(burst, per_s)
        return table

    def exempt_address(self, address: str | None) -> bool:
        """No per-address limit applies (unknown, or a proxy/gateway carrying many callers)."""
        return address is None or bool(self._exempt and address_allowed(address, self._exempt))

    def _cooling_s(self, address: str | None) -> int:
        """Whole seconds left of ``address``'s cool-down (0: none)."""
        until = self._cooldown.get(address) if address is not None else None
        if until is None:
            return 0
        left = until - time.monotonic()
        if left <= 0:
            del self._cooldown[address]
            return 0
        return max(1, round(left))

    async def run(self, ticket: CallTicket, call: Callable[[CallWatch], Awaitable[None]]) -> None:
        """Run an admitted call's handler under a :class:`CallWatch` (idle
        timeout, drain), for listeners without a websocket guard of their own."""
        watch = CallWatch(self.config.limits)
        self.started(ticket)
        ticket.stop = watch.finish
        try:
            await call(watch)
        finally:
            self.refused_in_call(ticket, watch)
            self.release(ticket, watch.end)

    async def serve_connection(
        self,
        listener: str,
        address: str | None,
        allow: list[Network],
        call: Callable[[CallWatch], Awaitable[None]],
        refuse: Callable[[str], Awaitable[None]],
    ) -> None:
        """The whole door for a listener without an HTTP handshake (TCP):
        source allow-list, admission, then the call under a watch. ``refuse``
        gets the reason and tells the peer in its own protocol. The caller
        has counted the connection (connection_opened) already."""
        if not address_allowed(address, allow):
            self.unauthorized(listener, address, "source address not allowed")
            await refuse("unauthorized")
            return
        ticket = self.admit(listener, address)
        if isinstance(ticket, Refusal):
            await refuse(ticket.reason)
            return
        await self.run(ticket, call)

    # ---- drain ---------------------------------------------------------

    async def drain(self, deadline_s: float, hurry: asyncio.Event) -> None:
        """Stop admitting, let live calls finish until the deadline (or
        ``hurry``), then end the rest with :data:`SHUTDOWN`."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        log.info("draining: %d live calls, up to %.0f s", len(self.live()), deadline_s)
        hurried = asyncio.ensure_future(hurry.wait())
        try:
            while self.live() and not hurried.done() and (remaining := deadline - loop.time()) > 0:
                # Connections admitted before the drain may still start
                # handlers, hence the loop rather than one wait on a snapshot.
                pending: set[asyncio.Future[object]] = {t.task for t in self.live() if t.task is not None}
                pending.add(hurried)
                await asyncio.wait(pending, timeout=min(remaining, 0.5), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        # Every live call, including one whose handler has not started yet:
        # its stop closes the connection, so it cannot start a call later.
        left = self.live()
        if left:
            log.info("drain deadline: ending %d calls", len(left))
        closing = []
        for ticket in left:
            if ticket.stop is None:
                continue
            try:
                result = ticket.stop(SHUTDOWN)
            except Exception:  # one call failing to stop must not keep the others up
                log.exception("drain: ending a %s call failed", ticket.listener)
                continue
            if asyncio.iscoroutine(result):
                closing.append(result)
        await asyncio.gather(*closing, return_exceptions=True)
        tasks = [t.task for t in left if t.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.limits.close_timeout_s + 1.0)


def _count(tickets: list[CallTicket], address: str | None) -> int:
    """Calls from ``address`` that count toward its cap (an exempt gateway's
    calls do not use up its /64 neighbours' share)."""
    return sum(1 for t in tickets if t.address == address and not t.exempt)
