"""Place one call from an audio file and print what the server says.

python -m benchmarks.call ../shared/data/speech/jfk.wav [--url ws://127.0.0.1:8765/v1/call]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from benchmarks.client import NativeCaller, last_voiced_s
from benchmarks.corpus import load_audio


async def run(ns: argparse.Namespace) -> None:
    path = Path(ns.audio)
    audio8 = np.concatenate([load_audio(path, 8000), np.zeros(int(8000 * ns.tail), np.float32)])
    voice_end = last_voiced_s(load_audio(path, 16000))
    options = {"endpoint_silence_ms": ns.endpoint_ms} if ns.endpoint_ms else {}
    async with NativeCaller(ns.url) as caller:
        await caller.start("mulaw", 8000, options=options)
        await caller.play(audio8, 8000, "mulaw", realtime=not ns.fast, last_voice_s=voice_end)
        last_turn = max((e["turn"] for e in caller.result.of("turn.ended")), default=None)
        if last_turn is not None:
            await caller.wait_for("turn.metrics", turn=last_turn, timeout=60)
        for r in caller.result.events:
            if r.event["type"] != "response.delta":
                print(json.dumps(r.event))
        if caller.result.ttfs_s is not None:
            print(f"TTFS (caller side): {caller.result.ttfs_s * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio")
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/call")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds of silence after the audio")
    parser.add_argument("--endpoint-ms", type=int, default=None, help="per-call endpoint silence window")
    parser.add_argument("--fast", action="store_true", help="send faster than real time")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
