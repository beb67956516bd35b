"""What the scale-out topology costs and how it behaves under faults
(docs/scaling.md), on the real processes of benchmarks/cluster.py.

1. **The two hops.** The same calls through HAProxy to replicas whose LLM is
   behind vllm-router, and straight to a replica whose LLM is one engine
   replica, interleaved round by round in one run: TTFS p50/p95 per path.
   Each hop alone as well, with less noise: websocket call set-up (upgrade
   to ``ready``) through HAProxy vs direct, and LLM time to first token
   through the router vs direct.
2. **Cold start.** From starting a new voice replica to its first call, and
   a new engine replica to its first token (through the router).
3. **Faults.** kill -9 of a voice replica with calls on it, SIGTERM of one,
   kill -9 of an LLM replica between turns and in the middle of a reply
   (what a voice replica's engine does: RemoteEngine behind the router, the
   reply carried on after a cut): calls lost, turns lost, time to recover.

    python -m benchmarks.cluster_bench                  # ~6 min on 2 cores
    python -m benchmarks.cluster_bench --rounds 2 --calls 6

Results: benchmarks/results/cluster.json (with the commit).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.bench import machine, provenance, run_and_save
from benchmarks.client import NativeCaller
from benchmarks.cluster import Cluster, Proc
from benchmarks.corpus import ASTERISK_SOUNDS, asterisk_prompts
from benchmarks.loadgen import CallOptions, CallSpec, Segment, TurnSpec, run_calls
from llm.base import EngineError, GenerationRequest, LLMEngine
from llm.continuation import stream_continuing
from llm.remote_engine import RemoteEngine, RemotePool

OUT = Path(__file__).resolve().parent / "results" / "cluster.json"


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95)}


def corpus(n: int) -> list[CallSpec]:
    prompts = asterisk_prompts(min_words=4)[:n]
    specs = []
    for k, utt in enumerate(prompts):
        segment = Segment("asterisk", str(utt.path.relative_to(ASTERISK_SOUNDS)), utt.reference)
        specs.append(CallSpec(f"c{k:02d}", (TurnSpec((segment,)),)))
    return specs


async def ttfs_paths(cluster: Cluster, direct: Proc, rounds: int, calls: int) -> dict[str, Any]:
    spec = corpus(calls)
    opts = CallOptions(protocol="native", speed=1.0, turn_timeout_s=30.0)
    paths = {"haproxy+router": cluster.url, "direct": f"ws://127.0.0.1:{direct.port}"}
    ttfs: dict[str, list[float]] = {name: [] for name in paths}
    failed: dict[str, int] = dict.fromkeys(paths, 0)
    for r in range(rounds):
        order = list(paths.items()) if r % 2 == 0 else list(reversed(paths.items()))
        for name, url in order:
            records = await run_calls(url, spec, 1, opts)
            for rec in records:
                if rec.get("ttfs_ms") is not None:
                    ttfs[name].append(rec["ttfs_ms"])
                else:
                    failed[name] += 1
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} p50 {pct(v, 50)} ms" for n, v in ttfs.items()))
    return {name: {**summary(v), "unanswered": failed[name]} for name, v in ttfs.items()}


async def setup_times(url: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with NativeCaller(url + "/v1/call") as caller:
            await caller.start("mulaw", 8000)
            times.append((time.perf_counter() - t0) * 1000)
    return times


async def first_token_ms(session: aiohttp.ClientSession, base: str, session_id: str) -> float:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello, who is this?"}], "stream": True,
            "max_tokens": 4}  # fmt: skip
    t0 = time.perf_counter()
    async with session.post(base + "/v1/chat/completions", json=body, headers={"X-Session-ID": session_id}) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data:") and b'"content"' in line:
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError(f"no token from {base}")


async def hops(cluster: Cluster, direct: Proc, n: int) -> dict[str, Any]:
    assert cluster.router is not None
    setup: dict[str, list[float]] = {"haproxy": [], "direct": []}
    ttft: dict[str, list[float]] = {"router": [], "direct": []}
    async with aiohttp.ClientSession() as http:
        for k in range(n):
            pair = [("haproxy", cluster.url), ("direct", f"ws://127.0.0.1:{direct.port}")]
            for name, url in pair if k % 2 == 0 else reversed(pair):
                setup[name] += await setup_times(url, 1)
            llm = [("router", cluster.router.root), ("direct", cluster.llm[0].root)]
            for name, base in llm if k % 2 == 0 else reversed(llm):
                ttft[name].append(await first_token_ms(http, base, f"hop-{k}"))
            await http.post(f"{cluster.router.root}/finish_session", params={"session_id": f"hop-{k}"})
    return {
        "call_setup_ms": {name: summary(v) for name, v in setup.items()},
        "llm_first_token_ms": {name: summary(v) for name, v in ttft.items()},
    }


async def cold_start(cluster: Cluster) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Voice: one call on each running replica, so the new one is the least loaded.
    holders = [NativeCaller(cluster.url + "/v1/call") for r in cluster.voice if r.alive()]
    for h in holders:
        await h.__aenter__()
        await h.start("mulaw", 8000)
    try:
        t0 = time.perf_counter()
        added = await asyncio.to_thread(cluster.add_voice)
        ready_s = time.perf_counter() - t0
        await asyncio.to_thread(cluster.wait_up, [added.name])
        before = cluster.metric(added, "firstline_calls_admitted_total")
        async with NativeCaller(cluster.url + "/v1/call") as caller:
            await caller.start("mulaw", 8000)
            first_call_s = time.perf_counter() - t0
        took = cluster.metric(added, "firstline_calls_admitted_total") - before
        out["voice_replica"] = {"ready_s": round(ready_s, 2), "first_call_s": round(first_call_s, 2),
                                "first_call_on_new_replica": took == 1}  # fmt: skip
    finally:
        for h in holders:
            await h.__aexit__(None, None, None)
    # LLM: one open session on each running replica; a new session then goes to the new one.
    assert cluster.router is not None
    async with aiohttp.ClientSession() as http:
        for k, _ in enumerate(cluster.llm):
            await first_token_ms(http, cluster.router.root, f"hold-{k}")
        t0 = time.perf_counter()
        added_llm = await asyncio.to_thread(cluster.add_llm)
        registered_s = time.perf_counter() - t0
        served = _served(added_llm)
        await first_token_ms(http, cluster.router.root, "cold-1")
        first_token_s = time.perf_counter() - t0
        out["llm_replica"] = {"registered_s": round(registered_s, 2), "first_token_s": round(first_token_s, 2),
                              "first_token_on_new_replica": _served(added_llm) > served}  # fmt: skip
        for k, _ in enumerate(cluster.llm):
            await http.post(f"{cluster.router.root}/finish_session", params={"session_id": f"hold-{k}"})
    return out


def _served(replica: Proc) -> int:
    import urllib.request

    with urllib.request.urlopen(replica.root + "/health", timeout=5) as r:
        return int(json.loads(r.read())["served"])


async def _greeted_call(url: str, **options: Any) -> tuple[NativeCaller, dict[str, Any]]:
    caller = NativeCaller(url + "/v1/call")
    await caller.__aenter__()
    ready = await caller.start("mulaw", 8000, options=options)
    return caller, ready


async def until_a_call_connects(url: str, timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            async with NativeCaller(url + "/v1/call") as caller:
                await caller.start("mulaw", 8000)
                return time.perf_counter() - t0
        except Exception:  # refused or cut: not recovered yet
            await asyncio.sleep(0.05)
    raise TimeoutError("no call connected")


async def faults(cluster: Cluster) -> list[dict[str, Any]]:
    rows = []
    # 1. kill -9 of a voice replica with calls on it (native calls; they re-attach with their token).
    calls = []
    for _ in range(4):
        before = cluster.admitted()
        caller, ready = await _greeted_call(cluster.url, greeting="Thanks for calling.")
        calls.append((caller, ready, cluster.took_call(before)))
    victim = calls[0][2]
    victim.signal(signal.SIGKILL)
    recovered = await until_a_call_connects(cluster.url)
    cut = [c for c in calls if c[2] is victim]
    resumed = 0
    for caller, ready, _ in cut:
        await caller.__aexit__(None, None, None)
        again, back = await _greeted_call(cluster.url, resume=ready["resume_token"])
        resumed += bool(back.get("resumed"))
        await again.__aexit__(None, None, None)
    others_ok = 0
    for caller, _, replica in calls:
        if replica is not victim:
            others_ok += caller.ws is not None and caller.ws.close_code is None
            await caller.__aexit__(None, None, None)
    rows.append({"fault": "kill -9 of a voice replica (calls on it)", "calls_cut": len(cut),
                 "calls_re_attached_with_history": resumed, "other_calls_cut": len(calls) - len(cut) - others_ok,
                 "new_call_connects_after_s": round(recovered, 2),
                 "turns_lost": "a cut call's turn in flight, if any"})  # fmt: skip
    cluster.admin(f"set server firstline/{victim.name} state maint")
    print(f"  {rows[-1]}")
    # 2. SIGTERM of a voice replica with a call on it: the caller speaks a
    # turn through the drain, which is answered; new calls go elsewhere.
    before = cluster.admitted()
    caller, _ = await _greeted_call(cluster.url)
    victim = cluster.took_call(before)
    victim.signal(signal.SIGTERM)
    refused = 0
    for _ in range(5):
        try:
            async with NativeCaller(cluster.url + "/v1/call") as fresh:
                await fresh.start("mulaw", 8000)
        except Exception:
            refused += 1
    spoken = asterisk_prompts(min_words=4)[0]
    audio = np.concatenate([spoken.load(8000), np.zeros(12000, np.float32)])  # then 1.5 s of silence
    answered = False
    try:
        await caller.play(audio, 8000, "mulaw", realtime=True)
        final = await caller.wait_for("transcript.final", timeout=60)
        done = await caller.wait_for("response.done", timeout=60, turn=final["turn"])
        answered = bool(done.get("text")) and not done.get("cancelled")
    except Exception:  # cut, or never answered: the turn is lost
        pass
    alive = caller.ws is not None and caller.ws.close_code is None
    await caller.__aexit__(None, None, None)
    await asyncio.to_thread(victim.proc.wait, 60)
    rows.append({"fault": "SIGTERM of a voice replica (drain)", "calls_cut": 0 if alive else 1,
                 "new_calls_refused": refused, "turns_lost": 0 if answered else 1,
                 "turn_spoken_during_drain": spoken.reference})  # fmt: skip
    cluster.admin(f"set server firstline/{victim.name} state maint")
    print(f"  {rows[-1]}")
    await asyncio.to_thread(cluster.add_voice)
    # 3. kill -9 of an LLM replica between two turns of a call, and 4. in the
    # middle of a reply: what a voice replica does (RemoteEngine behind the
    # router, retrying before text; the turn's stream carried on after a cut).
    assert cluster.router is not None
    engine = RemoteEngine(cluster.router.root + "/v1", system_prompt=None, retry_before_text=True)
    await engine.start()
    try:
        for where in ("between turns", "mid-reply"):
            session = "fault-" + where.replace(" ", "-")
            served = [(_served(r) if r.alive() else -1) for r in cluster.llm]
            await _reply(engine, session, "Hello, who is this?", 8)
            victim = next(r for r, was in zip(cluster.llm, served, strict=True) if r.alive() and _served(r) > was)
            lost = 0
            if where == "mid-reply":
                request = _request(session, "Tell me a long story about a lighthouse.", 120)
                arrivals: list[float] = []
                try:
                    async for _ in stream_continuing(engine, request):
                        arrivals.append(time.perf_counter())
                        if len(arrivals) == 3:
                            victim.signal(signal.SIGKILL)
                except EngineError:
                    lost = 1
                pause = max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0)
                row: dict[str, Any] = {"fault": f"kill -9 of an LLM replica {where}", "calls_cut": 0,
                                       "turns_lost": lost, "reply_carried_on": request.usage.continuations,
                                       "longest_pause_in_reply_s": round(pause, 2)}  # fmt: skip
            else:
                victim.signal(signal.SIGKILL)
                t0 = time.perf_counter()
                try:
                    await _reply(engine, session, "Are you still there?", 8)
                except EngineError:
                    lost = 1
                row = {"fault": f"kill -9 of an LLM replica {where}", "calls_cut": 0, "turns_lost": lost,
                       "next_turn_first_token_after_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
            rows.append(row)
            print(f"  {rows[-1]}")
            if where == "between turns":
                await asyncio.to_thread(cluster.add_llm)
    finally:
        await engine.close()
    # 5. The same fault without the router: firstline's own client-side pool
    # (RemotePool) over the live replicas, to compare what it gives.
    await asyncio.to_thread(cluster.add_llm)
    alive = [r for r in cluster.llm if r.alive()]
    pool = RemotePool([RemoteEngine(r.root + "/v1", system_prompt=None) for r in alive], health_interval_s=1.0)
    await pool.start()
    try:
        await _reply(pool, "pool-call", "Hello, who is this?", 8)
        pinned = pool.pinned("pool-call")
        assert pinned is not None
        victim = next(r for r in alive if pinned.base_url.startswith(r.root))
        victim.signal(signal.SIGKILL)
        t0 = time.perf_counter()
        lost = 0
        try:
            await _reply(pool, "pool-call", "Are you still there?", 8)
        except EngineError:
            lost = 1
        after_s = round(time.perf_counter() - t0, 2)
        rows.append({"fault": "kill -9 of an LLM replica between turns (RemotePool, no router)", "calls_cut": 0,
                     "turns_lost": lost, "next_turn_first_token_after_s": after_s})  # fmt: skip
        print(f"  {rows[-1]}")
    finally:
        await pool.close()
    return rows


def _request(session: str, text: str, max_tokens: int) -> GenerationRequest:
    messages = [{"role": "system", "content": "You are a helpful voice assistant."}, {"role": "user", "content": text}]
    return GenerationRequest(f"{session}-{time.monotonic_ns()}", messages, max_tokens=max_tokens, session_key=session)


async def _reply(engine: LLMEngine, session: str, text: str, max_tokens: int) -> str:
    return "".join([d async for d in engine.stream(_request(session, text, max_tokens))])


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster(voice=2, llm=2, max_calls=ns.max_calls)
    t0 = time.perf_counter()
    await asyncio.to_thread(cluster.start)
    results: dict[str, Any] = {
        "machine": machine(),
        **provenance("benchmarks.cluster_bench"),
        "options": {"rounds": ns.rounds, "calls": ns.calls, "max_calls": ns.max_calls},
        "startup": {
            "cluster_s": round(time.perf_counter() - t0, 1),
            "llm_ready_s": [r.ready_s for r in cluster.llm],
            "voice_ready_s": [r.ready_s for r in cluster.voice],
        },
    }
    try:
        assert cluster.router is not None
        # The direct path: a replica outside HAProxy whose LLM is one engine replica, no router.
        direct = await asyncio.to_thread(cluster.add_voice, 300.0, None, False, cluster.llm[0].root + "/v1")
        print("TTFS, same calls, interleaved:")
        results["ttfs_ms"] = await ttfs_paths(cluster, direct, ns.rounds, ns.calls)
        print("each hop alone:")
        results["hops"] = await hops(cluster, direct, ns.hop_samples)
        print(json.dumps(results["hops"]))
        direct.stop()
        print("cold start:")
        results["cold_start"] = await cold_start(cluster)
        print(json.dumps(results["cold_start"]))
        print("faults:")
        results["faults"] = await faults(cluster)
    finally:
        await asyncio.to_thread(cluster.stop)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the TTFS comparison")
    p.add_argument("--calls", type=int, default=10, help="single-turn calls per path per round")
    p.add_argument("--hop-samples", type=int, default=30)
    p.add_argument("--max-calls", type=int, default=8)
    p.add_argument("--out", default=str(OUT))
    ns = p.parse_args()
    results = run_and_save(run(ns), ns.out)
    print(json.dumps({k: results[k] for k in ("ttfs_ms", "hops", "cold_start")}, indent=1))
    print(f"saved {ns.out}")


if __name__ == "__main__":
    main()
