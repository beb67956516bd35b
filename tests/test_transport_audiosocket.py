"""Asterisk AudioSocket over TCP: a fake Asterisk drives the real listener and server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
import uuid

import numpy as np
import pytest

from asr.wer import word_error_rate
from streaming.codecs import StreamResampler, int16_to_float
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher, FakeAsterisk
from tests.transport_checks import STORY, asr_text, prompt_clip
from voice.server.app import VoiceServer
from voice.server.config import ServerConfig
from voice.server.limits import MALFORMED_FLOOD, SLOW_READER
from voice.transports.audiosocket import message, start_audiosocket


async def listener(server):
    return await start_audiosocket(server.runtime, "127.0.0.1", 0)


async def test_audiosocket_call_paced_frames_and_reply(server):
    tcp = await listener(server)
    port = tcp.sockets[0].getsockname()[1]
    clip = prompt_clip(29)
    config = server.runtime.config
    # The key pressed while the reply plays waits for the caller's words
    # here (a settle no test waits out): the frames heard are turn 1's reply.
    keypad_answer_s, config.keypad_answer_s = config.keypad_answer_s, 300.0
    try:
        with CallWatcher() as watcher:
            async with FakeAsterisk(port) as asterisk:
                call = await watcher.one()
                call.session.max_tokens = 40  # a short reply: it plays at real time
                await asterisk.send_raw(message(0x03, b"7"))  # DTMF before the audio starts: ignored, not a crash
                await asterisk.say(with_silence(clip.load(8000), 8000, 1.0))
                final = await watcher.wait_event(call, "transcript.final", timeout=60)
                assert word_error_rate(clip.reference, final["text"]) <= 0.35, final
                done = await watcher.wait_event(call, "response.done", turn=1, timeout=60)
                await asyncio.sleep(0.5)
                await asterisk.send_raw(message(0x03, b"4"))
                # Let the whole reply play at real time, then a little silence.
                while call.frames or (call.playout is not None and call.playout.busy):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.3)
                frames, voiced = asterisk.speech()
                assert frames and all(len(f) == 320 for f in frames)
                assert voiced > 10 and call.silence_written > 0  # silence generated between
                times = [t for t, k, _ in asterisk.received if k == 0x10]
                span = times[-1] - times[0]
                # Real-time pacing: 20 ms apart, never ahead of real time. A
                # loop stall of over 100 ms skips its slots rather than burst
                # them (audiosocket.py), so stalls may only lengthen the span.
                assert 0.017 <= float(np.median(np.diff(times))) <= 0.023, np.diff(times)
                assert span >= 0.02 * (len(times) - 1) - 0.25, (span, len(times))
                pcm = np.frombuffer(b"".join(frames), "<i2")
                heard = await asr_text(server, StreamResampler(8000, 16000).process(int16_to_float(pcm), last=True))
                assert word_error_rate(done["text"], heard) <= 0.5, (done["text"], heard)
                assert call.session.carry_over == "[caller pressed 4]"
                assert 1 in call.audio_metrics
    finally:
        config.keypad_answer_s = keypad_answer_s
        tcp.close()
        await tcp.wait_closed()


async def test_audiosocket_16k_barge_in_stops_frames(server):
    tcp = await listener(server)
    port = tcp.sockets[0].getsockname()[1]
    first, second = prompt_clip(30), prompt_clip(31)
    try:
        with CallWatcher() as watcher:
            async with FakeAsterisk(port, kind=0x12, rate=16000) as asterisk:
                call = await watcher.one()
                await asterisk.say(np.zeros(1600, np.float32))
                call.session.history.system_prompt = STORY
                await asterisk.say(with_silence(first.load(16000), 16000, 0.7))
                await watcher.wait_event(call, "response.sentence", turn=1, timeout=60)
                await asyncio.sleep(1.5)
                await asterisk.say(with_silence(second.load(16000), 16000, 0.7))
                await watcher.wait_event(call, "transcript.final", turn=2, timeout=60)
                assert call.barge_ins >= 1
                assert all(len(p) == 640 for _, k, p in asterisk.received if k == 0x12)
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_audiosocket_a_stalled_loop_delays_the_playout_clock_with_the_frames(server):
    """The event loop blocks for 0.4 s mid-reply (a long GIL hold): the
    write clock skips those slots rather than burst, so the frames still
    queued play 0.4 s later, and the playout clock says so. It counted them
    played: it paced 0.4 s more audio in on top after every stall, and took
    audio the caller never heard for heard."""
    tcp = await listener(server)
    port = tcp.sockets[0].getsockname()[1]
    try:
        with CallWatcher() as watcher:
            async with FakeAsterisk(port) as asterisk:
                call = await watcher.one()
                await asterisk.say(np.zeros(1600, np.float32))
                call.session.history.system_prompt = STORY
                await asterisk.say(with_silence(prompt_clip(30).load(8000), 8000, 0.8))
                await watcher.wait_event(call, "response.sentence", turn=1, timeout=60)
                async with asyncio.timeout(30):
                    while len(call.frames) < 5:  # noqa: ASYNC110
                        await asyncio.sleep(0.005)
                playout = call.playout
                assert playout is not None
                # Three stalls: after each, the playout or the write clock
                # may wake first; either way the clock must end with the queue.
                for _ in range(3):
                    time.sleep(0.4)  # noqa: ASYNC251 - the stall: nothing on this loop runs
                    await asyncio.sleep(0.05)  # the write clock resyncs
                    queued_s = len(call.frames) * 0.02
                    ahead_s = playout.clock_end - time.monotonic()
                    assert abs(ahead_s - queued_s) < 0.1, (ahead_s, queued_s)
                    await asyncio.sleep(0.3)
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_audiosocket_48k_call_is_heard_and_answered_at_48k(server):
    """slin at 48 kHz (kind 0x16, a WebRTC leg bridged to AudioSocket): the
    caller is heard through the resampler and the reply comes back as whole
    20 ms frames of the same kind. It was hung up as unsupported."""
    tcp = await listener(server)
    clip = prompt_clip(29)
    try:
        with CallWatcher() as watcher:
            async with FakeAsterisk(tcp.sockets[0].getsockname()[1], kind=0x16, rate=48000) as asterisk:
                call = await watcher.one()
                call.session.max_tokens = 24
                await asterisk.say(with_silence(clip.load(48000), 48000, 1.0))
                final = await watcher.wait_event(call, "transcript.final", timeout=60)
                assert word_error_rate(clip.reference, final["text"]) <= 0.35, final
                await watcher.wait_event(call, "response.sentence", turn=1, timeout=60)
                async with asyncio.timeout(30):
                    while not asterisk.speech()[1]:  # noqa: ASYNC110 - voiced reply frames
                        await asyncio.sleep(0.1)
                replies = [p for _, k, p in asterisk.received if k == 0x16]
                assert replies and all(len(p) == 1920 for p in replies)
                assert call.malformed == 0
    finally:
        tcp.close()
        await tcp.wait_closed()


@pytest.mark.parametrize("kind", [0x17, 0x18, 0x1A])
async def test_audiosocket_an_unsupported_rate_is_hung_up_at_once_not_as_abuse(server, caplog, kind):
    """slin at 96 kHz (0x17, which was not known as audio at all), at 192
    kHz (0x18), an audio kind no Asterisk has yet (0x1A): the call is hung
    up at once with its reason. Each frame retried the start (or was an
    unknown kind) as a malformed message until the flood ended the call as
    abuse and cooled the PBX's address, every caller behind it, down."""
    tcp = await listener(server)
    try:
        with caplog.at_level("INFO"), CallWatcher() as watcher:
            async with FakeAsterisk(tcp.sockets[0].getsockname()[1]) as asterisk:
                call = await watcher.one()
                for _ in range(60):  # a second of frames: past the malformed allowance's burst
                    await asterisk.send_raw(message(kind, b"\x00" * 1764))
                for _ in range(250):
                    if call.finished and any(kind == 0x00 for _, kind, _ in asterisk.received):
                        break
                    await asyncio.sleep(0.02)
                assert call.finished and any(kind == 0x00 for _, kind, _ in asterisk.received)
                assert call.malformed == 0
        assert f"call {call.call_id} ended (unsupported_media_format)" in caplog.text
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_audiosocket_malformed_and_hangups_release_everything(server):
    tcp = await listener(server)
    port = tcp.sockets[0].getsockname()[1]
    baseline = len(asyncio.all_tasks())
    try:
        for i in range(2):
            with CallWatcher() as watcher:
                async with FakeAsterisk(port) as asterisk:
                    call = await watcher.one()
                    await asterisk.send_raw(message(0x01, b"short"))  # bad UUID
                    await asterisk.send_raw(message(0x42, b"?"))  # unknown kind
                    await asterisk.send_raw(message(0xFF, b"\x02"))  # Asterisk error: logged
                    await asterisk.say(with_silence(prompt_clip(52 + i).load(8000), 8000, 0.7))
                    await watcher.wait_event(call, "response.sentence", timeout=60)
            # leaving the block hangs up (0x00) mid-reply
        # A connection that dies mid-header must not hurt anything either.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x10\x01")
        writer.close()
        for _ in range(200):
            if server.runtime.active_calls == 0 and len(asyncio.all_tasks()) <= baseline:
                break
            await asyncio.sleep(0.05)
        assert server.runtime.active_calls == 0
        assert len(asyncio.all_tasks()) <= baseline
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_audiosocket_peer_that_stops_reading_is_dropped(server):
    """A peer that keeps sending but reads nothing fills our send buffer;
    its call ends as a slow reader within the send timeout (as on the
    websockets) and frees its slot, instead of queueing reply audio
    forever. Small buffers on both ends make the stall come in seconds."""
    tcp = await listener(server)
    port = tcp.sockets[0].getsockname()[1]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    writer = None
    try:
        with CallWatcher() as watcher:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            _, writer = await asyncio.open_connection(sock=sock)
            writer.write(message(0x01, uuid.uuid4().bytes) + message(0x10, bytes(320)))
            call = await watcher.one()
            for _ in range(200):
                if call.session.started:
                    break
                await asyncio.sleep(0.02)
            call.watch.limits = dataclasses.replace(call.watch.limits, send_timeout_s=0.5)
            call.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2048)
            call.writer.transport.set_write_buffer_limits(high=2048)
            for _ in range(1500):  # audio keeps coming (not an idle call): up to 30 s
                if call.finished:
                    break
                writer.write(message(0x10, bytes(320)))
                await asyncio.sleep(0.02)
            assert call.finished and call.watch.end is SLOW_READER, call.watch.end
        for _ in range(100):
            if server.runtime.active_calls == 0:
                break
            await asyncio.sleep(0.05)
        assert server.runtime.active_calls == 0
    finally:
        if writer is not None:
            writer.transport.abort()
        sock.close()
        tcp.close()
        await tcp.wait_closed()


