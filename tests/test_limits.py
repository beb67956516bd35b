"""Per-call limits on the real server: bounded turn audio, idle timeout, and
a client that stops reading (it must be dropped, not grow server memory or
stall anyone else)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from asr.turns import Paused, TurnEnded, TurnTracker
from benchmarks.client import NativeCaller
from voice.server.app import VoiceServer
from voice.server.limits import CallLimits


@contextlib.contextmanager
def limits(server: VoiceServer, **changes: float) -> Iterator[CallLimits]:
    """Tighter limits for calls started inside the block (read per call)."""
    cfg = server.runtime.config
    old = cfg.limits
    cfg.limits = dataclasses.replace(old, **changes)
    try:
        yield cfg.limits
    finally:
        cfg.limits = old


def test_turn_audio_is_capped_by_max_utterance(server: VoiceServer, jfk) -> None:
    """Speech that never pauses cannot grow a call's turn buffer past max_utterance_s."""
    cfg = dataclasses.replace(server.runtime.config.asr, max_utterance_s=4.0, endpoint_silence_s=5.0)
    tracker = TurnTracker(cfg, server.runtime.vad.stream())
    speech = jfk.load(16000)
    ended: list[TurnEnded] = []
    for _ in range(3):  # 33 s of speech, fed in 100 ms chunks
        for i in range(0, len(speech), 1600):
            ended += [e for e in tracker.feed(speech[i : i + 1600]) if isinstance(e, TurnEnded)]
    assert ended, "a turn longer than max_utterance_s was never cut"
    for turn in ended:
        assert len(turn.audio) / 16000 <= cfg.max_utterance_s + 0.5
    # The cap reached inside a pause ends the turn as the pause would have:
    # not forced (a forced end threw away the reply started at the pause).
    cfg = dataclasses.replace(cfg, max_utterance_s=len(speech) / 16000 + 0.4, adaptive_endpoint=False)
    tracker = TurnTracker(cfg, server.runtime.vad.stream())
    events = []
    for chunk in (speech, np.zeros(2 * 16000, np.float32)):
        for i in range(0, len(chunk), 1600):
            events += tracker.feed(chunk[i : i + 1600])
    kinds = [type(e).__name__ for e in events if isinstance(e, Paused | TurnEnded)]
    assert kinds[-2:] == ["Paused", "TurnEnded"] and not events[-1].forced, kinds


async def ended_while_sending(ending: NativeCaller, sender: NativeCaller, timeout: float) -> tuple[dict, float]:
    """``sender`` keeps sending silence (a live line) until ``ending`` gets
    its call.ended: that event, and how long after now it came."""
    t0 = time.monotonic()
    silence = np.zeros(320, np.int16).tobytes()
    ended = asyncio.ensure_future(ending.wait_for("call.ended", timeout=timeout))
    while not ended.done():
        try:
            await sender.send_raw(silence)
        except ConnectionClosed:
            # The server ended the sender's own call: its call.ended came
            # before the close, and the waiter above has not yet woken up to it
            # (a different sender closed is caught by the caller's checks).
            break
        await asyncio.sleep(0.02)
    return await ended, time.monotonic() - t0


async def assert_closed_with(caller: NativeCaller, code: int, reason: str) -> None:
    assert caller.ws is not None
    await asyncio.wait_for(caller.ws.wait_closed(), 3)
    assert (caller.ws.close_code, caller.ws.close_reason) == (code, reason)


async def assert_still_served(caller: NativeCaller) -> None:
    assert caller.ws is not None and caller.ws.close_code is None
    await caller.send_json({"type": "nope"})
    assert (await caller.wait_for("error", timeout=5))["code"] == "unknown_event"


async def test_idle_call_is_closed_with_code_and_reason(server: VoiceServer, call_url: str) -> None:
    with limits(server, idle_timeout_s=1.0):
        async with NativeCaller(call_url) as idle, NativeCaller(call_url) as busy:
            await idle.start("pcm16", 16000)
            await busy.start("pcm16", 16000)
            # The busy caller keeps sending (silence) and must not be closed.
            event, after_s = await ended_while_sending(idle, busy, timeout=5)
            assert event["reason"] == "idle_timeout"
            # The idle clock starts at the idle call's start, a round trip or
            # two before after_s's: a lower bound close to 1 s failed on a stall.
            assert 0.5 <= after_s <= 3.0
            await assert_closed_with(idle, 1000, "idle timeout")
            await assert_still_served(busy)


