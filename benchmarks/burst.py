"""A 2x burst against admission control: are refusals fast and clean, and do
the admitted calls keep their TTFS?

Starts one `firstline serve` process with ``--max-calls N``. Then, in the same
run: ``--rounds`` rounds of N simultaneous real-time calls (the baseline, all
admitted), and ``--rounds`` rounds of 2N simultaneous calls (the burst). Each
call speaks one real phone prompt at real time and waits for its reply.
Prints and saves (benchmarks/results/burst.json) TTFS p50/p95 of admitted
calls in both phases, how many burst calls were refused, and how long a
refusal took to arrive.

    python -m benchmarks.burst --max-calls 4 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from websockets.exceptions import InvalidStatus

from benchmarks.bench import provenance
from benchmarks.client import NativeCaller, last_voiced_s
from benchmarks.corpus import Utterance, asterisk_prompts
from benchmarks.server_proc import firstline_server

RESULTS = Path(__file__).parent / "results" / "burst.json"


async def one_call(url: str, clip: Utterance) -> dict[str, object]:
    t0 = time.monotonic()
    try:
        async with NativeCaller(url) as caller:
            await caller.start("mulaw", 8000)
            audio = clip.load(8000)
            voiced = last_voiced_s(clip.load())
            audio = np.concatenate([audio, np.zeros(12000, dtype=audio.dtype)])
            await caller.play(audio, 8000, "mulaw", realtime=True, last_voice_s=voiced)
            try:
                answered = await caller.settle(0, timeout=60)
            except ConnectionError:
                answered = None
            ttfs = caller.result.ttfs_s
            if answered is None or ttfs is None:
                return {"outcome": "lost"}
            await caller.stop()
            return {"outcome": "ok", "ttfs_ms": None if ttfs is None else round(ttfs * 1000, 1)}
    except InvalidStatus as exc:
        status = exc.response.status_code
        return {"outcome": "refused", "status": status, "refusal_ms": round((time.monotonic() - t0) * 1000, 1)}
    except (TimeoutError, ConnectionError, OSError) as exc:
        return {"outcome": "error", "detail": str(exc)[:200]}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def summary(rows: list[dict[str, object]]) -> dict[str, object]:
    ttfs = [float(r["ttfs_ms"]) for r in rows if r.get("ttfs_ms") is not None]
    refusals = [float(r["refusal_ms"]) for r in rows if r["outcome"] == "refused"]
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[str(r["outcome"])] = outcomes.get(str(r["outcome"]), 0) + 1
    return {
        "calls": len(rows),
        "outcomes": outcomes,
        "ttfs_p50_ms": statistics.median(ttfs) if ttfs else None,
        "ttfs_p95_ms": pct(ttfs, 0.95),
        "refusal_max_ms": max(refusals) if refusals else None,
        "refusal_p50_ms": statistics.median(refusals) if refusals else None,
    }


async def run(port: int, max_calls: int, rounds: int) -> dict[str, object]:
    url = f"ws://127.0.0.1:{port}/v1/call"
    prompts = [p for p in asterisk_prompts(min_words=5) if len(p.reference.split()) <= 14]
    if not prompts:
        sys.exit("asterisk-core-sounds-en-wav not installed")
    phases: dict[str, list[dict[str, object]]] = {"baseline": [], "burst": []}
    k = 0
    for r in range(rounds):
        for phase, n in (("baseline", max_calls), ("burst", 2 * max_calls)):
            clips = [prompts[(k + i) % len(prompts)] for i in range(n)]
            k += n
            rows = await asyncio.gather(*(one_call(url, c) for c in clips))
            phases[phase].extend(rows)
            print(f"  round {r + 1} {phase} x{n}: {summary(list(rows))['outcomes']}", flush=True)
            await asyncio.sleep(1.0)
    return {phase: {**summary(rows), "rows": rows} for phase, rows in phases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-calls", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-args", default="", help="extra `firstline serve` arguments")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with firstline_server(["--max-calls", str(args.max_calls), *args.serve_args.split()]) as server:
        result = asyncio.run(run(server.port, args.max_calls, args.rounds))
    result.update(provenance("benchmarks.burst"))
    result["config"] = {"max_calls": args.max_calls, "rounds": args.rounds, "serve_args": args.serve_args}
    for phase in ("baseline", "burst"):
        s = {k: v for k, v in result[phase].items() if k != "rows"}  # type: ignore[union-attr]
        print(f"{phase}: {json.dumps(s)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"saved {args.output}")
    burst = result["burst"]
    lost = burst["outcomes"].get("lost", 0) + burst["outcomes"].get("error", 0)  # type: ignore[index,union-attr]
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
