"""The embedded LLM's weights as shipped (Q4_1) against requantized to Q8_0
and to Q4_0 (llm/models.py), on llama.cpp on this CPU: prefill and decode time per token.

A turn's prompt is mostly in the prefix cache, but the caller's words and
the previous reply are not: a prefill of tens of tokens sits between the
final transcript and the first token. All three run the same
prompts in one process, one after the other, each with the thread counts
given, one request at a time (nothing else running). Prefill: a distinct
prompt per request (nothing cached past the system prompt), one output
token, wall time per new prompt token. Decode: 64-token replies, wall time
per token after the first. Results print and go to
benchmarks/results/llm_quant.json.

    python -m benchmarks.llm_quant                # threads 1 and 2, 6 prompts each
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench import write_rows
from llm.base import GenerationRequest
from llm.config import LLMConfig
from llm.llamacpp_engine import LlamaCppEngine

RESULTS = Path(__file__).resolve().parent / "results"
QUANTS: dict[str, str | None] = {
    "Q4_1 (shipped)": None,
    "Q8_0 (requantized)": "Q8_0",
    "Q4_0 (requantized)": "Q4_0",
}
# Words for prompts no cache has seen: phone-call vocabulary in random order.
WORDS = (
    "the caller asked about their voicemail box and the account number was lost somewhere in a list of items "
    "please transfer me to billing my order number is four five two nine one and I moved last week"
).split()
DECODE_QUESTION = "Can you tell me how to reset my voicemail password?"


async def _wall(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[float, float | None]:
    """(total s, first delta s) of one request."""
    started = time.perf_counter()
    first = None
    async for _ in engine.stream(request):
        if first is None:
            first = time.perf_counter() - started
    return time.perf_counter() - started, first


async def measure(quant: str | None, threads: int, prompts: int, words: int, seed: int) -> dict[str, Any]:
    config = LLMConfig(isolation="inprocess", embedded_quant=quant, threads=threads, parallel=1)
    engine = LlamaCppEngine(config)
    await engine.start()
    rng = random.Random(seed)
    try:
        prefill: list[float] = []
        for i in range(prompts):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            messages = [{"role": "system", "content": config.system_prompt}, {"role": "user", "content": text}]
            request = GenerationRequest(f"prefill-{i}", messages, sampling=config.sampling.merged({"max_tokens": 1}))
            total, _ = await _wall(engine, request)
            new = request.usage.prompt_tokens - request.usage.cached_tokens
            prefill.append(1000 * total / max(1, new))
        decode: list[float] = []
        for i in range(prompts):
            messages = [{"role": "system", "content": config.system_prompt},
                        {"role": "user", "content": f"{DECODE_QUESTION} ({i})"}]  # fmt: skip
            request = GenerationRequest(f"decode-{i}", messages, sampling=config.sampling.merged({"max_tokens": 64}))
            total, first = await _wall(engine, request)
            tokens = request.usage.completion_tokens
            if first is not None and tokens > 1:
                decode.append(1000 * (total - first) / (tokens - 1))
        return {
            "model": engine.model_path.name,
            "threads": threads,
            "prefill_ms_per_token_p50": round(statistics.median(prefill), 2),
            "prefill_ms_per_token": [round(x, 2) for x in prefill],
            "decode_ms_per_token_p50": round(statistics.median(decode), 2),
            "decode_ms_per_token": [round(x, 2) for x in decode],
        }
    finally:
        await engine.close()


async def run(threads: list[int], prompts: int, words: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for n in threads:
        for name, quant in QUANTS.items():
            row = {"weights": name, **await measure(quant, n, prompts, words, seed)}
            print(
                f"{name:20s} threads {n}: prefill {row['prefill_ms_per_token_p50']:.2f} ms/token, "
                f"decode {row['decode_ms_per_token_p50']:.2f} ms/token",
                flush=True,
            )
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=6, help="prompts per measurement")
    parser.add_argument("--words", type=int, default=40, help="words per prefill prompt")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_quant.json")
    ns = parser.parse_args()
    started = time.time()
    rows = asyncio.run(run(ns.threads, ns.prompts, ns.words, ns.seed))
    options = {"threads": ns.threads, "prompts": ns.prompts, "words": ns.words, "seed": ns.seed}
    write_rows(ns.out, started, options, rows)


if __name__ == "__main__":
    main()