async def test_bad_messages_do_not_keep_a_call_from_idling_out(server: VoiceServer, call_url: str) -> None:
    """Only a message that was used is activity: a client sending one bad
    message now and then (well under the malformed allowance) held its slot
    for the whole --max-call-s (hours)."""
    with limits(server, idle_timeout_s=1.0):
        async with NativeCaller(call_url) as idler:
            await idler.start("pcm16", 16000)
            t0 = time.monotonic()
            ended = asyncio.ensure_future(idler.wait_for("call.ended", timeout=5))
            while not ended.done():
                await idler.send_json({"type": "nope"})
                await asyncio.sleep(0.3)
            assert (await ended)["reason"] == "idle_timeout"
            assert time.monotonic() - t0 <= 3.0


async def test_a_call_past_its_maximum_length_is_ended_however_busy(server: VoiceServer, call_url: str) -> None:
    """A line left open (a bot calling a bot) cannot hold a slot for good:
    a call that keeps sending is ended at --max-call-s, a later one is not."""
    with limits(server, max_call_s=1.5):
        async with NativeCaller(call_url) as long_call:
            await long_call.start("pcm16", 16000)
            event, after_s = await ended_while_sending(long_call, long_call, timeout=6)
            assert event["reason"] == "max_call_length"
            assert 1.0 <= after_s <= 4.0  # counted from the handler's start, before after_s's
            await assert_closed_with(long_call, 1000, "call too long")
    async with NativeCaller(call_url) as later:  # the default limit: hours
        await later.start("pcm16", 16000)
        await asyncio.sleep(2.0)
        await assert_still_served(later)


async def test_valid_events_past_the_allowance_are_refused_then_the_call_closed(server: VoiceServer) -> None:
    """Valid Realtime events sent as fast as a client can (each a parse, a
    change and an answer on the shared loop): past --control burst each is
    refused with rate_limit_exceeded, and kept up the call is closed like a
    malformed flood; audio is not counted."""
    from tests.fake_carrier import FakeRealtime
    from tests.transport_checks import server_base

    # A slow refill: the count below must not depend on how fast this machine
    # gets through the 30 (at 5 a second a slow second took 5 refusals off).
    with limits(server, control_burst=20, control_per_s=0.5):
        async with FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False) as client:
            await client.next_event("session.updated", timeout=10)  # the client's own session.update: 1 event
            await client.say(np.zeros(24000, np.float32), speed=None)  # 1 s of audio in 100 ms appends: unmetered
            for _ in range(30):
                await client.send({"type": "input_audio_buffer.clear"})

            def refused_so_far() -> list[dict]:
                return [e for e in client.of("error") if e["error"]["code"] == "rate_limit_exceeded"]

            async with asyncio.timeout(10):  # every clear answered, one way or the other
                while len(client.of("input_audio_buffer.cleared")) + len(refused_so_far()) < 30:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            refused = refused_so_far()
            assert 5 <= len(refused) <= 12, len(refused)
            assert "at most 20 at once" in refused[0]["error"]["message"]
            with contextlib.suppress(ConnectionClosed):
                for _ in range(80):
                    await client.send({"type": "input_audio_buffer.clear"})
            await asyncio.wait_for(client.closed.wait(), 10)
            assert client.ws is not None and client.ws.close_code == 1008, client.ws.close_code
            assert client.ws.close_reason == "too many malformed messages"


