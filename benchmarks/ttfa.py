"""Time to first audio over a carrier protocol, measured by the caller.

A fake Twilio streams real phone prompts at real time (20 ms μ-law frames)
to a fresh server; for each call: the last voiced frame leaving the caller ->
the first reply audio frame arriving back. Also prints the server's own
per-turn split (ttfs + TTS). Usage: python -m benchmarks.ttfa [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench_report import pct
from benchmarks.client import last_voiced_s
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher, FakeTwilio
from tests.transport_checks import prompt_clip
from voice.server.app import VoiceServer
from voice.server.config import ServerConfig


async def run(calls: int) -> dict[str, object]:
    server = VoiceServer(ServerConfig(port=0))
    await server.start()
    caller_ms: list[float] = []
    server_rows: list[dict[str, float]] = []
    try:
        for i in range(calls):
            clip = prompt_clip(60 + i)
            with CallWatcher() as watcher:
                async with FakeTwilio(f"ws://127.0.0.1:{server.port}") as carrier:
                    call = await watcher.one()
                    audio = clip.load(8000)
                    voiced = last_voiced_s(clip.load())
                    await carrier.say(with_silence(audio, 8000, 2.0), speed=1.0, last_voice_s=voiced)
                    await carrier.wait_audio(timeout=30)
                    await watcher.wait_event(call, "turn.metrics", timeout=30)
                    assert carrier.first_audio_at is not None and carrier.last_voice_sent_at is not None
                    caller_ms.append(round((carrier.first_audio_at - carrier.last_voice_sent_at) * 1000, 1))
                    for _ in range(50):
                        if 1 in call.audio_metrics:
                            break
                        await asyncio.sleep(0.02)
                    server_rows.append(call.audio_metrics.get(1, {}))
    finally:
        await server.close()
    tts = [r["tts_first_audio_ms"] for r in server_rows if r]
    # A negative time: the reply's audio came back before the caller's last
    # word left, i.e. the endpoint cut the prompt at an inner pause. That is
    # an endpointing miss, counted apart, not a latency.
    valid = [ms for ms in caller_ms if ms > 0]
    from benchmarks.bench import machine, provenance

    return {
        **provenance("benchmarks.ttfa"),
        "machine": machine(),
        "calls": calls,
        "caller_ttfa_ms": caller_ms,
        "cut_off_calls": len(caller_ms) - len(valid),
        "caller_ttfa_median_ms": statistics.median(valid) if valid else None,
        "caller_ttfa_p95_ms": pct(valid, 95),
        "caller_ttfa_max_ms": max(valid) if valid else None,
        "server_ttfa_ms": [r.get("ttfa_ms") for r in server_rows],
        "tts_first_audio_median_ms": statistics.median(tts) if tts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=8)
    result = asyncio.run(run(parser.parse_args().calls))
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "ttfa.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
