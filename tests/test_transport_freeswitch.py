"""FreeSWITCH mod_audio_stream: a fake FreeSWITCH (metadata text first,
binary L16 in, one streamAudio message per sentence out) drives the real
server."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_carrier import CallWatcher, FakeFreeSwitch
from tests.transport_checks import barge_in_call, prompt_clip, refused_at_once, reply_call, server_base


@pytest.mark.parametrize("rate", [16000, 8000])
async def test_freeswitch_call_gets_each_sentence_as_one_message(server, rate):
    """The module writes every streamAudio message to a file the
    application plays: a reply goes as one message a sentence, in the
    stream's own rate, never as 20 ms messages (50 files a second)."""
    carrier = FakeFreeSwitch(server_base(server), rate=rate, metadata={"caller": "test"})
    await reply_call(server, carrier, prompt_clip(50 if rate == 16000 else 51), multiple_of=rate // 50 * 2, dtmf=None)
    sentences = [chunk for _, chunk in carrier.audio_chunks]
    assert sentences and all(len(chunk) >= 0.2 * rate * 2 for chunk in sentences), [len(c) for c in sentences]


async def test_freeswitch_barge_in_asks_the_application_to_stop_playback(server):
    await barge_in_call(server, FakeFreeSwitch(server_base(server)), needs_mark=False)


@pytest.mark.parametrize(
    ("opening", "reason"),
    [
        ({"caller": "test"}, "sample_rate"),  # the rate is not on the wire: it must be stated
        ("uuid=1234", "JSON object"),  # the module's metadata is free text
        ({"sample_rate": 44100}, "not 8000 or 16000"),
        (b"\x00" * 640, "audio before the metadata"),  # a command given no metadata
    ],
    ids=["no-rate", "not-json", "wrong-rate", "audio-first"],
)
async def test_freeswitch_a_stream_whose_rate_is_unknown_is_refused_at_once(server, opening, reason):
    """Audio read at a guessed rate is garbage the ASR would answer: a
    stream that does not say its rate is refused at once with the reason,
    not counted as malformed frames until the flood ends it as abuse."""
    carrier = FakeFreeSwitch(server_base(server))
    carrier.opening = lambda: [opening]  # type: ignore[method-assign]
    await refused_at_once(carrier, reason)


async def test_freeswitch_metadata_is_checked_for_the_carrier_secret(server, monkeypatch):
    """With --carrier-secret, the metadata carries it as any carrier's custom
    parameters do (mod_audio_stream sets no header): a wrong one is refused
    at once, and the right one never reaches the call's metadata."""
    monkeypatch.setattr(server.runtime.config, "carrier_secret", "shared-secret")
    wrong = FakeFreeSwitch(server_base(server), metadata={"firstline_secret": "nope"})
    await refused_at_once(wrong, "carrier secret missing or wrong")
    with CallWatcher() as watcher:
        async with FakeFreeSwitch(server_base(server), metadata={"firstline_secret": "shared-secret", "caller": "42"}):
            call = await watcher.one()
            async with asyncio.timeout(30):
                while not call.session.started:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert call.session._start is not None
            assert call.session._start.metadata == {"caller": "42"}