async def test_client_that_stops_reading_is_dropped(server: VoiceServer, call_url: str) -> None:
    """A real websocket client that never reads while the server keeps
    emitting (one error event per garbage frame it sends)."""
    rt = server.runtime
    for _ in range(100):  # the previous test's calls finish closing first
        if rt.active_calls == 0:
            break
        await asyncio.sleep(0.05)
    before = rt.active_calls
    slow_before = rt.metrics.registry.get_sample_value("firstline_calls_ended_total", {"reason": "slow_reader"}) or 0
    # Its bad messages are only there to make the server write: no cap on them here.
    with limits(server, send_timeout_s=3.0, malformed_burst=10**9):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A tiny receive window, so the server's writes back up quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        stuck = await connect(call_url, sock=sock, max_queue=1, compression=None, close_timeout=1)
        other = NativeCaller(call_url)
        await other.__aenter__()
        try:
            await stuck.send(json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}))
            assert rt.active_calls == before + 1 or rt.active_calls == before + 2

            async def flood() -> int:
                sent = 0
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    for _ in range(200_000):
                        await asyncio.wait_for(stuck.send('{"type": "' + "x" * 60 + '"}'), 2)
                        sent += 1
                return sent

            flooder = asyncio.ensure_future(flood())
            await other.start("pcm16", 16000)
            # While the stuck call backs up, the other call keeps getting answers.
            t0 = time.monotonic()
            for i in range(5):
                await other.send_json({"type": f"other-{i}"})
                await other.wait_for("error", timeout=2, message=f"unknown message type 'other-{i}'")
            # Well inside the 3 s the stuck call may block its own sends: nobody waited on it.
            assert time.monotonic() - t0 < 2.5
            sent = await asyncio.wait_for(flooder, 30)
            assert sent < 200_000, "the server never stopped reading a call that does not read"
            # The server dropped the stuck call: counted out, its session stopped.
            for _ in range(200):
                if rt.active_calls <= before + 1:
                    break
                await asyncio.sleep(0.05)
            assert rt.active_calls == before + 1  # only `other` is left
            ended = rt.metrics.registry.get_sample_value("firstline_calls_ended_total", {"reason": "slow_reader"})
            assert ended is not None and ended == slow_before + 1
            print(f"stuck client got {sent} frames in before the server stopped reading it")
        finally:
            await other.__aexit__()
            stuck.transport.abort()
        # The other call was never disturbed.
        assert other.result.of("ready")


async def test_a_carrier_flood_ends_the_call_once(server: VoiceServer, caplog) -> None:
    """Thousands of garbage frames sent as fast as a websocket goes: the
    call is ended by its malformed allowance as soon as it runs out (not
    after every frame already read), and that is said in one WARNING line."""
    from tests.fake_carrier import CallWatcher, FakeTwilio
    from tests.transport_checks import server_base

    caplog.set_level(logging.WARNING, logger="voice.transports")
    with CallWatcher() as watcher:
        async with FakeTwilio(server_base(server)) as carrier:
            call = await watcher.one()
            assert carrier.ws is not None
            with contextlib.suppress(ConnectionClosed):
                for _ in range(5000):
                    await carrier.ws.send("x")
            await asyncio.wait_for(carrier.closed.wait(), 10)
            assert (carrier.ws.close_code, carrier.ws.close_reason) == (1008, "too many malformed messages")
    assert call.malformed <= 100, call.malformed
    ending = [r for r in caplog.records if "ending the call" in r.getMessage() and call.call_id in r.getMessage()]
    assert len(ending) == 1, len(ending)


def _twilio_media(track: str) -> str:
    return json.dumps({"event": "media", "streamSid": "MZ1", "media": {"track": track, "payload": ""}})


def _padded(frame: str, inner: str | None, field: str, audio_bytes: int) -> str:
    """``frame`` with ``audio_bytes`` of silence as its audio and 200 KB of padding beside it."""
    msg = json.loads(frame)
    target = msg[inner] if inner else msg
    target[field] = base64.b64encode(bytes(audio_bytes)).decode()
    msg["pad"] = "x" * 200_000
    return json.dumps(msg)


