"""The scale-out topology for real, on loopback (benchmarks/cluster.py,
docs/scaling.md): HAProxy with deploy/haproxy.cfg in front of two firstline
replicas, both on the LLM tier of two llm.openai_server replicas behind
vllm-router. Real processes, real models, real speech; which replica took a
call is read from its own /metrics (calls admitted), which LLM replica
served a turn from its /health (requests served).

Faults: SIGTERM of a voice replica (drain), kill -9 of a voice replica
mid-call (and the Twilio call re-attached on the other through the TwiML
endpoint, its conversation read back from Redis), a voice replica added at
run time. kill -9 of an LLM replica mid-call is tests/test_llm_router.py."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from benchmarks.client import NativeCaller
from benchmarks.cluster import Cluster
from tests.conftest import with_silence
from tests.fake_carrier import FakeTwilio
from tests.http_get import http_get
from voice.call.store import RedisStore

pytestmark = pytest.mark.asyncio(loop_scope="session")
PER_SOURCE = 5


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster():
    # Loopback is not exempt at the tier here, so its per-source cap is tested
    # (each replica exempts it: they count callers from X-Forwarded-For).
    c = Cluster(voice=2, llm=2, max_calls=4, per_source=PER_SOURCE, lb_exempt=[])
    await asyncio.to_thread(c.start)
    yield c
    await asyncio.to_thread(c.stop)


def took(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Replica -> calls admitted between two readings (only those that took some)."""
    return {name: int(after[name] - before.get(name, 0)) for name in after if after[name] > before.get(name, 0)}


def llm_served(c: Cluster) -> list[int]:
    counts = []
    for r in c.llm:
        try:
            with urllib.request.urlopen(r.root + "/health", timeout=2) as resp:
                counts.append(json.loads(resp.read())["served"])
        except OSError:
            counts.append(-1)
    return counts


async def answered_turn(caller: NativeCaller, clip, turn: int) -> dict:
    audio = with_silence(clip.load(8000), 8000, 1.5)
    await caller.play(audio, 8000, "mulaw", realtime=True, speed=4.0)
    return await caller.wait_for("response.done", timeout=90, turn=turn)


async def test_one_source_s_calls_are_capped_across_the_tier(cluster) -> None:
    """Each replica's per-address cap counts only its own calls, and
    leastconn spreads one address's calls over all of them: N replicas let
    it hold N x the cap. HAProxy caps the source across the tier, refusing
    as a replica would (429, JSON reason), and frees the slot at hang-up."""
    held: list[ClientConnection] = []
    try:
        for _ in range(PER_SOURCE):
            held.append(await connect(cluster.url + "/v1/call"))
        with pytest.raises(InvalidStatus) as refused:
            await connect(cluster.url + "/v1/call")
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body)["reason"] == "per_address_limit"
        await held.pop().close()
        async with asyncio.timeout(5):
            while True:
                try:
                    held.append(await connect(cluster.url + "/v1/call"))
                    break
                except InvalidStatus:  # HAProxy counts the closed one down as its side closes
                    await asyncio.sleep(0.1)
    finally:
        for ws in held:
            await ws.close()


async def test_calls_spread_and_a_calls_turns_stay_on_one_llm_replica(cluster, phone_prompts) -> None:
    before = cluster.admitted()
    async with NativeCaller(cluster.url + "/v1/call") as a, NativeCaller(cluster.url + "/v1/call") as b:
        await a.start("mulaw", 8000)
        await b.start("mulaw", 8000)
        # leastconn: the second call goes to the replica without one.
        assert sorted(took(before, cluster.admitted()).values()) == [1, 1], cluster.admitted()
        done = await asyncio.gather(answered_turn(a, phone_prompts[0], 1), answered_turn(b, phone_prompts[1], 1))
        assert all(d["text"] for d in done), done
    # One call, two turns: every LLM request of it (prefills included) on one replica.
    served = llm_served(cluster)
    async with NativeCaller(cluster.url + "/v1/call") as c:
        await c.start("mulaw", 8000)
        await answered_turn(c, phone_prompts[2], 1)
        await answered_turn(c, phone_prompts[3], 2)
    delta = [after - was for after, was in zip(llm_served(cluster), served, strict=True)]
    assert sorted(delta)[0] == 0 and sorted(delta)[1] >= 2, f"the call's turns were split over LLM replicas: {delta}"


async def test_sigterm_drains_a_voice_replica_its_call_goes_on_new_calls_go_elsewhere(cluster, phone_prompts) -> None:
    before = cluster.admitted()
    async with NativeCaller(cluster.url + "/v1/call") as live:
        await live.start("mulaw", 8000)
        doomed = cluster.took_call(before)
        doomed.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        others = cluster.admitted()
        # New calls at once, before HAProxy's check has seen /readyz go 503:
        # the draining replica refuses them (503) and HAProxy redispatches.
        for k in range(3):
            async with NativeCaller(cluster.url + "/v1/call") as fresh:
                ready = await fresh.start("mulaw", 8000)
                assert ready["type"] == "ready", k
        assert doomed.name not in took(others, cluster.admitted()), "a draining replica took a new call"
        assert sum(took(others, cluster.admitted()).values()) == 3
        # The call that was live when the drain began is still answered.
        done = await answered_turn(live, phone_prompts[4], 1)
        assert done["text"]
    # Its last call gone, the replica exits by itself.
    await asyncio.to_thread(doomed.proc.wait, 60)
    assert doomed.proc.returncode == 0
    cluster.admin(f"set server firstline/{doomed.name} state maint")
    replacement = await asyncio.to_thread(cluster.add_voice)
    await asyncio.to_thread(cluster.wait_up, [replacement.name])


