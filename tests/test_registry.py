"""One call registry for every listener (voice/server/registry.py): websocket
calls and AudioSocket calls share one max_calls, one per-address cap, the
AudioSocket allow-list, idle timeout and drain. No speech is needed: an
admitted connection holds its slot from the moment it is accepted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming.addresses import address_allowed, normalize_address, parse_networks
from tests.conftest import loopback_alias_works, refused_once_released
from tests.conftest import side_server as shared_side_server
from voice.server.app import VoiceServer
from voice.transports.audiosocket import KIND_HANGUP, KIND_UUID, message

REFUSED = message(KIND_HANGUP)  # a hang-up alone: the dialplan goes on to its fallback


def side_server(main: VoiceServer, **config: object) -> contextlib.AbstractAsyncContextManager[VoiceServer]:
    """A listener pair (websocket + AudioSocket) with its own limits on the warm models."""
    return shared_side_server(main, audiosocket_port=0, **config)


def audiosocket_port(srv: VoiceServer) -> int:
    assert srv.audiosocket is not None
    return srv.audiosocket.sockets[0].getsockname()[1]


async def asterisk(srv: VoiceServer, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An AudioSocket connection that has sent its UUID (no audio yet)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", audiosocket_port(srv), local_addr=(source, 0))
    writer.write(message(KIND_UUID, uuid.uuid4().bytes))
    await writer.drain()
    return reader, writer


async def until_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def wait_live(srv: VoiceServer, n: int, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while srv.registry.live_calls() != n:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def ws_call(srv: VoiceServer) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{srv.port}/v1/call")


async def calls_one_at_a_time(srv: VoiceServer, n: int) -> None:
    """``n`` websocket calls from 127.0.0.1, each hung up before the next."""
    for _ in range(n):
        ws = await ws_call(srv)
        await wait_live(srv, 1)
        await ws.close()
        await wait_live(srv, 0)


async def refused_on_audiosocket_too(srv: VoiceServer, live: int) -> None:
    """An AudioSocket call from 127.0.0.1 is refused (a per-address limit
    holds on every listener), one from 127.0.0.2 gets in; ``live``: the
    calls up before."""
    reader, writer = await asterisk(srv, source="127.0.0.1")
    assert await until_eof(reader) == REFUSED
    writer.close()
    _, other = await asterisk(srv, source="127.0.0.2")
    await wait_live(srv, live + 1)
    other.write(message(KIND_HANGUP))
    other.close()


async def test_audiosocket_and_websockets_share_one_max_calls(server: VoiceServer) -> None:
    async with side_server(server, max_calls=2) as srv:
        ws = await ws_call(srv)
        _, held = await asterisk(srv)
        await wait_live(srv, 2)
        # Over the shared cap: AudioSocket is told (error, hang-up) and closed...
        reader, writer = await asterisk(srv)
        assert await until_eof(reader) == REFUSED
        writer.close()
        # ...and so is a websocket upgrade, although only one websocket call is up.
        with pytest.raises(InvalidStatus) as refused:
            await ws_call(srv)
        assert refused.value.response.status_code == 503
        assert json.loads(refused.value.response.body)["reason"] == "at_capacity"
        # A slot freed on one listener is free for the other.
        await ws.close()
        await wait_live(srv, 1)
        _, again = await asterisk(srv)
        await wait_live(srv, 2)
        for w in (held, again):
            w.write(message(KIND_HANGUP))
            w.close()
        await wait_live(srv, 0)


@pytest.mark.skipif(not loopback_alias_works(), reason="no 127.0.0.2 on this loopback")
async def test_audiosocket_refuses_a_source_outside_the_allow_list(server: VoiceServer) -> None:
    async with side_server(server, audiosocket_allow=["127.0.0.1/32"]) as srv:
        refused = srv.runtime.metrics.registry.get_sample_value
        before = refused("firstline_calls_refused_total", {"reason": "unauthorized"}) or 0.0
        reader, writer = await asterisk(srv, source="127.0.0.2")
        assert await until_eof(reader) == REFUSED
        writer.close()
        assert srv.registry.live_calls() == 0
        assert refused("firstline_calls_refused_total", {"reason": "unauthorized"}) == before + 1
        _, ok = await asterisk(srv, source="127.0.0.1")
        await wait_live(srv, 1)
        ok.write(message(KIND_HANGUP))
        ok.close()
        await wait_live(srv, 0)


async def test_a_silent_audiosocket_is_closed_by_the_idle_timeout(server: VoiceServer) -> None:
    async with side_server(server) as srv:
        srv.config.limits.idle_timeout_s = 0.5
        reader, writer = await asterisk(srv)
        await wait_live(srv, 1)
        # Asterisk is told to hang up, then the socket closes and the slot is free.
        assert await until_eof(reader, timeout=5.0) == message(KIND_HANGUP)
        writer.close()
        await wait_live(srv, 0)


@pytest.mark.skipif(not loopback_alias_works(), reason="no 127.0.0.2 on this loopback")
async def test_per_address_cap_refuses_the_next_call_from_that_address(server: VoiceServer) -> None:
    # Loopback is exempt by default (a local proxy carries everyone); not here.
    async with side_server(server, max_calls=8, max_calls_per_address=2, per_address_exempt=[]) as srv:
        first, second = await ws_call(srv), await ws_call(srv)
        await wait_live(srv, 2)
        with pytest.raises(InvalidStatus) as refused:
            await ws_call(srv)
        assert refused.value.response.status_code == 429  # this caller's limit, not a busy server
        body = json.loads(refused.value.response.body)
        assert body["reason"] == "per_address_limit" and "too many calls from one address" in body["error"]
        # The cap is per address across listeners: AudioSocket from the same
        # one is refused too, while another address still gets in.
        await refused_on_audiosocket_too(srv, live=2)
        await first.close()
        await second.close()
        await wait_live(srv, 0)


@pytest.mark.skipif(not loopback_alias_works(), reason="no 127.0.0.2 on this loopback")
async def test_an_address_calling_again_and_again_is_held_to_a_call_rate(server: VoiceServer) -> None:
    """Each call's allowances (audio budget, message allowances, ASR share)
    are its own: an address that hung up and called again got them fresh
    each time, as often as it could reconnect. Past a burst of twice the
    per-address cap, new calls from it come at --call-rate-per-address;
    another address is not held to its rate, nor an exempt one."""
    config = {"max_calls_per_address": 2, "per_address_exempt": [], "call_rate_per_address": 0.01}
    async with side_server(server, **config) as srv:
        await calls_one_at_a_time(srv, 4)  # the cap on calls at once is not what refuses
        with pytest.raises(InvalidStatus) as refused:
            await ws_call(srv)
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body)["reason"] == "call_rate"
        assert int(refused.value.response.headers["Retry-After"]) >= 60
        await refused_on_audiosocket_too(srv, live=0)  # every listener
        await wait_live(srv, 0)
    unlimited = [
        {"max_calls_per_address": 2, "call_rate_per_address": 0.01},  # loopback, exempt by default
        {"max_calls_per_address": 0, "call_rate_per_address": 0.01, "per_address_exempt": []},  # no per-address limits
    ]
    for config in unlimited:
        async with side_server(server, **config) as srv:
            await calls_one_at_a_time(srv, 6)


async def test_audiosocket_connections_count_toward_the_sources_connection_cap(server: VoiceServer) -> None:
    """The cap on open connections per source holds for every listener: an
    AudioSocket connection past it is closed before a byte of it is read
    (no hang-up message: nothing was admitted), and its count comes back
    when the connections close."""
    config = {"max_calls": 8, "per_address_exempt": [], "max_connections_per_address": 2}
    async with side_server(server, **config) as srv:
        first, second = await asterisk(srv), await asterisk(srv)
        await wait_live(srv, 2)
        reader, writer = await asterisk(srv)
        try:  # closed unread (its UUID unread: a reset), not admitted, so not a call's hang-up
            assert await until_eof(reader) == b""
        except ConnectionResetError:
            pass
        writer.close()
        assert srv.registry.connections_open("127.0.0.1") == 2 and srv.registry.live_calls() == 2
        for _, call in (first, second):
            call.write(message(KIND_HANGUP))
            call.close()
        await wait_live(srv, 0)
        async with asyncio.timeout(5):
            while srv.registry.connections_open("127.0.0.1"):  # noqa: ASYNC110
                await asyncio.sleep(0.02)


def test_a_full_cool_down_map_makes_room_for_the_newest_abuser(server: VoiceServer, monkeypatch) -> None:
    """The cool-downs are bounded; full of live ones (many sources abusing
    at once), the newest abuser was let straight back in. Now the cool-down
    nearest its end makes room."""
    from voice.server import registry as registry_module
    from voice.server.admission import AdmissionController
    from voice.server.config import ServerConfig
    from voice.server.limits import AUDIO_FLOOD, CallLimits
    from voice.server.registry import CallRegistry, CallTicket

    monkeypatch.setattr(registry_module, "COOLDOWN_MAX_ADDRESSES", 3)
    config = ServerConfig(per_address_exempt=[], limits=CallLimits(abuse_cooldown_s=60.0))
    registry = CallRegistry(server.runtime, AdmissionController(config.admission, config.max_calls), config)
    for n in range(1, 5):
        registry.release(CallTicket("websocket", f"192.0.2.{n}"), AUDIO_FLOOD)
    cooling = [registry._cooling_s(f"192.0.2.{n}") for n in range(1, 5)]
    assert cooling[0] == 0 and all(c > 50 for c in cooling[1:]), cooling


# HAProxy on this host (deploy/haproxy.cfg, option forwardfor): every call
# comes from 127.0.0.1; the caller is the right-most untrusted hop.
BEHIND_PROXY = {
    "max_calls": 8,
    "max_calls_per_address": 1,
    "per_address_exempt": [],
    "trusted_proxies": ["127.0.0.1/32"],
}


async def via_proxy(srv: VoiceServer, xff: str) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{srv.port}/v1/call", additional_headers={"X-Forwarded-For": xff})


async def test_behind_a_trusted_proxy_the_cap_counts_callers_from_x_forwarded_for(server: VoiceServer) -> None:

    async with side_server(server, **BEHIND_PROXY) as srv:
        first = await via_proxy(srv, "203.0.113.5")
        await wait_live(srv, 1)
        # The same caller again, with a made-up left-most hop: still that caller.
        with pytest.raises(InvalidStatus) as refused:
            await via_proxy(srv, "198.51.100.1, 203.0.113.5")
        assert json.loads(refused.value.response.body)["reason"] == "per_address_limit"
        # Another caller through the same proxy gets in.
        second = await via_proxy(srv, "203.0.113.6")
        await wait_live(srv, 2)
        await first.close()
        await second.close()
        await wait_live(srv, 0)
    async with side_server(server, max_calls=8, max_calls_per_address=1, per_address_exempt=[]) as srv:
        first = await via_proxy(srv, "203.0.113.5")
        await wait_live(srv, 1)
        with pytest.raises(InvalidStatus):  # untrusted peer: X-Forwarded-For is the caller's word, ignored
            await via_proxy(srv, "203.0.113.7")
        await first.close()
        await wait_live(srv, 0)


async def test_a_forwarded_hop_with_a_port_is_still_its_caller(server: VoiceServer) -> None:
    """Some balancers write X-Forwarded-For entries as IP:port or [v6]:port.
    Taken as garbage, every caller behind them was the proxy: one source,
    so the whole service was capped at one caller's share."""
    async with side_server(server, **BEHIND_PROXY) as srv:
        first = await via_proxy(srv, "203.0.113.5:41234")
        await wait_live(srv, 1)
        with pytest.raises(InvalidStatus) as refused:  # the same caller, another source port
            await via_proxy(srv, "203.0.113.5:41999")
        assert json.loads(refused.value.response.body)["reason"] == "per_address_limit"
        second = await via_proxy(srv, "203.0.113.6:41234")  # another caller through the proxy
        third = await via_proxy(srv, "[2001:db8:1:2::a]:443")
        await wait_live(srv, 3)
        for ws in (first, second, third):
            await ws.close()
        await wait_live(srv, 0)