@pytest.mark.parametrize(
    "carrier_kind, frame, count",
    [
        # Audio events that carry no audio reach no audio budget: each is a
        # message like any other (helpers measured 481,051 handled in 4 s).
        ("twilio", _twilio_media("outbound"), 3000),
        ("realtime", json.dumps({"type": "input_audio_buffer.append", "audio": ""}), 3000),
        # chan_websocket's control lines had no allowance at all (210,604 XONs in 4 s).
        ("asterisk_ws", "MEDIA_XON", 3000),
        # A message that needs no action (Telnyx's "connected") was never
        # metered, and 300 KB of JSON is parsed on the shared loop: charged
        # by its size, and refused unread once the allowance is spent.
        ("telnyx", json.dumps({"event": "connected", "pad": [0] * 100_000}), 400),
        # An audio event with 20 ms of audio padded to 200 KB: the audio
        # budget paid for the audio, nothing for the parse of the rest
        # (600 such frames a second passed).
        ("twilio", _padded(_twilio_media("inbound"), "media", "payload", 160), 400),
        ("realtime", _padded(json.dumps({"type": "input_audio_buffer.append"}), None, "audio", 960), 400),
    ],
    ids=[
        "twilio-outbound-track",
        "realtime-empty-append",
        "asterisk-xon",
        "telnyx-big-connected",
        "twilio-padded-media",
        "realtime-padded-append",
    ],
)
async def test_messages_that_bring_no_audio_take_the_message_allowance(
    server: VoiceServer, carrier_kind: str, frame: str, count: int
) -> None:
    """Each flood ends its call by the allowance of messages other than
    audio (then the malformed one: 1008), with a bounded number handled."""
    from tests.fake_carrier import CallWatcher, FakeAsteriskWS, FakeRealtime, FakeTelnyx, FakeTwilio
    from tests.transport_checks import server_base

    fakes = {"twilio": FakeTwilio, "telnyx": FakeTelnyx, "realtime": FakeRealtime, "asterisk_ws": FakeAsteriskWS}
    fake = fakes[carrier_kind]
    with CallWatcher() as watcher:
        async with fake(server_base(server)) as carrier:
            call = await watcher.one()
            assert carrier.ws is not None
            with contextlib.suppress(ConnectionClosed):
                for _ in range(count):
                    await carrier.ws.send(frame)
            await asyncio.wait_for(carrier.closed.wait(), 20)
            assert (carrier.ws.close_code, carrier.ws.close_reason) == (1008, "too many malformed messages")
    limits = server.config.limits
    assert call.malformed <= limits.malformed_burst + 50, call.malformed


async def test_asterisk_ws_reports_and_odd_fields_are_not_failures(server: VoiceServer) -> None:
    """Asterisk's ERROR line is its report, not bad input; a MEDIA_START
    whose optimal_frame_size is a digit only to str.isdigit ("²") is read as
    no size (the default frame), not a crash that ends the call 1011."""
    from tests.fake_carrier import CallWatcher, FakeAsteriskWS
    from tests.transport_checks import server_base, until_started

    with CallWatcher() as watcher:
        async with FakeAsteriskWS(server_base(server)) as carrier:
            assert carrier.ws is not None
            call = await watcher.one()
            await carrier.ws.send("ERROR channel_id:abc error_text:Unable to parse JSON command")
            await asyncio.sleep(0.3)
            assert call.malformed == 0
    with CallWatcher() as watcher:
        carrier = FakeAsteriskWS(server_base(server))
        wire = carrier.wire
        odd = wire.command("MEDIA_START", connection_id="c1", channel="PJSIP/1", format=wire.format,
                           optimal_frame_size="\u00b2")  # fmt: skip
        wire.opening = lambda: [odd]  # type: ignore[method-assign]
        async with carrier:
            call = await watcher.one()
            await until_started(call, timeout=2.0)
            assert call.frame_bytes == 160 and not call.finished


async def assert_cooled_down(url: str, address: str) -> None:
    """A call from ``address``, once its flooding connection is released, is
    refused 429 for the abuse cool-down."""
    from tests.conftest import refused_once_released

    refused = await refused_once_released(lambda: connect(url, local_addr=(address, 0)))
    assert refused.response.status_code == 429
    assert json.loads(refused.response.body)["reason"] == "abuse_cooldown"


