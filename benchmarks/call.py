"""Place one call from an audio file, or from a sentence the embedded TTS
voice speaks, and print what the server says.

python -m benchmarks.call --say "What time do you open tomorrow?" [--url ws://127.0.0.1:8765/v1/call]
python -m benchmarks.call recording.wav
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np

from benchmarks.client import NativeCaller, last_voiced_s
from benchmarks.corpus import load_audio, spoken


async def run(ns: argparse.Namespace) -> None:
    if ns.say:
        import soxr

        audio16 = spoken(ns.say, 16000)
        audio8 = soxr.resample(audio16, 16000, 8000).astype(np.float32)
    else:
        audio16, audio8 = load_audio(Path(ns.audio), 16000), load_audio(Path(ns.audio), 8000)
    audio8 = np.concatenate([audio8, np.zeros(int(8000 * ns.tail), np.float32)])
    voice_end = last_voiced_s(audio16)
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
    parser.add_argument("audio", nargs="?", help="a WAV/FLAC file (any rate; sent as 8 kHz mu-law)")
    parser.add_argument("--say", help="speak this sentence with the embedded TTS voice instead of a file")
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/call")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds of silence after the audio")
    parser.add_argument("--endpoint-ms", type=int, default=None, help="per-call endpoint silence window")
    parser.add_argument("--fast", action="store_true", help="send faster than real time")
    ns = parser.parse_args()
    if bool(ns.audio) == bool(ns.say):
        parser.error("give an audio file or --say TEXT (one of them)")
    asyncio.run(run(ns))


if __name__ == "__main__":
    main()