async def test_an_ipv6_caller_is_counted_by_its_64(server: VoiceServer) -> None:
    """An IPv6 host may take a new address in its /64 for every connection:
    the per-address cap counts the /64 as one source."""

    async with side_server(server, **BEHIND_PROXY) as srv:
        first = await via_proxy(srv, "2001:db8:1:2::a")
        await wait_live(srv, 1)
        with pytest.raises(InvalidStatus) as refused:  # the same /64, another address in it
            await via_proxy(srv, "2001:db8:1:2:ffff::b")
        assert json.loads(refused.value.response.body)["reason"] == "per_address_limit"
        second = await via_proxy(srv, "2001:db8:1:3::a")  # the next /64: another source
        await wait_live(srv, 2)
        await first.close()
        await second.close()
        await wait_live(srv, 0)


async def test_an_exempt_ipv6_gateway_is_exempt_by_its_own_address(server: VoiceServer) -> None:
    """A gateway exempt as one IPv6 address (/128) carries many callers: it is
    exempt though the cap counts its /64; its /64 neighbours are not."""
    exempt = {**BEHIND_PROXY, "per_address_exempt": ["2001:db8:1:2::a/128"]}
    async with side_server(server, **exempt) as srv:
        calls = [await via_proxy(srv, "2001:db8:1:2::a") for _ in range(2)]
        await wait_live(srv, 2)
        neighbour = await via_proxy(srv, "2001:db8:1:2::b")
        await wait_live(srv, 3)
        with pytest.raises(InvalidStatus) as refused:  # the neighbour's /64 (the gateway's calls do not count)
            await via_proxy(srv, "2001:db8:1:2::c")
        assert json.loads(refused.value.response.body)["reason"] == "per_address_limit"
        for ws in [*calls, neighbour]:
            await ws.close()
        await wait_live(srv, 0)