async def test_a_ping_flood_ends_the_call_as_abuse_and_cools_its_address_down(server: VoiceServer) -> None:
    """websockets answers pings inside its socket read, so they reached no
    message allowance: a client pinging as fast as it could (never reading
    the pongs) held the event loop and queued pongs without bound. Past
    CONTROL_FRAME_BURST the call is ended as a malformed flood and its
    address cooled down; another address still gets in."""
    from tests.conftest import assert_gets_a_call, loopback_alias_works, side_server
    from voice.server.limits import CONTROL_FRAME_BURST

    if not loopback_alias_works():
        pytest.skip("127.0.0.2 does not reach this machine's loopback")
    async with side_server(server, limits=CallLimits(abuse_cooldown_s=30.0), per_address_exempt=[]) as srv:
        url = f"ws://127.0.0.1:{srv.port}/v1/call"
        async with connect(url, local_addr=("127.0.0.2", 0), ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}))
            assert json.loads(await ws.recv())["type"] == "ready"
            with contextlib.suppress(ConnectionClosed):
                for i in range(CONTROL_FRAME_BURST * 20):
                    await ws.ping(i.to_bytes(4, "big"))
                while True:
                    await ws.recv()
        await assert_cooled_down(url, "127.0.0.2")
        await assert_gets_a_call(url)  # another address: unaffected
        async with connect(url) as other:  # and pings at a client's pace are answered
            for i in range(CONTROL_FRAME_BURST // 2):
                await (await other.ping(i.to_bytes(4, "big")))


async def test_a_message_cut_into_thousands_of_fragments_ends_the_call_as_abuse(server: VoiceServer) -> None:
    """Only a finished message reached a call's allowances: one cut into
    4096 empty fragments cost 13 ms of the shared loop for 24 KB on the
    wire and one message's charge. Past CONTINUATION_FRAME_BURST fragments
    the call is ended as a malformed flood and its address cooled down; a
    message in a few fragments is still a message, and another address
    still gets in."""
    from tests.conftest import assert_gets_a_call, loopback_alias_works, side_server
    from tests.fake_carrier import CallWatcher
    from voice.server.limits import CONTINUATION_FRAME_BURST

    if not loopback_alias_works():
        pytest.skip("127.0.0.5 does not reach this machine's loopback")

    async def fragments(count: int, size: int = 2, last: int | None = None):
        for i in range(count):
            yield b"\x00" * (last if last is not None and i == count - 1 else size)

    async with side_server(server, limits=CallLimits(abuse_cooldown_s=30.0), per_address_exempt=[]) as srv:
        url = f"ws://127.0.0.1:{srv.port}/v1/call"
        with CallWatcher() as watcher:
            async with connect(url, local_addr=("127.0.0.5", 0), ping_interval=None) as ws:
                await ws.send(json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}))
                assert json.loads(await ws.recv())["type"] == "ready"
                call = await watcher.one()
                await ws.send(fragments(8))  # a client that fragments a little
                # websocket-sharp (Unity) cuts every message into 1016-byte
                # fragments: 300 of them (9.5 s of audio) are a message too.
                await ws.send(fragments(CONTINUATION_FRAME_BURST + 44, size=1016))
                # ... and each message's short remainder is its last fragment:
                # more of them than the burst, one per message.
                for _ in range(CONTINUATION_FRAME_BURST + 14):
                    await ws.send(fragments(2, size=1016, last=200))
                await (await ws.ping())
                assert not call.finished
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(fragments(CONTINUATION_FRAME_BURST * 16))
                    async with asyncio.timeout(10):  # no flood seen: fails, not hangs
                        while True:
                            await ws.recv()
        await assert_cooled_down(url, "127.0.0.5")
        await assert_gets_a_call(url)  # another address: unaffected


