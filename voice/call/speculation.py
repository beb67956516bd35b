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

from dataclasses import dataclass

from streaming.rate import TokenBucket


@dataclass(frozen=True)
class SpeculationLimits:
    burst: float = 4.0  # aborted preemptive turns a call may spend at once
    per_s: float = 0.25  # ... and more, one every 4 s


class SpeculationBudget(TokenBucket):
    def __init__(self, limits: SpeculationLimits | None = None) -> None:
        self.limits = limits or SpeculationLimits()
        super().__init__(self.limits.burst, self.limits.per_s)
        self.denied = 0  # pauses that waited for the endpoint instead

    def take(self, now: float | None = None) -> bool:
        """One preemptive turn, if the call has a token for it."""
        if super().take(now):
            return True
        self.denied += 1
        return False
