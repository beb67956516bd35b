"""Vonage websockets: a fake Vonage (binary L16, websocket:connected first) drives the real server."""

from __future__ import annotations

import asyncio

from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher, FakeVonage
from tests.transport_checks import (
    STORY,
    barge_in_call,
    hangups_release_everything,
    malformed_then_call,
    prompt_clip,
    refused_at_once,
    reply_call,
    server_base,
)


async def test_vonage_16k_call_speaks_exact_frames(server):
    await reply_call(server, FakeVonage(server_base(server)), prompt_clip(21), sizes={640})


async def test_vonage_8k_call_speaks_exact_frames(server):
    await reply_call(server, FakeVonage(server_base(server), rate=8000), prompt_clip(22), sizes={320}, dtmf="9")


async def test_vonage_paces_its_sending(server):
    """Vonage buffers a bounded amount: the server stays a few seconds ahead, no more."""
    carrier = FakeVonage(server_base(server))
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            call.session.history.system_prompt = STORY
            await carrier.say(with_silence(prompt_clip(23).load(16000), 16000, 1.0), speed=None)
            await carrier.wait_audio()
            await asyncio.sleep(1.5)
            first = carrier.audio_chunks[0][0]
            sent_s = len(carrier.audio_bytes()) / 32000
            elapsed = carrier.audio_chunks[-1][0] - first
            assert sent_s <= elapsed + call.lead_s + 0.5, (sent_s, elapsed)


async def test_vonage_barge_in_clears(server):
    await barge_in_call(server, FakeVonage(server_base(server)))


async def test_vonage_malformed_messages_are_ignored(server):
    bad = [
        b"\x00" * 641,  # odd bytes: not whole L16 samples
        "plain text",
        {"event": "websocket:dtmf", "digit": "x"},
        {"event": "websocket:connected", "content-type": "audio/l16;rate=16000"},  # a second one
        {"action": "clear"},  # a server action echoed back
    ]
    await malformed_then_call(server, FakeVonage(server_base(server)), bad, prompt_clip(24))


async def test_vonage_an_unsupported_content_type_is_refused_at_once_not_as_abuse(server):
    """Its reason quotes the peer's value: 60 three-byte characters of it
    made a close reason over the 123 bytes a close frame holds, and
    websockets raised instead of closing."""
    carrier = FakeVonage(server_base(server))
    carrier.opening = lambda: [{"event": "websocket:connected", "content-type": "audio/l16;rate=" + "€" * 60}]  # type: ignore[method-assign]
    await refused_at_once(carrier, "unsupported content-type")


async def test_vonage_hangup_mid_reply_releases_everything(server):
    await hangups_release_everything(
        server, lambda: FakeVonage(server_base(server)), [prompt_clip(48), prompt_clip(49)]
    )
