"""Bounded soak: many short calls against a real `firstline serve` process,
looking for leaks and lost work rather than latency.

Plays real phone prompts (8 kHz mu-law, faster than real time), up to
``--concurrency`` calls at once, ``--calls`` in all; each call waits for its
reply, then hangs up. Prints the server's RSS (and that of its engine child,
when the LLM runs out of process), open fds and asyncio task
count (from /metrics) before and after, and counts calls that lost their
transcript or reply, or were refused.

    python -m benchmarks.soak                      # 200 calls, 8 at once
    python -m benchmarks.soak --calls 40 --concurrency 4 --speed 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from benchmarks.bench import provenance
from benchmarks.client import NativeCaller
from benchmarks.corpus import Utterance, asterisk_prompts
from benchmarks.server_proc import firstline_server

RESULTS = Path(__file__).parent / "results" / "soak.json"


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = {"process_resident_memory_bytes", "process_open_fds", "firstline_asyncio_tasks", "firstline_active_calls"}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = sample.value
    return out


async def one_call(url: str, clip: Utterance, speed: float) -> tuple[str, list[str]]:
    """One short call; returns its outcome and the event types it received
    (kept for lost calls, so a loss can be told from a prompt the ASR hears
    as nothing)."""
    events: list[str] = []
    try:
        async with NativeCaller(url) as caller:
            await caller.start("mulaw", 8000)
            audio = clip.load(8000)
            audio = np.concatenate([audio, np.zeros(8000, dtype=audio.dtype)])  # 1 s of silence ends the turn
            await caller.play(audio, 8000, "mulaw", realtime=True, speed=speed)
            try:
                await caller.wait_for("response.done", timeout=60)
            except (TimeoutError, ConnectionError):
                pass
            events = [str(r.event.get("type")) for r in caller.result.events]
            if not caller.result.of("transcript.final"):
                return "lost_transcript", events
            if not caller.result.of("response.done"):
                return "lost_reply", events
            await caller.stop()
            await caller.wait_for("call.ended", timeout=10)
            return "ok", events
    except InvalidStatus:
        return "refused", events
    except (TimeoutError, ConnectionError, OSError):
        return "error", events


def tree_rss_mib(pid: int) -> float:
    """RSS of the server and its children (the supervised engine), MiB."""
    import psutil  # the bench extra

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / (1 << 20)


async def soak(
    port: int, pid: int, calls: int, concurrency: int, speed: float
) -> tuple[dict[str, int], list[dict[str, object]], list[tuple[int, float, float, int]]]:
    url = f"ws://127.0.0.1:{port}/v1/call"
    prompts = [p for p in asterisk_prompts(min_words=5) if len(p.reference.split()) <= 14]
    if not prompts:
        sys.exit("asterisk-core-sounds-en-wav not installed")
    gate = asyncio.Semaphore(concurrency)
    outcomes: dict[str, int] = {}
    losses: list[dict[str, object]] = []
    rss_trace: list[tuple[int, float, float, int]] = []
    done = 0

    async def run(i: int) -> None:
        nonlocal done
        async with gate:
            clip = prompts[i % len(prompts)]
            outcome, events = await one_call(url, clip, speed)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome != "ok":
            losses.append(
                {"call": i, "outcome": outcome, "clip": clip.name, "reference": clip.reference, "events": events}
            )
        done += 1
        if done % 20 == 0:
            # RSS along the way: growth that levels off is warm-up (allocator,
            # caches), growth that keeps going is a leak.
            sample = await asyncio.to_thread(scrape, port)
            rss = sample["process_resident_memory_bytes"] / (1 << 20)
            tree = tree_rss_mib(pid)
            fds = int(sample["process_open_fds"])
            rss_trace.append((done, round(rss, 1), round(tree, 1), fds))
            print(f"  {done}/{calls}: {outcomes}; RSS {rss:.0f} MiB, with engine {tree:.0f} MiB; fds {fds}", flush=True)

    await asyncio.gather(*(run(i) for i in range(calls)))
    return outcomes, losses, rss_trace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--speed", type=float, default=4.0, help="audio sent this many times faster than real time")
    parser.add_argument("--serve-args", default="", help="extra `firstline serve` arguments")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    serve_args = ["--max-calls", str(args.concurrency), *args.serve_args.split()]
    with firstline_server(serve_args) as server:
        port = server.port
        start = scrape(port)
        tree_start = tree_rss_mib(server.proc.pid)
        t0 = time.monotonic()
        outcomes, losses, rss_trace = asyncio.run(soak(port, server.proc.pid, args.calls, args.concurrency, args.speed))
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let hang-ups finish server side
        end = scrape(port)
        tree_end = tree_rss_mib(server.proc.pid)
    rc = server.exit_code
    mib = 1 / (1 << 20)
    print(f"{args.calls} calls, {args.concurrency} at once, audio x{args.speed}: {elapsed:.0f} s")
    print(f"outcomes: {outcomes}")
    rss = start["process_resident_memory_bytes"] * mib, end["process_resident_memory_bytes"] * mib
    print(f"RSS {rss[0]:.0f} -> {rss[1]:.0f} MiB; with the engine child {tree_start:.0f} -> {tree_end:.0f} MiB")
    print(f"open fds {start['process_open_fds']:.0f} -> {end['process_open_fds']:.0f}")
    print(f"asyncio tasks {start['firstline_asyncio_tasks']:.0f} -> {end['firstline_asyncio_tasks']:.0f}")
    print(f"active calls after: {end['firstline_active_calls']:.0f}; server exit code {rc}")
    for loss in losses:
        print(f"  lost: call {loss['call']} {loss['outcome']} clip {loss['clip']} ({loss['reference']!r})")
        print(f"        events {loss['events']}")
    figures = {
        **provenance("benchmarks.soak"),
        "calls": args.calls,
        "concurrency": args.concurrency,
        "speed": args.speed,
        "serve_args": args.serve_args,
        "elapsed_s": round(elapsed, 1),
        "outcomes": outcomes,
        "losses": losses,
        "rss_mib": [round(rss[0], 1), round(rss[1], 1)],
        "rss_with_engine_mib": [round(tree_start, 1), round(tree_end, 1)],
        "by_calls": rss_trace,  # (calls done, server RSS MiB, server + engine child RSS MiB, server fds)
        "open_fds": [start["process_open_fds"], end["process_open_fds"]],
        "asyncio_tasks": [start["firstline_asyncio_tasks"], end["firstline_asyncio_tasks"]],
        "active_calls_after": end["firstline_active_calls"],
        "server_exit_code": rc,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {args.output}")
    lost = sum(v for k, v in outcomes.items() if k != "ok")
    return 0 if lost == 0 and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