async def test_a_neighbours_flood_does_not_cool_down_an_exempt_gateway(server: VoiceServer) -> None:
    """Cool-downs are kept per /64: a neighbour flooding from the exempt
    gateway's /64 cools that /64 down, and the gateway (exempt, as the
    docs say) still gets in; the neighbour's /64 does not."""
    from voice.server.limits import CallLimits

    exempt = {**BEHIND_PROXY, "per_address_exempt": ["2001:db8:1:2::a/128"], "limits": CallLimits(abuse_cooldown_s=30)}
    async with side_server(server, **exempt) as srv:
        neighbour = await via_proxy(srv, "2001:db8:1:2::b")
        with contextlib.suppress(ConnectionClosed):
            for _ in range(200):
                await neighbour.send("not json")
            while True:
                await neighbour.recv()
        assert neighbour.close_code == 1008
        refused = await refused_once_released(lambda: via_proxy(srv, "2001:db8:1:2::c"))
        assert json.loads(refused.response.body)["reason"] == "abuse_cooldown"
        gateway = await via_proxy(srv, "2001:db8:1:2::a")
        await wait_live(srv, 1)
        await gateway.close()
        await wait_live(srv, 0)


async def test_a_handler_stuck_after_the_drain_does_not_hold_the_server_up(server: VoiceServer) -> None:
    """After the drain the server waits for its call handlers to release
    their calls; one that never returned held the process up until it was
    killed. close() gives them a deadline (serve_forever: the close
    handshake's limit and HANDLERS_RELEASE_S)."""
    import time

    from voice.server.config import ServerConfig

    entered, handlers = asyncio.Event(), []

    async def stuck(ws, runtime) -> None:
        handlers.append(asyncio.current_task())
        entered.set()
        await asyncio.sleep(3600)  # a release that never ends

    srv = VoiceServer(ServerConfig(port=0), runtime=server.runtime)
    srv.route = lambda path: stuck  # type: ignore[method-assign]
    await srv.start()
    ws = await connect(f"ws://127.0.0.1:{srv.port}/v1/call")
    try:
        await asyncio.wait_for(entered.wait(), 5)
        await srv.drain(deadline_s=0.2)
        started = time.monotonic()
        await asyncio.wait_for(srv.close(handlers_timeout_s=0.5), 10)
        assert time.monotonic() - started < 5
    finally:
        for task in handlers:
            task.cancel()
        await ws.close()


