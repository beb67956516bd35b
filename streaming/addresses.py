"""Addresses and connections, read the same way by every listener (the
voice server's, the LLM engine server's): bind addresses that need a
credential, one spelling per source, and open connections per source
counted and capped at accept."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass


def is_loopback(host: str | None) -> bool:
    """Whether a bind address is reachable from this machine alone (a name
    other than localhost may resolve anywhere: not loopback)."""
    if host is None:
        return False
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[Network]:
    """``--audiosocket-allow`` values: CIDRs or single addresses."""
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip()]


def _ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # no IPv6 zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return ip


# An IPv6 host gets a whole /64 (RFC 6177 and every ISP's practice) and may
# pick a new address in it per connection: per-address limits and logs count
# the /64 as one source, or a cap of 8 calls would be a cap of 2^64.
IPV6_SOURCE_PREFIX = 64


def normalize_address(address: str | None) -> str | None:
    """One spelling per source, so the per-address cap counts it once: an
    IPv4 address, or an IPv6 address's /64 (loopback stays itself)."""
    ip = _ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and not ip.is_loopback:
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


def address_allowed(address: str | None, allow: list[Network]) -> bool:
    """Whether ``address`` (or a source as normalize_address keys it, an IPv6
    /64: all of it) is in one of ``allow`` (an empty list allows all)."""
    if not allow:
        return True
    if address is not None and "/" in address:
        try:
            source = ipaddress.ip_network(address, strict=False)
        except ValueError:
            return False
        return any(source.version == net.version and source.subnet_of(net) for net in allow)  # type: ignore[arg-type]
    ip = _ip(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in allow)


@dataclass(eq=False)
class ConnectionSlot:
    """One open connection counted against its source (closed once)."""

    key: str | None
    counts: dict[str, int]

    def close(self) -> None:
        if self.key is None:
            return
        left = self.counts.get(self.key, 1) - 1
        if left > 0:
            self.counts[self.key] = left
        else:
            self.counts.pop(self.key, None)
        self.key = None


class ConnectionCounts:
    """Open connections per source (as :func:`normalize_address` spells
    it), counted from accept: past ``cap`` (0: none) a new one gets no slot
    and its listener turns it away before reading a byte of it."""

    def __init__(self, cap: int = 0) -> None:
        self.cap = cap
        self.counts: dict[str, int] = {}

    def open(self, address: str | None) -> ConnectionSlot | None:
        if self.cap <= 0 or address is None:
            return ConnectionSlot(None, self.counts)
        key = normalize_address(address) or address
        if self.counts.get(key, 0) >= self.cap:
            return None
        self.counts[key] = self.counts.get(key, 0) + 1
        return ConnectionSlot(key, self.counts)

    def open_from(self, address: str) -> int:
        return self.counts.get(normalize_address(address) or address, 0)


def refusal_bytes(status: int, reason: str, body: dict[str, object], retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 answer written straight to a socket that is then
    closed (nothing of the request read): a connection past its source's cap."""
    data = json.dumps(body).encode()
    retry = b"" if retry_after_s is None else b"Retry-After: %d\r\n" % retry_after_s
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n" % (status, reason.encode())
    return head + retry + b"Content-Length: %d\r\n\r\n" % len(data) + data
