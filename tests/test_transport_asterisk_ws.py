"""Asterisk chan_websocket: a fake Asterisk (binary media, text control) drives the real server."""

from __future__ import annotations

import asyncio

from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher, FakeAsteriskWS
from tests.transport_checks import (
    STORY,
    barge_in_call,
    hangups_release_everything,
    malformed_then_call,
    prompt_clip,
    reply_call,
    server_base,
)
from voice.transports.carriers.asterisk_ws import parse_control


def test_control_messages_parse_in_both_forms():
    assert parse_control("MEDIA_START connection_id:x format:ulaw optimal_frame_size:160") == (
        "MEDIA_START",
        {"connection_id": "x", "format": "ulaw", "optimal_frame_size": "160"},
        False,
    )
    assert parse_control('{"event": "MEDIA_XOFF"}') == ("MEDIA_XOFF", {"event": "MEDIA_XOFF"}, True)


async def test_asterisk_ulaw_call_speaks_whole_frames(server):
    await reply_call(server, FakeAsteriskWS(server_base(server)), prompt_clip(25), multiple_of=160)


async def test_asterisk_slin16_json_control(server):
    carrier = FakeAsteriskWS(server_base(server), format="slin16", json=True)
    await reply_call(server, carrier, prompt_clip(26), multiple_of=640, dtmf="3")


async def test_asterisk_slin48_call_is_heard_and_answered_in_whole_frames(server):
    """A 48 kHz leg (a WebRTC caller bridged to chan_websocket): heard
    through the resampler, answered in whole 20 ms frames at 48 kHz. It was
    refused at MEDIA_START."""
    carrier = FakeAsteriskWS(server_base(server), format="slin48")
    await reply_call(server, carrier, prompt_clip(28), multiple_of=1920, dtmf=None)


async def test_asterisk_xoff_pauses_sending_until_xon(server):
    carrier = FakeAsteriskWS(server_base(server))
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            call.session.history.system_prompt = STORY
            await carrier.say(with_silence(prompt_clip(27).load(8000), 8000, 1.0), speed=None)
            await carrier.wait_audio()
            await carrier.send("MEDIA_XOFF")
            await asyncio.sleep(0.2)
            paused_at = len(carrier.audio_chunks)
            await asyncio.sleep(1.0)
            assert len(carrier.audio_chunks) <= paused_at + 1  # at most the one in flight
            await carrier.send("MEDIA_XON")
            await carrier.send("STATUS queue_length:0 xon_level:800 xoff_level:900 queue_full:false")
            await asyncio.sleep(1.0)
            assert len(carrier.audio_chunks) > paused_at
            assert call.xoffs == 1 and call.malformed == 0


async def test_asterisk_barge_in_flushes_media(server):
    carrier = FakeAsteriskWS(server_base(server))
    await barge_in_call(server, carrier, needs_mark=False)
    assert "FLUSH_MEDIA" in carrier.controls


async def test_asterisk_malformed_messages_are_ignored(server):
    bad = ["MEDIA_START format:opus", "WHAT_IS_THIS", "{not json", "DTMF_END digit:??", b"\x00" * 3]
    carrier = FakeAsteriskWS(server_base(server), format="slin16")
    await malformed_then_call(server, carrier, bad, prompt_clip(28))


async def test_asterisk_hangup_mid_reply_releases_everything(server):
    await hangups_release_everything(
        server, lambda: FakeAsteriskWS(server_base(server)), [prompt_clip(50), prompt_clip(51)]
    )


async def test_asterisk_a_tiny_frame_size_does_not_make_tiny_messages(server):
    """MEDIA_START's optimal_frame_size is the peer's to pick: 2 bytes made
    each reply message 1/16 ms of audio, thousands of messages a second on
    the event loop every call shares. A message carries at least 20 ms."""
    carrier = FakeAsteriskWS(server_base(server), format="slin16")
    opening = carrier.wire.opening

    def tiny_frames() -> list:
        return [m.replace("optimal_frame_size:640", "optimal_frame_size:2") for m in opening()]

    carrier.wire.opening = tiny_frames  # type: ignore[method-assign]
    await reply_call(server, carrier, prompt_clip(26), multiple_of=2, dtmf=None)
    sizes = [len(chunk) for _, chunk in carrier.audio_chunks]
    short = [size for size in sizes if size < 640]  # 20 ms at 16 kHz
    # A sentence's last message may be short; before, every one was 10 bytes.
    assert sizes and len(short) <= max(3, len(sizes) // 10), (len(sizes), short[:10])


async def test_asterisk_audio_waiting_out_an_xoff_is_dropped_by_a_flush(server):
    """Asterisk said MEDIA_XOFF, so the playout's next chunk waits. A
    barge-in then sends FLUSH_MEDIA (and the queue is empty, so sending may
    go on): the waiting chunk, of the reply just cut, went out after the
    flush and played."""
    from voice.transports.carriers.asterisk_ws import AsteriskWebSocketCall

    call = AsteriskWebSocketCall(None, server.runtime)  # no socket: its sends are recorded
    sent: list[str | bytes] = []

    async def record(frame: str | bytes) -> None:
        sent.append(frame)

    call.send_frame = record  # type: ignore[method-assign]
    call._xon.clear()  # MEDIA_XOFF
    waiting = asyncio.create_task(call.send_audio(b"old reply"))
    await asyncio.sleep(0.05)
    assert not sent
    await call.send_clear()  # the barge-in
    await asyncio.wait_for(waiting, 5)
    await call.send_audio(b"new reply")
    assert sent == ["FLUSH_MEDIA", b"new reply"], sent
