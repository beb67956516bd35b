"""First sentences side by side against one at a time, and against two
copies of the engine, on the embedded LLM (llama.cpp on this CPU, the
server's own settings): why the server runs two single-threaded copies
(llm/replicas.py, --llm-replicas) and can give one turn at a time a lane to
generate its first sentence in (streaming/fair_share.FirstSentences.lane).

Each round is k callers' turns that reach the LLM together: k distinct phone
questions (a round tag keeps every prompt out of the prefix cache past the
system prompt, as a new caller turn is), each generated until its first
sentence is complete (streaming/sentences.py, as the server cuts them) and
no further. "together": all k requests at once, as the engine batches them.
"one at a time": each starts when the one before has its first sentence.
"two copies": all k at once through llm.replicas.ReplicaSet over two
copies of the engine (each with the server's threads), which spreads them.
Greedy sampling, so the modes produce much the same sentences; their order
rotates round by round (this machine is noisy). Reported per mode: the
time from the round's start to each turn's first sentence (p50, p95 over
all turns) and to the round's last first sentence. Results print and go to
benchmarks/results/first_sentence_lanes.json.

    python -m benchmarks.first_sentence_lanes          # k = 2, 3, 4; 8 rounds each
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench import write_rows
from llm.base import GenerationRequest, LLMEngine
from llm.config import LLMConfig, threads_for
from llm.llamacpp_engine import LlamaCppEngine
from llm.replicas import ReplicaSet
from streaming.sentences import SentenceSegmenter
from voice.server.config import ServerConfig

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "What time do you open tomorrow morning?",
    "Can I move my appointment to Friday afternoon?",
    "My order number is four five two nine one, where is it?",
    "Do you deliver to Boston, and how much does it cost?",
    "How do I reset the password on my voicemail?",
    "I was charged twice this month, can you fix that?",
]


def _pct(xs: list[float], q: float) -> float:
    """Nearest rank (ceil: round(x + 0.5) rounded halves to even, a rank too high)."""
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))] * 1000, 1)


async def _first_sentence(engine: LLMEngine, config: LLMConfig, text: str, rid: str, max_words: int) -> str:
    messages = [{"role": "system", "content": config.system_prompt}, {"role": "user", "content": text}]
    request = GenerationRequest(rid, messages, sampling=config.sampling.merged({"temperature": 0.0}))
    segmenter = SentenceSegmenter(max_words=max_words)
    stream = engine.stream(request)
    try:
        async for delta in stream:
            for sentence in segmenter.push(delta):
                return sentence  # the rest is not this benchmark's business
    finally:
        await stream.aclose()  # cancels the request inside llama.cpp
    return " ".join(segmenter.flush())


async def _round(engine: LLMEngine, config: LLMConfig, k: int, tag: str, together: bool,
                 max_words: int) -> tuple[list[float], list[str]]:  # fmt: skip
    texts = [f"{QUESTIONS[i % len(QUESTIONS)]} ({tag})" for i in range(k)]
    started = time.perf_counter()
    done: list[float] = [0.0] * k
    said: list[str] = [""] * k

    async def one(i: int) -> None:
        said[i] = await _first_sentence(engine, config, texts[i], f"{tag}-{i}", max_words)
        done[i] = time.perf_counter() - started

    if together:
        await asyncio.gather(*(one(i) for i in range(k)))
    else:
        for i in range(k):
            await one(i)
    return done, said


async def run(ks: list[int], rounds: int) -> list[dict[str, Any]]:
    server = ServerConfig()
    config = server.llm
    config.parallel = max(ks)
    config.threads = threads_for(os.cpu_count() or 2)  # as the server picks them
    engine = LlamaCppEngine(config)
    second = LlamaCppEngine(config)
    await engine.start()
    await second.start()
    copies = ReplicaSet([engine, second])
    modes = ["together", "one at a time", "two copies"]
    rows = []
    try:
        for k in ks:
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            last: dict[str, list[float]] = {mode: [] for mode in modes}
            same = 0
            for r in range(rounds):
                said = {}
                for mode in modes[r % 3 :] + modes[: r % 3]:  # which mode goes first rotates
                    done, said[mode] = await _round(copies if mode == "two copies" else engine, config, k,
                                                    f"k{k}r{r}{mode[0]}{mode[-1]}", mode != "one at a time",
                                                    server.sentence_max_words)  # fmt: skip
                    times[mode] += done
                    last[mode].append(max(done))
                same += sum(a == b for a, b in zip(said["together"], said["one at a time"], strict=True))
            row: dict[str, Any] = {"k": k, "rounds": rounds, "same_first_sentences": f"{same}/{k * rounds}"}
            for mode in times:
                row[mode] = {
                    "first_sentence_p50_ms": _pct(times[mode], 50),
                    "first_sentence_p95_ms": _pct(times[mode], 95),
                    "last_first_sentence_p50_ms": round(statistics.median(last[mode]) * 1000, 1),
                }
            print(
                f"k={k}: first sentence p50/p95, last of the round p50 (ms): together "
                f"{row['together']['first_sentence_p50_ms']:.0f} / {row['together']['first_sentence_p95_ms']:.0f}, "
                f"{row['together']['last_first_sentence_p50_ms']:.0f}; one at a time "
                f"{row['one at a time']['first_sentence_p50_ms']:.0f} / "
                f"{row['one at a time']['first_sentence_p95_ms']:.0f}, "
                f"{row['one at a time']['last_first_sentence_p50_ms']:.0f}; two copies "
                f"{row['two copies']['first_sentence_p50_ms']:.0f} / {row['two copies']['first_sentence_p95_ms']:.0f}, "
                f"{row['two copies']['last_first_sentence_p50_ms']:.0f} ({row['same_first_sentences']} same)",
                flush=True,
            )
            rows.append(row)
    finally:
        await copies.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4], help="turns reaching the LLM together")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "first_sentence_lanes.json")
    ns = parser.parse_args()
    started = time.time()
    rows = asyncio.run(run(ns.k, ns.rounds))
    write_rows(ns.out, started, {"k": ns.k, "rounds": ns.rounds}, rows)


if __name__ == "__main__":
    main()
