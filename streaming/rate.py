"""A token bucket: ``burst`` at once, refilled at ``per_s``.
In events: per-call limits on what a caller can make the server do often
(voice/call/speculation.py, malformed input in voice/transports/telephony.py).
In seconds of work: the decoder time partials may use (asr/worker.py), where
a decode is charged after it ran and may overdraw the bucket."""

from __future__ import annotations

import time


class TokenBucket:
    def __init__(self, burst: float, per_s: float) -> None:
        self.burst = burst
        self.per_s = per_s
        self._tokens = burst
        self._at = time.monotonic()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.per_s)
        self._at = now

    def available(self, now: float | None = None) -> bool:
        self._refill(time.monotonic() if now is None else now)
        return self._tokens >= 1.0

    def take(self, now: float | None = None) -> bool:
        """One event, if there is a token for it."""
        if not self.available(now):
            return False
        self._tokens -= 1.0
        return True

    def charge(self, amount: float, now: float | None = None) -> None:
        """Spend ``amount`` (work already done): the bucket may go below zero
        and stays closed until it has refilled past it."""
        self._refill(time.monotonic() if now is None else now)
        self._tokens -= amount

    def has_credit(self, now: float | None = None) -> bool:
        self._refill(time.monotonic() if now is None else now)
        return self._tokens > 0.0

    def full(self, now: float | None = None) -> bool:
        self._refill(time.monotonic() if now is None else now)
        return self._tokens >= self.burst

    def refund(self, now: float | None = None) -> None:
        self._refill(time.monotonic() if now is None else now)
        self._tokens = min(self.burst, self._tokens + 1.0)


class KeyedBuckets:
    """One :class:`TokenBucket` per key (a caller's source address), shared by
    every connection from it: an allowance kept per connection is reset by
    reconnecting. At most ``max_keys`` are kept; past that, buckets that have
    refilled go first (forgetting one gives nothing away), then the oldest."""

    def __init__(self, burst: float, per_s: float, max_keys: int = 4096) -> None:
        self.burst = burst
        self.per_s = per_s
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def bucket(self, key: str | None) -> TokenBucket:
        """``key``'s bucket; a fresh one of its own for no key (a source not
        limited: an exempt gateway carries many callers)."""
        if key is None:
            return TokenBucket(self.burst, self.per_s)
        found = self._buckets.pop(key, None)
        if found is None:
            if len(self._buckets) >= self.max_keys:
                now = time.monotonic()
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            while len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
            found = TokenBucket(self.burst, self.per_s)
        self._buckets[key] = found  # newest last
        return found

    def __len__(self) -> int:
        return len(self._buckets)