async def test_voice_server_starts_and_stops_the_audiosocket_listener(server):
    config = ServerConfig(port=0, audiosocket_port=0)
    second = VoiceServer(config, runtime=server.runtime)
    await second.start()
    try:
        assert second.audiosocket is not None
        port = second.audiosocket.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
    finally:
        await second.close()
    assert not second.audiosocket.is_serving()


async def test_an_audiosocket_port_in_use_fails_the_start_before_the_models_load() -> None:
    """A busy AudioSocket port is found when the listeners are bound, before
    the server spends its warm-up loading models (it was bound after)."""
    import time

    import pytest

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    srv = VoiceServer(ServerConfig(port=0, audiosocket_port=busy.getsockname()[1]))
    started = time.monotonic()
    try:
        with pytest.raises(OSError):
            await srv.start()
        assert time.monotonic() - started < 5 and not srv.runtime.ready
    finally:
        busy.close()
        if srv._server is not None:
            srv._server.close()
            await srv._server.wait_closed()


async def test_a_flood_in_one_write_ends_the_call_once(server, caplog):
    """Tens of thousands of tiny messages in one TCP write are handled
    without the read loop ever suspending: the call's allowance ends it,
    the end lands at once (not after every buffered message), and it is
    said in one WARNING line, not one per message. Valid DTMF digits are
    metered like the websocket carriers' (control allowance), so a stream
    of them ends the call too."""
    tcp = await listener(server)
    port = tcp.sockets[0].getsockname()[1]
    caplog.set_level(logging.WARNING, logger="voice.transports")
    floods = {
        "unknown kinds": message(0x42, b"") * 40_000,
        "valid digits": message(0x10, bytes(320)) + message(0x03, b"5") * 40_000,
    }
    try:
        for what, flood in floods.items():
            caplog.clear()
            with CallWatcher() as watcher:
                async with FakeAsterisk(port) as asterisk:
                    call = await watcher.one()
                    await asterisk.send_raw(flood)
                    for _ in range(200):
                        if call.finished:
                            break
                        await asyncio.sleep(0.05)
                    assert call.finished and call.watch.end is MALFORMED_FLOOD, (what, call.watch.end)
                    # The control allowance (200) and the malformed one (50), a few more: not 40,000.
                    assert call.malformed <= 100, (what, call.malformed)
            ending = [
                r for r in caplog.records if "ending the call" in r.getMessage() and call.call_id in r.getMessage()
            ]
            assert len(ending) == 1, (what, len(ending))
            assert len([r for r in caplog.records if call.call_id in r.getMessage()]) <= 10, what
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_a_close_between_messages_is_the_carriers_and_one_inside_a_message_is_lost(server):
    """Asterisk ends a call by closing the socket (it sends no hang-up): that
    is `carrier_closed`, as on the websocket carriers; a socket cut inside a
    message (its header, or a header without its payload) is
    `connection_lost`."""
    tcp = await listener(server)
    port = tcp.sockets[0].getsockname()[1]
    ended = server.runtime.metrics.ended

    def count(reason: str) -> float:
        return ended.labels(reason)._value.get()

    try:
        for tail, reason in (
            (b"", "carrier_closed"),
            (b"\x10\x01", "connection_lost"),  # half a header
            (b"\x10\x01\x40" + bytes(100), "connection_lost"),  # 100 of 320 payload bytes
        ):
            before = count(reason)
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(message(0x01, uuid.uuid4().bytes) + message(0x10, bytes(320)) + tail)
            await writer.drain()
            writer.close()
            for _ in range(200):
                if count(reason) > before:
                    break
                await asyncio.sleep(0.05)
            assert count(reason) == before + 1, (tail, reason)
    finally:
        tcp.close()
        await tcp.wait_closed()
