"""How llama.cpp's slot choice keeps calls' histories cached.

One llama.cpp engine (the embedded model, the server's prompt head), ``slots``
slots, ``calls`` conversations taking turns in a shuffled order, each turn a
short reply. For every turn after a call's first: the prompt tokens llama.cpp
computed (not served from a slot or the host-RAM cache). Both slot choices
(LLMConfig.slot_choice) in the same run, for each calls x slots setting.

    python -m benchmarks.llm_slots                          # 3, 4, 6, 8 calls on 4 slots
    python -m benchmarks.llm_slots --calls 4 8 --slots 4 --turns 5

Writes benchmarks/results/llm_slots.json (with the git commit and machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench import write_rows
from llm.base import GenerationRequest
from llm.config import LLMConfig
from llm.llamacpp_engine import LlamaCppEngine

OUT = Path(__file__).parent / "results" / "llm_slots.json"
CHOICES: tuple[Literal["similarity", "lru-restore"], ...] = ("similarity", "lru-restore")


async def conversation_round(
    engine: LlamaCppEngine, config: LLMConfig, calls: int, turns: int, seed: int
) -> dict[str, Any]:
    head = config.prompt_head()
    rng = random.Random(seed)
    history: dict[int, list[dict[str, str]]] = {c: [] for c in range(calls)}
    computed: list[int] = []
    started = time.perf_counter()
    for turn in range(turns):
        order = list(range(calls))
        rng.shuffle(order)
        for c in order:
            user = {
                "role": "user",
                "content": f"This is caller {c}. My order {1000 * c + turn} has not arrived and I need it by Friday.",
            }
            request = GenerationRequest(
                f"slots-{c}-{turn}", [*head, *history[c], user], max_tokens=24, session_key=f"call{c}"
            )
            reply = [piece async for piece in engine.stream(request)]
            if turn > 0:
                computed.append(request.usage.prompt_tokens - request.usage.cached_tokens)
            history[c] += [user, {"role": "assistant", "content": "".join(reply)}]
    return {
        "computed_mean": round(statistics.mean(computed), 1),
        "computed_p50": statistics.median(computed),
        "computed_max": max(computed),
        "later_turns": len(computed),
        "wall_s": round(time.perf_counter() - started, 2),
    }


async def main_async(ns: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for slots in ns.slots:
        for calls in ns.calls:
            for choice in CHOICES:
                # A fresh engine for each: nothing cached from another setting.
                config = LLMConfig(parallel=slots, threads=1, replicas=1, slot_choice=choice)
                engine = LlamaCppEngine(config)
                await engine.start()
                try:
                    row = {"slots": slots, "calls": calls, "slot_choice": choice}
                    row.update(await conversation_round(engine, config, calls, ns.turns, ns.seed))
                finally:
                    await engine.close()
                print(row, flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[3, 4, 6, 8])
    parser.add_argument("--slots", type=int, nargs="+", default=[4])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default=str(OUT))
    ns = parser.parse_args()
    started = time.time()
    rows = asyncio.run(main_async(ns))
    print(f"\n{'slots':>5} {'calls':>5} {'choice':<12} {'computed / later turn (mean, p50, max)':>40} {'wall s':>7}")
    for r in rows:
        stats = f"{r['computed_mean']}, {r['computed_p50']}, {r['computed_max']}"
        print(f"{r['slots']:>5} {r['calls']:>5} {r['slot_choice']:<12} {stats:>40} {r['wall_s']:>7}")
    write_rows(Path(ns.output), started, {k: v for k, v in vars(ns).items() if k != "output"}, rows)


if __name__ == "__main__":
    main()
