"""FreeSWITCH mod_audio_stream: a fake FreeSWITCH (metadata text first,
binary L16 in, one streamAudio message per sentence out) drives the real
server."""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.fake_carrier import CallWatcher, FakeFreeSwitch
from tests.transport_checks import barge_in_call, prompt_clip, refused_at_once, reply_call, server_base
from voice.transports.carriers.freeswitch import MAX_MESSAGE_S


@pytest.mark.parametrize("rate", [16000, 8000])
async def test_freeswitch_call_gets_each_sentence_as_one_message(server, rate):
    """The module writes every streamAudio message to a file the
    application plays: a reply goes as one message a sentence, in the
    stream's own rate, never as 20 ms messages (50 files a second)."""
    carrier = FakeFreeSwitch(server_base(server), rate=rate, metadata={"caller": "test"})
    with CallWatcher() as watcher:
        clip = prompt_clip(50 if rate == 16000 else 51)
        await reply_call(server, carrier, clip, multiple_of=rate // 50 * 2, dtmf=None)
    playout = watcher.calls[0].playout
    assert playout is not None
    # One message a sentence; one over MAX_MESSAGE_S in parts of at most that.
    lengths = [s.end_s - s.start_s for s in playout.segments if s.turn == 1]
    expected = sum(math.ceil(seconds / MAX_MESSAGE_S - 1e-6) for seconds in lengths)
    messages = [len(chunk) / (rate * 2) for _, chunk in carrier.audio_chunks]
    assert len(messages) == expected and max(messages) <= MAX_MESSAGE_S, (messages, lengths)


async def test_freeswitch_barge_in_asks_the_application_to_stop_playback(server):
    await barge_in_call(server, FakeFreeSwitch(server_base(server)), needs_mark=False)


@pytest.mark.parametrize(
    ("opening", "reason"),
    [
        ({"caller": "test"}, "sample_rate"),  # the rate is not on the wire: it must be stated
        ("uuid=1234", "JSON object"),  # the module's metadata is free text
        ({"sample_rate": 44100}, "not 8000 or 16000"),
        ({"sample_rate": [16000]}, "not 8000 or 16000"),  # not hashable: was a server error
        ({"sample_rate": "16k", "channels": 2}, "mono"),  # `stereo`: two channels read as one
        (b"\x00" * 640, "audio before the metadata"),  # a command given no metadata
    ],
    ids=["no-rate", "not-json", "wrong-rate", "list-rate", "stereo", "audio-first"],
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
        carrier = FakeFreeSwitch(server_base(server), metadata={"firstline_secret": "shared-secret", "caller": "42"})
        async with carrier:
            call = await watcher.one()
            async with asyncio.timeout(30):
                while not call.session.started:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert call.session._start is not None
            assert call.session._start.metadata == {"caller": "42"}
            # The application's own texts (the module's send_text) after the
            # start are no metadata and no fault: the call goes on.
            await carrier.send("note from the dialplan")
            await carrier.send({"sample_rate": 8000})
            await asyncio.sleep(0.3)
            assert call.malformed == 0 and not call.finished
            assert call.rate == 16000  # a second metadata-like text starts nothing
