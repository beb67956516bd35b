"""The agent speaks first: a greeting on pickup, fixed or generated, through
the same reply path as any turn (sentences, reply audio, history)."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.client import NativeCaller
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher

GREETING = "Hello, thanks for calling Acme. How can I help you today?"


async def _until_played(caller: NativeCaller, rate: int = 8000) -> None:
    """Until the reply audio received so far has played out at real time."""
    size = -1
    while size != caller.result.audio_bytes:  # wait for the last frame first
        size = caller.result.audio_bytes
        await asyncio.sleep(0.5)
    first = caller.result.audio_frames[0][0]
    await asyncio.sleep(max(0.0, first + size / rate - time.monotonic()) + 0.3)


async def test_a_fixed_greeting_is_the_first_reply_then_the_caller_is_answered(call_url, phone_prompts):
    clip = phone_prompts[5]
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000, options={"greeting": GREETING, "reply_audio": True})
            done = await caller.wait_for("response.done", timeout=30, turn=1)
            assert done["text"] == GREETING and done["reply_end"] == "complete"
            sentences = [e["text"] for e in caller.result.of("response.sentence") if e["turn"] == 1]
            assert " ".join(sentences) == GREETING
            # Spoken through the same path: reply audio and time to first audio from pickup.
            audio_metrics = await caller.wait_for("turn.audio_metrics", timeout=30, turn=1)
            assert audio_metrics["ttfa_ms"] is not None and caller.result.audio_bytes > 0
            await _until_played(caller)  # talking over the greeting would cut it from history
            await caller.play(with_silence(clip.load(8000), 8000, 1.2), 8000, "mulaw", realtime=True, speed=4.0)
            answer = await caller.wait_for("response.done", timeout=60, turn=2)
            assert answer["text"]
            call = await watcher.one()
            history = call.session.history.messages_so_far
    assert history[0] == {"role": "assistant", "content": GREETING}
    assert history[1]["role"] == "user" and not caller.result.of("error")


async def test_a_generated_greeting_is_spoken_first_with_its_timings(call_url):
    async with NativeCaller(call_url) as caller:
        await caller.start("pcm16", 16000, options={"greeting_instructions": "Greet the caller in one short sentence."})
        done = await caller.wait_for("response.done", timeout=30, turn=1)
        metrics = await caller.wait_for("turn.metrics", timeout=30, turn=1)
    assert done["text"].strip() and not done["cancelled"]
    assert metrics["ttfs_ms"] is not None and metrics["ttfs_ms"] > 0


@pytest.mark.parametrize("options", [{"greeting": ""}, {"greeting": 7}, {"greeting_instructions": "x" * 5000}])
async def test_bad_greetings_are_refused_at_start(call_url, options):
    async with NativeCaller(call_url) as caller:
        await caller.send_json({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000},
                                "options": options})  # fmt: skip
        error = await caller.wait_for("error", timeout=10)
    assert error["code"] == "invalid_message" and "greeting" in error["message"]