async def test_drain_ends_audiosocket_calls_and_refuses_new_ones(server: VoiceServer) -> None:
    async with side_server(server) as srv:
        ws = await ws_call(srv)
        reader, writer = await asterisk(srv)
        await wait_live(srv, 2)
        await srv.drain(deadline_s=0.3)
        assert await until_eof(reader, timeout=5.0) == message(KIND_HANGUP)
        writer.close()
        await asyncio.wait_for(ws.wait_closed(), 5.0)
        assert ws.close_code == 1001
        assert srv.registry.live_calls() == 0
        reader, writer = await asterisk(srv)
        assert await until_eof(reader) == REFUSED
        writer.close()


def test_allow_lists() -> None:
    nets = parse_networks(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert address_allowed("10.1.2.3", nets)
    assert address_allowed("::ffff:10.1.2.3", nets)  # dual-stack sockets report IPv4 peers like this
    assert address_allowed("192.0.2.7", nets) and not address_allowed("192.0.2.8", nets)
    assert address_allowed("2001:db8::1", nets)
    assert not address_allowed("127.0.0.1", nets)
    assert not address_allowed(None, nets) and not address_allowed("not-an-ip", nets)
    assert address_allowed("203.0.113.9", [])  # no list: anyone
    # Sources as the registry keys them: an IPv6 /64 (loopback and IPv4 as they are).
    assert normalize_address("2001:db8:1:2::a") == "2001:db8:1:2::/64"
    assert normalize_address("::1") == "::1" and normalize_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_allowed("2001:db8:1:2::/64", nets) and not address_allowed("2001:db9::/64", nets)
