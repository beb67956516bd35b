"""Per-call budget for speculative work: preemptive turns and incremental
prefills (voice/call/session.py).

Speculation is a bet that a pause is the end of the turn. A normal caller
pauses a few times a turn and then listens, so most bets pay or cost little.
A caller who talks without end (or a client feeding speech as fast as the
audio budget allows) pauses every second or two and never waits for the
reply: each pause would start a final decode and an LLM generation that
are thrown away when they resume, and on a shared engine every other
call's reply slows for it (benchmarks/hostile.py measured it). So each call
gets a token bucket of preemptive turns: ``burst`` at once, refilled at
``per_s``; a preemptive turn that is committed (the bet paid) gives its
token back. An empty bucket means this pause waits for the endpoint like a
server without preemptive generation would, and partials do not prefill:
the call still gets every reply, just without the head start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeculationLimits:
    burst: float = 4.0  # aborted preemptive turns a call may spend at once
    per_s: float = 0.25  # ... and more, one every 4 s


class SpeculationBudget:
    def __init__(self, limits: SpeculationLimits | None = None) -> None:
        self.limits = limits or SpeculationLimits()
        self._tokens = self.limits.burst
        self._at = time.monotonic()
        self.denied = 0  # pauses that waited for the endpoint instead

    def _refill(self, now: float) -> None:
        self._tokens = min(self.limits.burst, self._tokens + max(0.0, now - self._at) * self.limits.per_s)
        self._at = now

    def available(self, now: float | None = None) -> bool:
        self._refill(time.monotonic() if now is None else now)
        return self._tokens >= 1.0

    def take(self, now: float | None = None) -> bool:
        """One preemptive turn, if the call has a token for it."""
        if not self.available(now):
            self.denied += 1
            return False
        self._tokens -= 1.0
        return True

    def refund(self, now: float | None = None) -> None:
        """The preemptive turn was committed: it was no waste."""
        self._refill(time.monotonic() if now is None else now)
        self._tokens = min(self.limits.burst, self._tokens + 1.0)
