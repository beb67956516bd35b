"""Exotel voicebot streams: a fake Exotel (slin, 100 ms chunks) drives the real server."""

from __future__ import annotations

from tests.fake_carrier import FakeExotel
from tests.transport_checks import (
    barge_in_call,
    hangups_release_everything,
    malformed_then_call,
    prompt_clip,
    refused_at_once,
    reply_call,
    server_base,
)
from voice.transports.carriers.exotel import chunk_bytes


async def test_exotel_call_speaks_the_reply_in_valid_chunks(server):
    carrier = FakeExotel(server_base(server))
    await reply_call(server, carrier, prompt_clip(18), multiple_of=320)
    # Exotel's rule: each media chunk a multiple of 320 B, from 3.2 KB to 100 KB.
    assert all(3200 <= len(chunk) <= 100_000 for _, chunk in carrier.audio_chunks)


def test_exotel_chunk_sizes_follow_the_rule():
    for rate in (8000, 16000, 24000):
        size = chunk_bytes(rate)
        assert size % 320 == 0 and 3200 <= size <= 100_000 and size >= rate * 0.1 * 2


async def test_exotel_16k_from_start(server):
    carrier = FakeExotel(server_base(server))
    carrier.rate = 16000
    await reply_call(server, carrier, prompt_clip(19), multiple_of=320, dtmf=None)
    assert all(len(chunk) == 3200 for _, chunk in carrier.audio_chunks)  # 100 ms at 16 kHz


async def test_exotel_barge_in_clears(server):
    await barge_in_call(server, FakeExotel(server_base(server)))


async def test_exotel_malformed_messages_are_ignored(server):
    sid = FakeExotel.sid
    bad = [
        b"\x00" * 320,
        "{]",
        {"event": "media", "stream_sid": sid, "media": {"payload": "AA=="}},  # 1 byte: not whole samples
        {"event": "dtmf", "stream_sid": sid, "dtmf": {}},
        {"event": "mark", "stream_sid": sid},
    ]
    await malformed_then_call(server, FakeExotel(server_base(server)), bad, prompt_clip(20))


async def test_exotel_an_unsupported_rate_is_refused_at_once_not_as_abuse(server):
    await refused_at_once(FakeExotel(server_base(server), rate=44100), "unsupported media format: 16-bit at 44100 Hz")


async def test_exotel_hangup_mid_reply_releases_everything(server):
    await hangups_release_everything(
        server, lambda: FakeExotel(server_base(server)), [prompt_clip(46), prompt_clip(47)]
    )


async def test_exotel_a_bit_rate_given_in_kbps_is_taken(server):
    """Exotel documents bit_rate "16" (bits per sample); many Exotel
    clients and simulators send the stream's rate ("128kbps" at 8 kHz),
    which was a malformed start: its media then counted as a flood and
    cooled the Exotel address down."""
    carrier = with_media_format(FakeExotel(server_base(server)), bit_rate="128kbps")
    await reply_call(server, carrier, prompt_clip(18), multiple_of=320)


async def test_exotel_a_media_encoding_it_cannot_take_is_refused_at_once(server):
    carrier = with_media_format(FakeExotel(server_base(server)), encoding="audio/x-mulaw")
    await refused_at_once(carrier, "encoding 'audio/x-mulaw'")


def with_media_format(carrier: FakeExotel, **fields: str) -> FakeExotel:
    """The carrier's start with these media_format fields changed."""
    opening = carrier.wire.opening

    def changed() -> list:
        messages = opening()
        messages[1]["start"]["media_format"].update(fields)
        return messages

    carrier.wire.opening = changed  # type: ignore[method-assign]
    return carrier
