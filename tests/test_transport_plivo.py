"""Plivo audio streams: a fake Plivo (playAudio / checkpoint / clearAudio) drives the real server."""

from __future__ import annotations

from tests.fake_carrier import FakePlivo
from tests.transport_checks import (
    barge_in_call,
    hangups_release_everything,
    malformed_then_call,
    prompt_clip,
    refused_at_once,
    reply_call,
    server_base,
)


async def test_plivo_mulaw_call_speaks_the_reply(server):
    await reply_call(server, FakePlivo(server_base(server)), prompt_clip(15), sizes={160})


async def test_plivo_l16_16k_call_speaks_the_reply(server):
    carrier = FakePlivo(server_base(server), encoding="pcm16", rate=16000)
    await reply_call(server, carrier, prompt_clip(16), sizes={640}, dtmf="2")


async def test_plivo_barge_in_clears(server):
    await barge_in_call(server, FakePlivo(server_base(server)))


async def test_plivo_malformed_messages_are_ignored(server):
    sid = FakePlivo.sid
    bad = [
        b"\x01\x02",
        "nope",
        {"event": "media", "streamId": sid, "media": {"payload": 5}},
        {"event": "playedStream", "streamId": sid},
        {"event": "unknownEvent"},
    ]
    await malformed_then_call(server, FakePlivo(server_base(server)), bad, prompt_clip(17))


async def test_plivo_an_unsupported_rate_is_refused_at_once_not_as_abuse(server):
    """L16 at 44.1 kHz, which Plivo's stream cannot be asked for."""
    carrier = FakePlivo(server_base(server), encoding="pcm16", rate=44100)
    await refused_at_once(carrier, "unsupported media format 'audio/x-l16' at 44100 Hz")


async def test_plivo_hangup_mid_reply_releases_everything(server):
    await hangups_release_everything(server, lambda: FakePlivo(server_base(server)), [prompt_clip(44), prompt_clip(45)])
