"""What a connected call costs the server while its line is silent.

Each caller is a Twilio Media Streams websocket that sends a 20 ms frame of
μ-law silence (0xFF) every 20 ms and never speaks, so no turn, decode or
reply happens: what the server spends is the work every call pays for its
whole length, frame by frame (websocket and JSON parsing, μ-law decoding,
resampling to 16 kHz, Silero VAD on every 32 ms chunk, the per-call
bookkeeping). A call of real speech pays it under its turns too, which is
why ``benchmarks.bench``'s CPU per answered turn is highest at 1 call: a
turn there spans ~11 s of line. Reported per level: the server's CPU
seconds per second of call and per 20 ms frame, by stage, with an idle
server (no call) first.

    python -m benchmarks.line_cost --calls 1 4 8 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from benchmarks.bench import thread_cpu, write_rows
from benchmarks.callers.base import to_wire
from benchmarks.callers.twilio import Twilio
from benchmarks.loadgen import FRAME_S, SILENCE
from benchmarks.server_proc import firstline_server


async def silent_call(url: str, seconds: float) -> int:
    """One caller: the opening, ``seconds`` of silent frames in real time
    (an absolute schedule, no drift), the hang-up. Returns frames sent."""
    from websockets.asyncio.client import connect

    wire = Twilio()
    sent = 0
    async with connect(url + Twilio.path, compression=None) as ws:
        for msg in wire.opening():
            await ws.send(to_wire(msg))

        async def drain() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(round(seconds / FRAME_S)):
            await ws.send(to_wire(wire.media(SILENCE)))
            sent += 1
            await asyncio.sleep(max(0.0, t0 + (i + 1) * FRAME_S - loop.time()))
        for msg in wire.closing():
            await ws.send(to_wire(msg))
        reader.cancel()
    return sent


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in after}


async def measure(pid: int, url: str, calls: int, seconds: float) -> dict[str, Any]:
    before = thread_cpu(pid)
    t0 = time.monotonic()
    if calls:
        frames = sum(await asyncio.gather(*(silent_call(url, seconds) for _ in range(calls))))
    else:
        await asyncio.sleep(seconds)
        frames = 0
    wall = time.monotonic() - t0
    by_stage = _delta(thread_cpu(pid), before)
    cpu = sum(by_stage.values())
    call_s = calls * wall
    return {
        "calls": calls,
        "wall_s": round(wall, 2),
        "frames": frames,
        "cpu_s": round(cpu, 3),
        "cpu_s_by_stage": by_stage,
        "cpu_s_per_call_s": round(cpu / call_s, 4) if call_s else None,
        "cpu_us_per_frame": round(cpu / frames * 1e6, 1) if frames else None,
    }


async def main_async(ns: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with firstline_server(ns.serve_args.split()) as server:
        url = f"ws://127.0.0.1:{server.port}"
        await silent_call(url, 1.0)  # first-call warm-up (the TTS warms once per process)
        for calls in [0, *ns.calls]:
            row = await measure(server.proc.pid, url, calls, ns.seconds)
            print(
                f"{calls:>3} calls: {row['cpu_s']} CPU-s in {row['wall_s']} s"
                + (
                    f", {row['cpu_s_per_call_s']} CPU-s per call-second, {row['cpu_us_per_frame']} µs per frame"
                    if calls
                    else " (idle)"
                )
                + f"  {row['cpu_s_by_stage']}"
            )
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each level's calls")
    ap.add_argument("--serve-args", default="", help="extra `firstline serve` flags")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/line_cost.json"))
    ns = ap.parse_args()
    started = time.time()
    rows = asyncio.run(main_async(ns))
    write_rows(ns.out, started, vars(ns) | {"out": str(ns.out)}, rows)


if __name__ == "__main__":
    main()
