"""Batched ASR across calls: latency, throughput and CPU cost per decode.

Drives the real shared ASR worker (asr/worker.py, real Whisper, real speech
through a mu-law phone line) with synthetic concurrent calls, once per worker
configuration, all in the same run:

* ``calls``: N calls, each speaking real utterances at real time (``--speed``
  compresses time): a partial of the turn so far every
  ``partial_interval_s`` of speech (superseding the previous one, as
  voice/call/session.py does), the final when the turn ends, then a pause
  while the reply plays. Reports the finals' latency (submit to result, the
  number a caller feels), partials served / shed, decodes per second and
  CPU-seconds per decode.
* ``burst``: every utterance submitted as a final at once: the worker's
  capacity (decodes per second with a full queue) and its CPU cost.

    python -m benchmarks.asr_batching                      # batch size 1, 2, 4, 8
    python -m benchmarks.asr_batching --variants           # + window policy, partials-with-finals, gather budget
    python -m benchmarks.asr_batching --variants mix       # + only partials-with-finals flipped
    python -m benchmarks.asr_batching --calls 8 --turns 4 --batch-sizes 1 4 --rounds 2

Writes benchmarks/results/asr_batching.json (with the git commit and machine).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from asr.config import ASRConfig
from asr.whisper import SAMPLE_RATE
from asr.worker import ASRWorker
from benchmarks.bench import machine, versions
from benchmarks.corpus import Utterance, asterisk_prompts, shared_clips, through_phone_line
from streaming.threads import one_blas_thread

OUT = Path(__file__).parent / "results" / "asr_batching.json"
VARIANTS = ("windows", "mix", "behind", "wait")


@dataclass
class Stats:
    final_latency_s: list[float] = field(default_factory=list)
    final_queue_s: list[float] = field(default_factory=list)
    final_batch: list[int] = field(default_factory=list)
    partial_latency_s: list[float] = field(default_factory=list)
    partials_submitted: int = 0
    partials_served: int = 0


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def corpus(max_s: float, every: int) -> list[tuple[Utterance, np.ndarray]]:
    """Real speech as the server hears it: 8 kHz mu-law, back to 16 kHz."""
    utts = shared_clips() + asterisk_prompts(min_words=3)[::every]
    out = [(u, through_phone_line(u.load(8000))) for u in utts]
    return [(u, a) for u, a in out if len(a) / SAMPLE_RATE <= max_s]


async def one_call(
    worker: ASRWorker, call_id: str, turns: list[np.ndarray], ns: argparse.Namespace, stats: Stats, rng: random.Random
) -> None:
    cfg = worker.config
    speed = ns.speed
    await asyncio.sleep(rng.uniform(0, ns.stagger_s) / speed)
    pending: set[asyncio.Future[Any]] = set()
    for audio in turns:
        duration = len(audio) / SAMPLE_RATE
        t0 = time.monotonic()
        # Partials while the caller speaks, at most one per interval.
        at = cfg.partial_interval_s
        while at < duration:
            await asyncio.sleep(max(0.0, t0 + at / speed - time.monotonic()))
            submitted = time.monotonic()
            fut = worker.submit(call_id, audio[: int(at * SAMPLE_RATE)], final=False)
            stats.partials_submitted += 1

            def on_partial(f: asyncio.Future[Any], submitted: float = submitted) -> None:
                if not f.cancelled() and f.exception() is None:
                    stats.partials_served += 1
                    stats.partial_latency_s.append(time.monotonic() - submitted)

            fut.add_done_callback(on_partial)
            pending.add(fut)
            fut.add_done_callback(pending.discard)
            at += cfg.partial_interval_s
        # The turn's end: the preemptive pause decode is the final.
        await asyncio.sleep(max(0.0, t0 + (duration + cfg.pause_s) / speed - time.monotonic()))
        submitted = time.monotonic()
        result = await worker.submit(call_id, audio, final=True)
        stats.final_latency_s.append(time.monotonic() - submitted)
        stats.final_queue_s.append(result.queue_s)
        stats.final_batch.append(result.batch_size)
        worker.forget(call_id)  # endpoint: a pending partial is moot
        await asyncio.sleep(ns.reply_s / speed)  # the caller listens to the reply
    for fut in list(pending):
        fut.cancel()


class Counters:
    """The worker's counters at one moment, to take differences (one worker
    per configuration serves every round)."""

    def __init__(self, worker: ASRWorker) -> None:
        self.decodes = sum(worker.decodes.values())
        self.shed = worker.shed_partials
        self.batches = worker.batches
        self.items = worker.batched_items
        self.cpu = time.process_time()  # every thread of this process: CTranslate2's too
        self.wall = time.monotonic()

    def since(self, before: Counters) -> dict[str, Any]:
        decodes = self.decodes - before.decodes
        batches = self.batches - before.batches
        return {
            "decodes": decodes,
            "decodes_per_s": round(decodes / (self.wall - before.wall), 2),
            "cpu_s_per_decode": round((self.cpu - before.cpu) / decodes, 3) if decodes else None,
            "mean_batch": round((self.items - before.items) / batches, 2) if batches else None,
            "partials_shed": self.shed - before.shed,
            "wall_s": round(self.wall - before.wall, 1),
        }


async def run_calls(worker: ASRWorker, speech: list[np.ndarray], ns: argparse.Namespace, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    plans = []
    for c in range(ns.calls):
        offset = (c * 7) % len(speech)
        plans.append([speech[(offset + t) % len(speech)] for t in range(ns.turns)])
    stats = Stats()
    before = Counters(worker)
    rngs = [random.Random(rng.random()) for _ in plans]
    await asyncio.gather(*(one_call(worker, f"call{c}", p, ns, stats, rngs[c]) for c, p in enumerate(plans)))
    counts = Counters(worker).since(before)
    for _ in range(3000):  # let a cancelled partial's decode end before the next run (30 s at most)
        if not (worker.in_flight or worker.queue_depth):
            break
        await asyncio.sleep(0.01)
    return {
        "final_p50_ms": ms(pct(stats.final_latency_s, 50)),
        "final_p95_ms": ms(pct(stats.final_latency_s, 95)),
        "final_queue_p50_ms": ms(pct(stats.final_queue_s, 50)),
        "final_mean_batch": round(statistics.mean(stats.final_batch), 2),
        "partial_p50_ms": ms(pct(stats.partial_latency_s, 50)),
        "partials_submitted": stats.partials_submitted,
        "partials_served": stats.partials_served,
        "finals": len(stats.final_latency_s),
        **counts,
    }


async def run_burst(worker: ASRWorker, speech: list[np.ndarray]) -> dict[str, Any]:
    before = Counters(worker)
    await asyncio.gather(*(worker.submit(f"burst{i}", a, final=True) for i, a in enumerate(speech)))
    counts = Counters(worker).since(before)
    del counts["partials_shed"]
    return counts


def configs(ns: argparse.Namespace) -> dict[str, ASRConfig]:
    base = ASRConfig(threads=ns.threads, device=ns.device, compute_type=ns.compute_type, model=ns.model)
    if ns.partial_budget is not None:
        base = replace(base, partial_budget=ns.partial_budget)
    out = {f"batch {b}": replace(base, batch_size=b) for b in ns.batch_sizes}
    variants = set(VARIANTS if ns.variants == [] else ns.variants or [])
    b = max(2, base.batch_size)
    if "windows" in variants:
        other = "pad" if base.batch_windows == "same" else "same"
        out[f"batch {b}, windows={other}"] = replace(base, batch_size=b, batch_windows=other)
    if "mix" in variants:
        mix = not base.batch_partials_with_finals
        out[f"batch {b}, partials with finals={mix}"] = replace(base, batch_size=b, batch_partials_with_finals=mix)
    if "behind" in variants:
        out[f"batch {b}, partials behind finals"] = replace(base, batch_size=b, partials_behind_finals=True)
    if "wait" in variants:
        for wait in (0.0, 20.0):
            out[f"batch {b}, wait {wait:g} ms"] = replace(base, batch_size=b, batch_wait_ms=wait)
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [row[key] for row in rows if row.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    # As the server does (voice/server/runtime.py): numpy's BLAS pool would
    # otherwise spin beside every decode and count as the decoder's CPU.
    one_blas_thread()
    utts = corpus(ns.max_utterance_s, ns.every)
    speech = [a for _, a in utts]
    cfgs = configs(ns)
    print(
        f"{len(speech)} utterances ({sum(len(a) for a in speech) / SAMPLE_RATE:.0f} s), "
        f"{ns.calls} calls x {ns.turns} turns, speed {ns.speed:g}, {ns.rounds} round(s), configs: {', '.join(cfgs)}"
    )
    workers = {name: ASRWorker(cfg) for name, cfg in cfgs.items()}
    for worker in workers.values():
        await worker.start()
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"calls": [], "burst": []} for name in cfgs}
    try:
        # Rounds interleave the configurations so machine noise hits all alike;
        # the short bursts are repeated within a round for the same reason.
        for r in range(ns.rounds):
            for name, worker in workers.items():
                calls = await run_calls(worker, speech, ns, seed=ns.seed + r)
                rows[name]["calls"].append(calls)
                print(f"  round {r + 1} {name}: calls {calls}", flush=True)
            for _ in range(ns.burst_repeats if ns.burst else 0):
                for name, worker in workers.items():
                    # Cycled when the burst asks for more than the corpus holds (a GPU batch of 64).
                    burst = await run_burst(worker, [speech[i % len(speech)] for i in range(ns.burst)])
                    rows[name]["burst"].append(burst)
                    print(f"  round {r + 1} {name}: burst {burst}", flush=True)
    finally:
        for worker in workers.values():
            await worker.close()
    summary = []
    for name, cfg in cfgs.items():
        calls, burst = rows[name]["calls"], rows[name]["burst"]
        row: dict[str, Any] = {
            "config": name,
            "batch_size": cfg.batch_size,
            "batch_wait_ms": cfg.batch_wait_ms,
            "batch_windows": cfg.batch_windows,
            "batch_partials_with_finals": cfg.batch_partials_with_finals,
            "partials_behind_finals": cfg.partials_behind_finals,
            **{f"calls_{k}": _median(calls, k) for k in calls[0]},
        }
        if burst:
            row.update({f"burst_{k}": _median(burst, k) for k in burst[0]})
            # Best of the repeats: the run least disturbed by other processes.
            row["burst_best_decodes_per_s"] = max(b["decodes_per_s"] for b in burst)
            row["burst_best_cpu_s_per_decode"] = min(b["cpu_s_per_decode"] for b in burst)
        summary.append(row)
    print(f"\nmedians over {ns.rounds} round(s) (burst: {ns.burst_repeats} per round; best = least disturbed run)")
    print(
        f"{'config':<36}{'final p50':>10}{'final p95':>10}{'partials':>10}{'dec/s':>7}{'CPU s/dec':>10}"
        f"{'burst dec/s':>12}{'(best)':>7}{'CPU s/dec':>10}{'(best)':>7}{'batch':>6}"
    )
    for row in summary:
        partials = f"{row['calls_partials_served']:.0f}/{row['calls_partials_submitted']:.0f}"
        print(
            f"{row['config']:<36}{row['calls_final_p50_ms']:>10.0f}{row['calls_final_p95_ms']:>10.0f}"
            f"{partials:>10}{row['calls_decodes_per_s']:>7.2f}{row['calls_cpu_s_per_decode']:>10.3f}"
            f"{row.get('burst_decodes_per_s') or 0:>12.2f}{row.get('burst_best_decodes_per_s') or 0:>7.2f}"
            f"{row.get('burst_cpu_s_per_decode') or 0:>10.3f}{row.get('burst_best_cpu_s_per_decode') or 0:>7.3f}"
            f"{row.get('burst_mean_batch') or 0:>6.2f}"
        )
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "options": {k: v for k, v in vars(ns).items() if k != "output"},
        "utterances": len(speech),
        "speech_s": round(sum(len(a) for a in speech) / SAMPLE_RATE, 1),
        "summary": summary,
        "runs": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=8, help="concurrent synthetic calls")
    parser.add_argument("--turns", type=int, default=4, help="turns per call")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        default=None,
        help="also these variants of the device's default batch size, at least 2 (alone: all): window policy, "
        "partials in the finals' batches (mix), partials queued behind finals, gather budget",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every configuration, interleaved")
    parser.add_argument("--speed", type=float, default=1.0, help="time compression of the calls (1 = real time)")
    parser.add_argument("--stagger-s", type=float, default=3.0, help="calls start within this many seconds")
    parser.add_argument("--reply-s", type=float, default=1.5, help="caller listens this long between turns")
    parser.add_argument("--burst", type=int, default=32, help="utterances in the burst test (0: skip)")
    parser.add_argument("--burst-repeats", type=int, default=2, help="bursts per configuration per round")
    parser.add_argument("--every", type=int, default=8, help="take every Nth Asterisk prompt")
    parser.add_argument("--max-utterance-s", type=float, default=15.0, help="longest utterance used as a turn")
    parser.add_argument("--threads", type=int, default=ASRConfig.threads, help="CTranslate2 intra threads")
    parser.add_argument("--device", default=ASRConfig.device, choices=["cpu", "cuda"])
    parser.add_argument("--compute-type", default=None, help="CTranslate2 compute type (int8; float16 on cuda)")
    parser.add_argument("--model", default=None, help="CTranslate2 Whisper folder (default: the embedded tiny.en)")
    parser.add_argument(
        "--partial-budget", type=float, default=None, help="decoder s/s for partials (default: ASRConfig's; 0 = none)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default=str(OUT))
    ns = parser.parse_args()
    if ns.compute_type is None:
        ns.compute_type = "float16" if ns.device == "cuda" else ASRConfig.compute_type
    result = asyncio.run(main_async(ns))
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
