"""What running the LLM out of process costs: in-process vs supervised child.

Both engines (same model, same settings) start in this process: the
in-process llama.cpp engine, and a :class:`~llm.supervisor.SupervisedEngine`
whose child runs ``llm.openai_server`` on loopback. They answer the same
phone-style turns, interleaved request by request (the order flips each
round), each turn carrying the call's history like a real call, so machine
noise lands on both alike. Reported per engine: LLM time to first token
(TTFT), time to the first complete sentence (TTFS at the engine, i.e. what the
voice pipeline adds the ASR time to), and decode tok/s; then how long the
supervisor takes to bring a SIGKILLed child back.

    python -m benchmarks.engine_isolation [--rounds 4] [--output benchmarks/results/engine_isolation.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from benchmarks.bench import provenance
from benchmarks.llm_engines import PHONE_PROMPTS
from llm.base import GenerationRequest, LLMEngine
from llm.config import LLMConfig
from llm.llamacpp_engine import LlamaCppEngine
from llm.supervisor import SupervisedEngine
from streaming.sentences import SentenceSegmenter

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 1)


async def one_turn(engine: LLMEngine, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    request = GenerationRequest(f"bench-{time.monotonic_ns()}", messages, max_tokens=max_tokens, session_key="bench")
    segmenter = SentenceSegmenter()
    t0 = time.perf_counter()
    ttft = ttfs = None
    text = []
    async for delta in engine.stream(request):
        now = time.perf_counter()
        if ttft is None:
            ttft = now - t0
        text.append(delta)
        if ttfs is None and segmenter.push(delta):
            ttfs = now - t0
    total = time.perf_counter() - t0
    if ttfs is None and segmenter.flush():
        ttfs = total
    n = request.usage.completion_tokens
    return {
        "ttft_ms": None if ttft is None else ttft * 1000,
        "ttfs_ms": None if ttfs is None else ttfs * 1000,
        "total_ms": total * 1000,
        "completion_tokens": n,
        "cached_tokens": request.usage.cached_tokens,
        "decode_tok_s": (n - 1) / (total - ttft) if ttft is not None and n > 1 and total > ttft else None,
        "reply": "".join(text),
    }


def summarise(turns: list[dict[str, Any]]) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [t[key] for t in turns if t[key] is not None]

    return {
        "turns": len(turns),
        "ttft_p50_ms": pct(col("ttft_ms"), 50),
        "ttft_p95_ms": pct(col("ttft_ms"), 95),
        "ttfs_p50_ms": pct(col("ttfs_ms"), 50),
        "ttfs_p95_ms": pct(col("ttfs_ms"), 95),
        "decode_tok_s_p50": pct(col("decode_tok_s"), 50),
    }


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    config = LLMConfig(threads=ns.threads, parallel=ns.parallel)
    engines: dict[str, LLMEngine] = {}
    startup: dict[str, float] = {}
    for name, engine in (("inprocess", LlamaCppEngine(config)), ("process", SupervisedEngine(config))):
        t0 = time.perf_counter()
        await engine.start()
        startup[name] = round(time.perf_counter() - t0, 2)
        engines[name] = engine
    turns: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    try:
        for rnd in range(ns.rounds):
            order = list(engines) if rnd % 2 == 0 else list(reversed(engines))
            # One call per engine per round: history grows turn by turn.
            history: dict[str, list[dict[str, str]]] = {name: [] for name in engines}
            for prompt in PHONE_PROMPTS:
                for name in order:
                    messages = [
                        {"role": "system", "content": config.system_prompt},
                        *history[name][-2 * config.history_turns :],
                        {"role": "user", "content": prompt},
                    ]
                    turn = await one_turn(engines[name], messages, ns.max_tokens)
                    turns[name].append(turn)
                    history[name] += [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": turn["reply"]},
                    ]
        supervised = engines["process"]
        assert isinstance(supervised, SupervisedEngine)
        t0 = time.perf_counter()
        supervised.kill_child()
        await supervised.wait_up(120)
        restart_s = round(time.perf_counter() - t0, 2)
        restart_turn = await one_turn(supervised, [{"role": "user", "content": PHONE_PROMPTS[0]}], ns.max_tokens)
    finally:
        for engine in engines.values():
            await engine.close()
    summary = {name: {**summarise(t), "startup_s": startup[name]} for name, t in turns.items()}
    delta = {
        key: round(summary["process"][key] - summary["inprocess"][key], 1)
        for key in ("ttft_p50_ms", "ttft_p95_ms", "ttfs_p50_ms", "ttfs_p95_ms")
        if summary["process"][key] is not None and summary["inprocess"][key] is not None
    }
    return {
        "benchmark": "engine_isolation",
        **provenance("benchmarks.engine_isolation"),  # the commit and the command
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "settings": {
            "rounds": ns.rounds,
            "prompts": len(PHONE_PROMPTS),
            "max_tokens": ns.max_tokens,
            "threads": ns.threads,
            "parallel": ns.parallel,
        },
        "summary": summary,
        "process_minus_inprocess_ms": delta,
        "restart_after_sigkill_s": restart_s,
        "first_turn_after_restart_ttft_ms": restart_turn["ttft_ms"],
        "turns": {name: [{k: v for k, v in t.items() if k != "reply"} for t in ts] for name, ts in turns.items()},
    }


def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="passes over the prompts (order flips each pass)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--output", default=str(RESULTS / "engine_isolation.json"))
    ns = parser.parse_args(argv)
    result = asyncio.run(run(ns))
    head = ["TTFT p50", "TTFT p95", "TTFS p50", "TTFS p95"]
    print(f"{'isolation':<10} " + " ".join(f"{h:>9}" for h in head) + f" {'tok/s':>6} {'start s':>8}")
    for name, s in result["summary"].items():
        print(f"{name:<10} {s['ttft_p50_ms']:>9} {s['ttft_p95_ms']:>9} {s['ttfs_p50_ms']:>9} {s['ttfs_p95_ms']:>9} "
              f"{s['decode_tok_s_p50']:>6} {s['startup_s']:>8}")  # fmt: skip
    print("process - inprocess (ms):", result["process_minus_inprocess_ms"])
    print(f"restart after SIGKILL: {result['restart_after_sigkill_s']} s")
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