async def test_kill_9_of_a_voice_replica_ends_only_its_calls(cluster, phone_prompts) -> None:
    before = cluster.admitted()
    async with NativeCaller(cluster.url + "/v1/call") as a:
        await a.start("mulaw", 8000)
        doomed = cluster.took_call(before)
        middle = cluster.admitted()
        async with NativeCaller(cluster.url + "/v1/call") as b:
            await b.start("mulaw", 8000)
            survivor = cluster.took_call(middle)
            assert survivor is not doomed
            doomed.signal(signal.SIGKILL)
            await asyncio.to_thread(doomed.proc.wait, 10)
            # Its call is cut at once (HAProxy closes the tunnel), not left hanging.
            assert a.ws is not None
            await asyncio.wait_for(a.ws.wait_closed(), 10)
            with pytest.raises((ConnectionClosed, ConnectionError)):
                await answered_turn(a, phone_prompts[5], 1)
            # The other replica's call goes on as if nothing happened.
            assert (await answered_turn(b, phone_prompts[6], 1))["text"]
            # New calls connect at once (observe layer4 marks the dead one down).
            for _ in range(3):
                async with NativeCaller(cluster.url + "/v1/call") as fresh:
                    assert (await fresh.start("mulaw", 8000))["type"] == "ready"
    cluster.admin(f"set server firstline/{doomed.name} state maint")


async def test_a_voice_replica_added_at_run_time_takes_new_calls(cluster) -> None:
    live = [r for r in cluster.voice if r.alive()]
    callers = [NativeCaller(cluster.url + "/v1/call") for _ in live]
    try:
        for caller in callers:  # one call on each running replica: the new one is the least loaded
            await caller.__aenter__()
            await caller.start("mulaw", 8000)
        added = await asyncio.to_thread(cluster.add_voice)
        await asyncio.to_thread(cluster.wait_up, [added.name])
        before = cluster.admitted()
        async with NativeCaller(cluster.url + "/v1/call") as fresh:
            await fresh.start("mulaw", 8000)
            assert took(before, cluster.admitted()) == {added.name: 1}
    finally:
        for caller in callers:
            await caller.__aexit__(None, None, None)


def firstline_events(carrier: FakeTwilio, kind: str) -> list[dict]:
    mirrored = [m["firstline"] for _, m in carrier.texts if m.get("event") == "firstline"]
    return [ev for ev in mirrored if ev.get("type") == kind]


async def wait_firstline(carrier: FakeTwilio, kind: str, timeout: float = 90.0, **match) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for ev in firstline_events(carrier, kind):
            if all(ev.get(k) == v for k, v in match.items()):
                return ev
        if carrier.closed.is_set():
            raise ConnectionError(f"stream closed before {kind}")
        await asyncio.sleep(0.05)
    raise TimeoutError(kind)


async def test_a_twilio_call_whose_replica_is_killed_re_attaches_with_its_history(cluster, phone_prompts) -> None:
    """kill -9 mid-call; Twilio fetches the <Connect action> URL (through
    HAProxy: any replica answers), follows the <Stream> it names, and the call
    goes on on the other replica, its conversation read back from Redis."""
    call_sid = "CA" + "7" * 32
    events = {"firstline_events": "1"}  # the test's window on the session (not sent by real Twilio)
    before = cluster.admitted()
    async with FakeTwilio(cluster.url, call_sid=call_sid, parameters=events) as carrier:
        await wait_firstline(carrier, "ready", timeout=20)
        doomed = cluster.took_call(before)
        await carrier.say(with_silence(phone_prompts[7].load(8000), 8000, 1.5), speed=4.0)
        first = await wait_firstline(carrier, "response.done", turn=1)
        said = (await wait_firstline(carrier, "transcript.final", turn=1))["text"]
        # The turn's state is written just after its reply (not before it, so
        # the write costs the reply nothing): killed before that write, the
        # replica would lose this turn. The fault tested here comes after it.
        store = RedisStore(cluster.state_url)
        for _ in range(100):
            stored = await store.load(f"twilio:{call_sid}")
            if stored is not None and stored.turn == 1:
                break
            await asyncio.sleep(0.05)
        await store.close()
        assert stored is not None and stored.turn == 1, stored
        doomed.signal(signal.SIGKILL)
        await asyncio.wait_for(carrier.closed.wait(), 10)
    # What Twilio does next: GET the action URL, then open the stream it names.
    status, _, twiml = await http_get(cluster.lb_port, "/twilio/reconnect?attempt=1&CallSid=" + call_sid)
    assert status == 200, twiml
    stream_url = twiml.decode().split('<Stream url="', 1)[1].split('"', 1)[0]
    assert stream_url == f"ws://127.0.0.1:{cluster.lb_port}/twilio"
    # Callers reach the calls, not the replicas' /metrics (scraped directly).
    status, _, _ = await http_get(cluster.lb_port, "/metrics")
    assert status == 404
    async with FakeTwilio(stream_url.removesuffix("/twilio"), call_sid=call_sid, parameters=events) as again:
        ready = await wait_firstline(again, "ready", timeout=20)
        assert ready["resumed"] is True
        await again.say(with_silence(phone_prompts[8].load(8000), 8000, 1.5), speed=4.0)
        # Turn 2, not a new call's turn 1: the history came along.
        second = await wait_firstline(again, "response.done", turn=2)
        assert second["text"]
    survivor = next(r for r in cluster.voice if r.alive() and r is not doomed)
    assert cluster.metric(survivor, "firstline_calls_resumed_total") >= 1
    assert said and first["text"]
    cluster.admin(f"set server firstline/{doomed.name} state maint")
