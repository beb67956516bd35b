"""LLM engine latency on phone-style turns: start time, TTFT, tok/s, acceptance.

Each engine x speculation method starts once (start time includes its warm-up
generation), then answers the same short customer-service questions one at a
time, as a single call would ask them. Results print as a table and go to
benchmarks/results/llm_engines.json.

    python -m benchmarks.llm_engines                         # vllm, none + ngram
    python -m benchmarks.llm_engines --engine vllm --engine llamacpp
    python -m benchmarks.llm_engines --speculation ngram --rounds 3

An engine is one entry in ENGINES: a name and the class implementing
:class:`llm.base.LLMEngine`, imported only when that engine is asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench import versions
from llm.base import GenerationRequest, LLMEngine
from llm.config import LLMConfig, SpeculationConfig

RESULTS = Path(__file__).resolve().parent / "results"

# name -> "module:Class"; every class takes an LLMConfig.
ENGINES: dict[str, str] = {
    "vllm": "llm.vllm_engine:VLLMEngine",
    "llamacpp": "llm.llamacpp_engine:LlamaCppEngine",
}

# What callers to a support line ask; several quote a detail (order number,
# address, date) that a good reply repeats, which is where ngram drafts hit.
PHONE_PROMPTS: list[str] = [
    "Hi, what time do you open on Saturday?",
    "Can you tell me the status of my order, number 4 5 7 2 1?",
    "I want to change my delivery address to 12 Oak Street, Springfield.",
    "How do I reset my password?",
    "Is the store on Main Street open on public holidays?",
    "I was charged twice for my last bill. Can you help?",
    "Can I book an appointment for Tuesday at 3 pm?",
    "What is your return policy for shoes?",
    "My internet has been down since this morning.",
    "Do you deliver to the airport area?",
    "Can you repeat the confirmation code, please?",
    "I'd like to speak to someone about cancelling my subscription.",
]


@dataclass
class Turn:
    prompt: str
    reply: str
    ttft_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    draft_tokens: int
    accepted_tokens: int

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first, per second after the first arrived."""
        after_first = self.total_s - self.ttft_s
        if self.completion_tokens < 2 or after_first <= 0:
            return None
        return (self.completion_tokens - 1) / after_first


def load_engine(name: str, config: LLMConfig) -> LLMEngine:
    module_name, class_name = ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 12 samples p95 is the largest, not an
    interpolation past it."""
    ordered = sorted(values)
    # ceil, not round(x + 0.5): Python rounds halves to even, which put
    # p95 of 20 and p50 of 10 one rank too high.
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


async def ask(engine: LLMEngine, config: LLMConfig, prompt: str, index: int) -> Turn:
    messages = [{"role": "system", "content": config.system_prompt}, {"role": "user", "content": prompt}]
    request = GenerationRequest(f"bench-{index}", messages, max_tokens=config.max_tokens)
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    async for delta in engine.stream(request):
        if first is None:
            first = time.perf_counter() - started
        parts.append(delta)
    total = time.perf_counter() - started
    usage = request.usage
    return Turn(
        prompt=prompt,
        reply="".join(parts),
        ttft_s=first if first is not None else total,
        total_s=total,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        draft_tokens=usage.draft_tokens,
        accepted_tokens=usage.accepted_tokens,
    )


def summarize(turns: list[Turn]) -> dict[str, Any]:
    ttfts = [t.ttft_s for t in turns]
    decode = [r for t in turns if (r := t.decode_tok_s) is not None]
    tokens = sum(t.completion_tokens for t in turns)
    drafted = sum(t.draft_tokens for t in turns)
    accepted = sum(t.accepted_tokens for t in turns)
    return {
        "turns": len(turns),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p95_ms": round(percentile(ttfts, 95) * 1000, 1),
        # Overall: all reply tokens over all wall time, TTFT included.
        "tok_s": round(tokens / sum(t.total_s for t in turns), 1),
        "decode_tok_s_p50": round(statistics.median(decode), 1) if decode else None,
        "completion_tokens_mean": round(tokens / len(turns), 1),
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
    }


async def run_one(name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    config = LLMConfig(
        engine=name,  # type: ignore[arg-type]
        model=args.model,
        device=args.device,
        threads=args.threads,
        max_tokens=args.max_tokens,
        speculation=SpeculationConfig(method=method, num_tokens=args.num_spec_tokens),  # type: ignore[arg-type]
    )
    engine = load_engine(name, config)
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    try:
        turns = []
        for round_index in range(args.rounds):
            for i, prompt in enumerate(PHONE_PROMPTS[: args.prompts]):
                turns.append(await ask(engine, config, prompt, round_index * 100 + i))
        described = engine.describe()
    finally:
        await engine.close()
    summary = {"engine": name, "speculation": method, "start_s": round(start_s, 2), **summarize(turns)}
    return {
        "summary": summary,
        "describe": described,
        "turns": [asdict(t) | {"decode_tok_s": t.decode_tok_s} for t in turns],
    }


def print_table(summaries: list[dict[str, Any]]) -> None:
    columns = [
        "engine", "speculation", "start_s", "ttft_p50_ms", "ttft_p95_ms",
        "tok_s", "decode_tok_s_p50", "acceptance_rate",
    ]  # fmt: skip
    print("  ".join(f"{c:>16}" for c in columns))
    for summary in summaries:
        print("  ".join(f"{summary.get(c)!s:>16}" for c in columns))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", action="append", choices=sorted(ENGINES), help="repeatable; default vllm")
    parser.add_argument(
        "--speculation", action="append", choices=["none", "ngram", "eagle3", "draft_model", "mtp", "suffix"],
        help="repeatable; default none and ngram",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=len(PHONE_PROMPTS), help="questions per round")
    parser.add_argument("--rounds", type=int, default=1, help="times each question is asked")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-spec-tokens", type=int, default=4)
    parser.add_argument("--model", default=None, help="model path; default the embedded SmolLM2")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_engines.json")
    args = parser.parse_args(argv)
    args.engine = args.engine or ["vllm"]
    args.speculation = args.speculation or ["none", "ngram"]
    return args


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    # Sequential on purpose: two engines at once would share the cores.
    return [await run_one(name, method, args) for name in args.engine for method in args.speculation]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    print_table([r["summary"] for r in results])
    report = {
        "benchmark": "llm_engines",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "versions": versions(),  # the commit measured (README figures must come from a clean one)
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM spawns its workers, which re-import __main__
    main()
