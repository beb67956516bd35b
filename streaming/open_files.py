"""The open-files limit a server process raises at start (the voice server
and the engine's HTTP server alike)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Descriptors the server asks for (up to the hard limit): each call, each
# handshake under way and each HTTP request holds one, and the soft limit
# is often 1,024, which many sources' connections could use up together.
OPEN_FILES_WANTED = 65536


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise the soft RLIMIT_NOFILE toward ``wanted`` (never past the hard
    limit, never down); the soft limit in force after."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
    return soft