async def test_pings_sent_with_the_upgrade_are_a_flood_too(server: VoiceServer) -> None:
    """Pings in the same write as the upgrade request are read before the
    call has its guard: the connection was dropped, but its end was a lost
    connection, not abuse, and the address came straight back."""
    import base64
    import os

    from tests.conftest import loopback_alias_works, refused_once_released, side_server
    from voice.server.limits import CONTROL_FRAME_BURST

    if not loopback_alias_works():
        pytest.skip("127.0.0.3 does not reach this machine's loopback")
    async with side_server(server, limits=CallLimits(abuse_cooldown_s=30.0), per_address_exempt=[]) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=("127.0.0.3", 0))
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = (f"GET /v1/call HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
        ping = bytes([0x89, 0x80]) + os.urandom(4)  # FIN + ping, masked, empty
        writer.write(upgrade.encode() + ping * (CONTROL_FRAME_BURST * 40))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            async with asyncio.timeout(10):
                while await reader.read(65536):
                    pass
        writer.close()
        url = f"ws://127.0.0.1:{srv.port}/v1/call"
        refused = await refused_once_released(lambda: connect(url, local_addr=("127.0.0.3", 0)))
        assert refused.response.status_code == 429


async def test_sockets_that_never_upgrade_are_capped_per_address_and_time_out(server: VoiceServer) -> None:
    """A peer that opens TCP connections and sends nothing held each one
    for websockets' 10 s handshake timeout, as many as it could open: one
    address could hold every descriptor the process had. Now its open
    connections are counted from accept: past the cap the next gets a 429
    before a byte of it is read, a silent one is closed after the opening
    handshake's timeout, and another address still gets a call."""
    from tests.conftest import assert_gets_a_call, loopback_alias_works, side_server

    if not loopback_alias_works():
        pytest.skip("127.0.0.4 does not reach this machine's loopback")
    config = {"per_address_exempt": [], "max_connections_per_address": 3}
    async with side_server(server, limits=CallLimits(open_timeout_s=1.5), **config) as srv:

        async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", srv.port, local_addr=("127.0.0.4", 0))

        async def count_is(n: int) -> None:
            async with asyncio.timeout(5):
                while srv.registry.connections_open("127.0.0.4") != n:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)

        silent = [await open_one() for _ in range(3)]
        await count_is(3)
        reader, writer = await open_one()
        async with asyncio.timeout(5):
            answer = await reader.read()  # the 429, then the server's close
        writer.close()
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["reason"] == "connection_limit"
        url = f"ws://127.0.0.1:{srv.port}/v1/call"
        await assert_gets_a_call(url)  # another address: unaffected
        # The silent ones end at the opening handshake's timeout, and their
        # address is free again (its count does not leak).
        started = time.monotonic()
        for silent_reader, silent_writer in silent:
            async with asyncio.timeout(10):
                assert await silent_reader.read() == b""
            silent_writer.close()
        assert time.monotonic() - started < 5
        await count_is(0)
        async with connect(url, local_addr=("127.0.0.4", 0)) as ws:
            await ws.send(json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await count_is(1)
        await count_is(0)


async def test_a_connection_that_never_starts_its_call_is_ended(server: VoiceServer) -> None:
    """Any used message kept the idle clock going, started or not: a
    connection sending Telnyx's "connected" every few seconds and never a
    start (which is where --carrier-secret is checked) held a call slot for
    the whole --max-call-s. A call must start within start_timeout_s; a
    Realtime session, which is its connection, is not held to it."""
    with limits(server, start_timeout_s=1.0):  # a call's guard reads the runtime's limits
        await _calls_that_never_start(server)


async def _calls_that_never_start(server: VoiceServer) -> None:
    from tests.conftest import side_server

    async with side_server(server) as srv:
        base = f"ws://127.0.0.1:{srv.port}"
        started = time.monotonic()
        async with connect(f"{base}/telnyx") as telnyx, connect(f"{base}/v1/call") as native:
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        await telnyx.send(json.dumps({"event": "connected", "version": "1.0.0"}))
                        await asyncio.sleep(0.3)
            assert telnyx.close_code == 1008 and telnyx.close_reason == "the call did not start"
            assert time.monotonic() - started < 5
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(10):
                    async for _ in native:
                        pass
            assert native.close_code == 1008
        async with asyncio.timeout(5):
            while srv.registry.live_calls():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        # A Realtime session is up from its connection: no start to wait for.
        async with connect(f"{base}/v1/realtime") as realtime:
            await asyncio.sleep(1.6)
            await realtime.send(json.dumps({"type": "input_audio_buffer.clear"}))
            async with asyncio.timeout(10):
                while json.loads(await realtime.recv())["type"] != "input_audio_buffer.cleared":
                    pass
