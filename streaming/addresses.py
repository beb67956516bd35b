"""Bind addresses, read the same way by every listener that refuses to
open beyond this machine without a credential (the voice server's, the LLM
engine server's)."""

from __future__ import annotations

import ipaddress


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
