"""The LLM tier on vLLM's router (docs/scaling.md), for real: two
``llm.openai_server`` replicas (the embedded SmolLM2) behind ``vllm-router
--policy sticky_least_loaded``, and firstline's RemoteEngine pointed at the
router, as ``--remote-url`` would be. Which replica served a turn is read
from each replica's own ``served`` counter."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from llm.base import GenerationRequest
from llm.config import DEFAULT_SYSTEM_PROMPT
from llm.remote_engine import RemoteEngine
from tests.http_get import http_get
from tests.openai_servers import RouterProcess, ServerProcess, start_servers

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tier():
    replicas = await start_servers(2, "--threads", "1", "--parallel", "2")
    router = RouterProcess([r.root for r in replicas])
    try:
        await router.wait_ready()
        yield replicas, router
    finally:
        router.stop()
        for r in replicas:
            r.stop()


async def served(replicas: list[ServerProcess]) -> list[int]:
    counts = []
    for r in replicas:
        health = await r.health()
        counts.append(-1 if health is None else health["served"])
    return counts


async def turn(engine: RemoteEngine, call_id: str, text: str) -> str:
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": text}]
    request = GenerationRequest(f"{call_id}-{text[:8]}", messages, max_tokens=6, session_key=call_id)
    return "".join([delta async for delta in engine.stream(request)])


async def test_every_turn_of_a_call_reaches_one_replica_and_calls_spread(tier) -> None:
    replicas, router = tier
    engine = RemoteEngine(router.url, system_prompt=None, retry_before_text=True)
    await engine.start()
    try:
        before = await served(replicas)
        for text in ("Hello there.", "What time do you open?", "And on Sunday?"):
            assert await turn(engine, "call-a", text)
        after_a = await served(replicas)
        delta_a = [a - b for a, b in zip(after_a, before, strict=True)]
        assert sorted(delta_a) == [0, 3], f"call-a's turns were split over the replicas: {delta_a}"
        # A second live call goes to the least-loaded replica: the other one.
        for text in ("Hi, I need help.", "With my bill."):
            assert await turn(engine, "call-b", text)
        delta_b = [a - b for a, b in zip(await served(replicas), after_a, strict=True)]
        assert sorted(delta_b) == [0, 2], f"call-b's turns were split: {delta_b}"
        assert delta_a.index(3) != delta_b.index(2), "both calls on one replica while the other was idle"
        # The call's end frees its session in the router (not after 2 h).
        engine.end_session("call-a")
        await asyncio.wait(engine._finishing, timeout=5)
        assert engine._finishes_sessions, "the router should take /finish_session"
    finally:
        await engine.close()


async def test_a_plain_server_is_not_asked_to_finish_sessions_twice(tier) -> None:
    replicas, _ = tier
    engine = RemoteEngine(replicas[0].url, system_prompt=None)
    await engine.start()
    try:
        engine.end_session("call-x")
        await asyncio.wait(engine._finishing, timeout=5)
        assert not engine._finishes_sessions  # 404: not a router, never asked again
        engine.end_session("call-y")
        assert not engine._finishing
    finally:
        await engine.close()


async def test_a_killed_llm_replica_and_the_calls_next_turn_is_answered_by_the_other(tier) -> None:
    """kill -9 of the replica a call is stuck to: the next turn, sent at
    once (before the router's health check has noticed), is answered by the
    survivor: the router fails it, RemoteEngine retries before any text."""
    replicas, router = tier
    engine = RemoteEngine(router.url, system_prompt=None, retry_before_text=True)
    await engine.start()
    try:
        before = await served(replicas)
        assert await turn(engine, "call-c", "Hello, is anyone there?")
        delta = [a - b for a, b in zip(await served(replicas), before, strict=True)]
        doomed = delta.index(1)
        survivor = replicas[1 - doomed]
        replicas[doomed].kill()
        was = (await survivor.health())["served"]
        assert await turn(engine, "call-c", "Can you hear me now?")
        assert (await survivor.health())["served"] > was
        # And a new call is answered too, by the survivor.
        was = (await survivor.health())["served"]
        assert await turn(engine, "call-d", "Good morning.")
        assert (await survivor.health())["served"] == was + 1
        # Once the router has noticed (its /health is 503 while any worker is
        # down), the tier is still up for the voice replicas: one worker serves.
        async with asyncio.timeout(15):
            while (await http_get(router.port, "/health"))[0] != 503:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        assert await engine.check_health(), "one dead worker marked the whole router down"
    finally:
        await engine.close()


async def test_a_reply_cut_by_a_killed_replica_is_carried_on_by_the_other(tier) -> None:
    """kill -9 mid-stream: the reply goes on on the surviving replica from
    what was already said (llm/continuation.py, vLLM's continue_final_message
    through the router), not from the top and not lost."""
    from llm.continuation import stream_continuing

    replicas, router = tier
    alive = [r for r in replicas if r.proc.poll() is None]
    if len(alive) < 2:  # the previous test killed one: a fresh pair
        alive = [*alive, *(await start_servers(1, "--threads", "1", "--parallel", "2"))]
        for r in alive:
            if r not in replicas:
                replicas.append(r)
        router.stop()
        router = RouterProcess([r.root for r in alive])
        await router.wait_ready()
    engine = RemoteEngine(router.url, system_prompt=None, retry_before_text=True)
    await engine.start()
    try:
        story = [{"role": "system", "content": "You are a storyteller."},
                 {"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]  # fmt: skip
        request = GenerationRequest("story", story, max_tokens=80, session_key="call-story")
        before = await served(alive)
        parts: list[str] = []
        async for delta in stream_continuing(engine, request):
            parts.append(delta)
            if len(parts) == 5:
                now = await served(alive)
                doomed = next(r for r, a, b in zip(alive, now, before, strict=True) if a > b)
                doomed.kill()
                cut_at = "".join(parts)
        reply = "".join(parts)
        assert request.usage.continuations == 1
        assert reply.startswith(cut_at) and len(reply) > len(cut_at) + 20, (cut_at, reply)
    finally:
        await engine.close()
        router.stop()
