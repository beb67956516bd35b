"""Call admission: refuse a new call at the door (HTTP 503 on the upgrade)
when taking it would break the latency promise made to calls already up.

Two gates besides the hard ``max_calls`` cap:

* measured TTFS: the p95 of recent turns' time to first sentence (a rolling
  time window) over the target means the box is already saturated; one more
  call only makes every caller slower;
* ASR backlog: finals queue on one worker, so a long queue is TTFS that has
  not been measured yet.

A refusal is cheap (no handshake, no session) and says why in JSON, so a
load balancer or a carrier can send the call elsewhere at once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass


@dataclass
class AdmissionConfig:
    # p95 TTFS (ms) above which new calls are refused; None: gate off. Off by
    # default because the right number depends on the hardware and the SLO
    # (set it with `firstline serve --ttfs-target-ms`).
    ttfs_target_ms: float | None = None
    # Turns older than this no longer speak for the current load.
    window_s: float = 30.0
    # Fewer recent turns than this is no evidence either way.
    min_samples: int = 5
    # Decodes waiting on the ASR worker above which new calls are refused.
    max_asr_queue: int | None = 16
    # No LLM engine able to answer (a supervised child restarting with no
    # secondary, every remote replica down) for longer than this: new calls
    # are refused (503 llm_unavailable), so a carrier's fallback or a load
    # balancer sends them where they can be answered. Shorter outages admit:
    # a restart is back in ~2.5 s here, and a turn waits up to 10 s for an
    # engine (README "LLM engine fault tolerance"). None: never refuse.
    llm_down_grace_s: float | None = 10.0


@dataclass(frozen=True)
class Refusal:
    # machine-readable: at_capacity, overloaded_ttfs, overloaded_asr,
    # llm_unavailable, draining, warming_up, abuse_cooldown, per_address_limit,
    # call_rate
    reason: str
    message: str
    retry_after_s: int = 1
    # 503: the server is busy (any caller may be refused); 429: this caller
    # (its address) is over its own limit.
    status: int = 503


class AdmissionController:
    def __init__(self, config: AdmissionConfig, max_calls: int) -> None:
        self.config = config
        self.max_calls = max_calls
        self._ttfs: deque[tuple[float, float]] = deque(maxlen=512)  # (monotonic, ms)

    def record_ttfs(self, ms: float) -> None:
        self._ttfs.append((time.monotonic(), ms))

    def p95_ttfs_ms(self) -> float | None:
        """p95 of the turns in the window (nearest rank), or None without enough of them."""
        horizon = time.monotonic() - self.config.window_s
        while self._ttfs and self._ttfs[0][0] < horizon:
            self._ttfs.popleft()
        if len(self._ttfs) < self.config.min_samples:
            return None
        values = sorted(ms for _, ms in self._ttfs)
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]

    def check(self, active_calls: int, asr_queue_depth: int) -> Refusal | None:
        if active_calls >= self.max_calls:
            return Refusal("at_capacity", f"at capacity ({self.max_calls} calls)")
        if active_calls == 0:
            # Nothing is running, so old measurements describe a load that is
            # gone: never lock the server out on stale numbers.
            return None
        cfg = self.config
        if cfg.max_asr_queue is not None and asr_queue_depth > cfg.max_asr_queue:
            return Refusal("overloaded_asr", f"ASR backlog {asr_queue_depth} over {cfg.max_asr_queue}")
        p95 = self.p95_ttfs_ms()
        if cfg.ttfs_target_ms is not None and p95 is not None and p95 > cfg.ttfs_target_ms:
            return Refusal(
                "overloaded_ttfs",
                f"p95 time to first sentence {p95:.0f} ms over the {cfg.ttfs_target_ms:.0f} ms target",
                retry_after_s=max(1, round(cfg.window_s / 3)),
            )
        return None
