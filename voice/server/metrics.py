"""Prometheus metrics for one server process, served at ``/metrics``.

Fed from the edges, not from inside the pipeline: transports pass every
session event through :meth:`Metrics.observe_event` (``turn.metrics`` and
``error`` carry what is measured), the ASR worker reports each decode's
duration, and the server reports admissions and refusals. Each instance has
its own registry, so several servers in one process (tests) never collide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from llm.base import Usage

# Seconds. Voice latencies that matter sit between 100 ms and 3 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# turn.metrics field -> stage label (times from the caller's speech end).
STAGES = {
    "endpoint_ms": "endpoint",
    "asr_final_ms": "asr_final",
    "llm_first_token_ms": "llm_first_token",
    "first_sentence_ms": "first_sentence",
    "done_ms": "done",
    "asr_decode_ms": "asr_decode",
    "llm_ttft_ms": "llm_ttft",
}
# The stages timed from the caller's last word (a keys-only turn: its last key).
FROM_LAST_WORD = frozenset({"endpoint_ms", "asr_final_ms", "llm_first_token_ms", "first_sentence_ms", "done_ms"})
CONTENT_TYPE = CONTENT_TYPE_LATEST


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the loop (tests, tools)
        return 0.0


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _label(value: object) -> str:
    # Label values come from server-side codes, but a bounded string keeps a
    # bug from blowing up the series count.
    return str(value)[:48] if value is not None else "unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttfs = Histogram(
            "firstline_ttfs_seconds",
            "Caller's speech end -> first reply sentence sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "firstline_turn_stage_seconds",
            "Per-turn stage times (turn.metrics)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_ttft = Histogram(
            "firstline_llm_ttft_seconds",
            "LLM time to first token (ASR final -> first token)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.asr_decode = Histogram(
            "firstline_asr_decode_seconds",
            "Whisper decode time on the ASR worker",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.asr_redecodes = Counter(
            "firstline_asr_redecodes_total",
            "Whisper decodes done again in the 30 s window because the first stopped early (asr/whisper.py)",
            ["kind"],
            registry=r,
        )
        # Exported at 0 from the start: a scrape (or the bench) tells "none
        # yet" from "this server does not count them".
        self.asr_redecodes.labels("final")
        self.speculative_acceptance = Histogram(
            "firstline_speculative_acceptance_ratio",
            "Accepted / drafted tokens per reply (speculation on)",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.turns = Counter("firstline_turns_total", "Turns answered (turn.metrics sent)", registry=r)
        self.errors = Counter("firstline_errors_total", "error events sent to callers", ["code"], registry=r)
        self.admitted = Counter("firstline_calls_admitted_total", "Call upgrades admitted", registry=r)
        self.refused = Counter("firstline_calls_refused_total", "Call upgrades refused", ["reason"], registry=r)
        self.ended = Counter("firstline_calls_ended_total", "Calls ended", ["reason"], registry=r)
        self.resumed = Counter(
            "firstline_calls_resumed_total", "Calls that re-attached and picked up their stored state", registry=r
        )
        self.active = Gauge("firstline_active_calls", "Calls in progress", registry=r)
        self.low_priority = Counter(
            "firstline_low_priority_total",
            "Times a call feeding audio faster than real time was put behind the real-time calls",
            registry=r,
        )
        self.reply_gate_waits = Counter(
            "firstline_reply_gate_waits_total",
            "Turns of low-priority calls that waited for a real-time call's turn to finish",
            registry=r,
        )
        self.reply_yields = Counter(
            "firstline_reply_yields_total",
            "Times a reply whose first sentence was out stopped generating while another turn waited for its first",
            registry=r,
        )
        self.asr_decoder_restarts = Counter(
            "firstline_asr_decoder_restarts_total",
            "Whisper decoder processes that died and were started again (--asr-process)",
            registry=r,
        )
        self.asr_queue = Gauge("firstline_asr_queue_depth", "Decodes waiting for the ASR worker", registry=r)
        # Work that only buys latency when the machine has room for it.
        self.partials_over_budget = Counter(
            "firstline_partials_over_budget_total",
            "Partial decodes skipped because partials had used their decoder budget (--asr-partial-budget)",
            registry=r,
        )
        # Where the LLM's work goes (benchmarks/bench.py reports it per
        # answered turn): the reply the caller got, or work nobody heard.
        self.llm_tokens = Counter(
            "firstline_llm_tokens",
            "LLM tokens by what they were for (purpose: answered, preemptive_aborted, premature, spoken_first, "
            "prefill) and kind (prompt_computed: not from the prefix cache; generated)",
            ["purpose", "kind"],
            registry=r,
        )
        self.llm_requests = Counter(
            "firstline_llm_requests", "LLM requests by what they were for (purpose as above, and eot_probe)",
            ["purpose"], registry=r,
        )  # fmt: skip
        self.prefills_skipped = Counter(
            "firstline_prefills_skipped_total",
            "Incremental prefills skipped because another turn was under way",
            registry=r,
        )
        # Leak watch (benchmarks/soak.py): RSS and fds from /proc, live asyncio tasks.
        ProcessCollector(registry=r)
        self.tasks = Gauge("firstline_asyncio_tasks", "Live asyncio tasks in the server's loop", registry=r)
        self.tasks.set_function(_task_count)
        self.engine_restarts = Counter(
            "firstline_engine_restarts", "LLM engine processes restarted by the supervisor", registry=r
        )
        self.engine_available = Gauge(
            "firstline_engine_available", "1 when a turn has an LLM engine to go to", registry=r
        )
        self.ttfs_listeners: list[Callable[[float], None]] = []

    def bind_gauges(self, active: Callable[[], float], asr_queue: Callable[[], float]) -> None:
        """Gauges read live values at scrape time instead of being pushed."""
        self.active.set_function(active)
        self.asr_queue.set_function(asr_queue)

    def bind_engine(self, engine: object) -> None:
        """Restarts counted as the supervisor makes them (llm/supervisor.py);
        availability read at scrape time (engines without the notion: 1)."""
        listeners = getattr(engine, "on_restart", None)
        if isinstance(listeners, list):
            listeners.append(self.engine_restarts.inc)
        self.engine_available.set_function(lambda: float(bool(getattr(engine, "available", True))))

    def observe_event(self, ev: dict[str, Any], low_priority: bool = False) -> None:
        """``low_priority``: the call is fed faster than real time and served
        last on purpose; its turns' TTFS is kept out of the listeners
        (admission), or one such client could make the server refuse every
        new call while it ran on."""
        kind = ev.get("type")
        if kind == "turn.metrics":
            self._observe_turn(ev, low_priority)
        elif kind == "error":
            self.errors.labels(_label(ev.get("code"))).inc()

    def _observe_turn(self, ev: dict[str, Any], low_priority: bool) -> None:
        self.turns.inc()
        # A keys-only turn is timed from the caller's last key, the keypad
        # settle (2 s by default) included: its times from there stay out of
        # the histograms and admission's TTFS, or a few "press 1" turns read
        # as an overload. Its decode and LLM times count as any turn's.
        keys_only = bool(ev.get("keys_only"))
        for field, stage in STAGES.items():
            if keys_only and field in FROM_LAST_WORD:
                continue
            ms = _number(ev.get(field))
            if ms is not None and ms >= 0:
                self.stage.labels(stage).observe(ms / 1000)
        ttfs = None if keys_only else _number(ev.get("ttfs_ms"))
        if ttfs is not None and ttfs >= 0:
            self.ttfs.observe(ttfs / 1000)
            if not low_priority:
                for listener in self.ttfs_listeners:
                    listener(ttfs)
        ttft = _number(ev.get("llm_ttft_ms"))
        if ttft is not None and ttft >= 0:
            self.llm_ttft.observe(ttft / 1000)
        acceptance = _number(ev.get("speculative_acceptance"))
        if acceptance is not None:
            self.speculative_acceptance.observe(acceptance)

    def llm_used(self, purpose: str, usage: Usage | None) -> None:
        """One LLM request done (or given up): its tokens, by what it was for."""
        self.llm_requests.labels(purpose).inc()
        if usage is not None:
            self.llm_tokens.labels(purpose, "prompt_computed").inc(usage.prompt_computed)
            self.llm_tokens.labels(purpose, "generated").inc(usage.completion_tokens)

    def observe_asr_decode(self, final: bool, seconds: float) -> None:
        self.asr_decode.labels("final" if final else "partial").observe(seconds)

    def observe_asr_redecode(self, final: bool) -> None:
        self.asr_redecodes.labels("final" if final else "partial").inc()

    def call_admitted(self) -> None:
        self.admitted.inc()

    def call_refused(self, reason: str) -> None:
        self.refused.labels(_label(reason)).inc()

    def call_ended(self, reason: str) -> None:
        self.ended.labels(_label(reason)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
