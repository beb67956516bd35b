"""Copies of the embedded llama.cpp engine behind one engine (llm/replicas.py,
``--llm-replicas``): real engines, real generations, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from llm.base import GenerationRequest
from llm.config import LLMConfig, replicas_for
from llm.engines import build_local_engine
from llm.replicas import ReplicaSet

SYSTEM = "You are a helpful voice assistant on a phone call. Answer in one short sentence."


def _request(key: str | None, text: str, max_tokens: int = 16) -> GenerationRequest:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return GenerationRequest(f"{key}-{text[:12]}", messages, max_tokens=max_tokens, temperature=0.0, session_key=key)


async def _say(engine, request: GenerationRequest) -> str:
    return "".join([delta async for delta in engine.stream(request)])


async def test_turns_that_arrive_together_run_on_separate_copies() -> None:
    """Two calls' turns at once go to the two copies; a call's next turn goes
    back to the copy that cached its history while that copy is free, and to
    the other while it is busy; a stream closed early frees its copy; every
    copy says what the one model says (greedy)."""
    engine = build_local_engine(LLMConfig(isolation="inprocess", parallel=2, threads=1, replicas=2))
    assert isinstance(engine, ReplicaSet) and len(engine.copies) == 2
    await engine.start()
    try:
        a, b = await asyncio.gather(
            _say(engine, _request("call-a", "What time do you open tomorrow?")),
            _say(engine, _request("call-b", "Can I move my appointment to Friday?")),
        )
        assert a.strip() and b.strip()
        assert engine.served == [1, 1] and engine.active == [0, 0]
        home = engine._homes["call-a"]

        # Free: call-a's next turn goes to its own copy, however often.
        for text in ("And on Sunday?", "Thanks, and on Monday?"):
            await _say(engine, _request("call-a", text))
        assert engine.served[home] == 3 and engine.served[1 - home] == 1

        # One request busier (call-a's preemptive reply holds it): within the
        # slack, the turn stays with the copy that has its history...
        assert engine.home_slack == 1
        held = engine.stream(_request("call-a", "Tell me a long story about the sea.", max_tokens=64))
        await held.__anext__()
        assert engine.active[home] == 1
        same = await _say(engine, _request("call-a", "Do you deliver to Boston?"))
        assert engine.served[home] == 5 and engine.served[1 - home] == 1 and same.strip()
        # ... and with no slack it goes to the least busy copy.
        engine.home_slack = 0
        other = await _say(engine, _request("call-a", "Do you deliver to Boston?"))
        assert engine.served[1 - home] == 2 and other.strip()
        await held.aclose()  # closed before the end: the copy is free again
        assert engine.active == [0, 0]

        # The same model in every copy: the same greedy words.
        question = _request(None, "How do I reset my voicemail password?")
        said = [await _say(copy, question) for copy in engine.copies]
        assert said[0] == said[1] and said[0].strip()

        assert engine.describe()["replicas"] == 2
        engine.end_session("call-a")
        assert "call-a" not in engine._homes
    finally:
        await engine.close()


async def test_the_engine_server_keeps_a_call_on_its_copy() -> None:
    """``python -m llm.openai_server --replicas 2`` (the supervised engine
    child runs the same): the call id that RemoteEngine sends as
    X-Session-ID routes the call, even when its first words change."""
    from llm.remote_engine import RemoteEngine
    from tests.openai_servers import ServerProcess

    server = await ServerProcess("--replicas", "2", "--threads", "1", "--parallel", "2").wait_healthy()
    try:
        engine = RemoteEngine(server.url, system_prompt=None)
        try:
            await _say(engine, _request("call-a", "What time do you open tomorrow?", 8))
            health = await server.health()
            assert health is not None and health["engine"]["replicas"] == 2
            home = health["engine"]["served_by_replica"].index(1)  # call-a's copy
            await _say(engine, _request("call-b", "Can I move my appointment to Friday?", 8))
            # Other first words each time (no fallback key in common): only
            # the call id can keep these on call-a's copy.
            for text in ("Is the store open on Sunday?", "Do you sell gift cards?", "Where do I park?"):
                await _say(engine, _request("call-a", text, 8))
            health = await server.health()
            assert health is not None
            served = health["engine"]["served_by_replica"]
            assert served[home] == 4 and served[1 - home] == 1, served
        finally:
            await engine.close()
    finally:
        server.stop()


def test_replicas_by_default_and_by_flag() -> None:
    """Two copies for llama.cpp on a CPU with 2+ cores, one on a GPU or for
    vLLM; --llm-replicas sets it; vLLM refuses copies; 0 copies is an error."""

    def llm(*flags: str):
        from voice.server.cli import build_parser, config_from_args

        return config_from_args(build_parser().parse_args(["serve", *flags])).llm

    cores = os.cpu_count() or 2
    assert llm().replicas == replicas_for("llamacpp", "cpu", cores) == (2 if cores >= 2 else 1)
    assert replicas_for("llamacpp", "cpu", 1) == 1
    assert llm("--llm-device", "cuda").replicas == 1
    assert llm("--engine", "vllm").replicas == 1
    assert llm("--llm-replicas", "3").replicas == 3
    assert llm().replica_home_slack == 1 and llm("--llm-home-slack", "0").replica_home_slack == 0
    with pytest.raises(SystemExit, match=r"--llm-home-slack must be 0"):
        llm("--llm-home-slack", "-1")
    with pytest.raises(SystemExit, match=r"--llm-replicas is for llama\.cpp"):
        llm("--engine", "vllm", "--llm-replicas", "2")
    with pytest.raises(ValueError, match="at least 1"):
        build_local_engine(LLMConfig(replicas=0))
    with pytest.raises(ValueError, match="at least one engine"):
        ReplicaSet([])


def test_a_request_without_a_call_id_is_routed_by_a_digest() -> None:
    """With no call id, the system prompt and first user message route the
    request: the key is kept (thousands of them), so it is a digest of
    those, not the words (a prompt of megabytes was kept whole)."""
    from llm.remote_engine import session_key_of

    long = "I would like to talk about my account. " * 50_000
    key = session_key_of(_request(None, long))
    assert len(key) <= 64 and long[:20] not in key
    assert key == session_key_of(_request(None, long)) != session_key_of(_request(None, "Hello?"))
    assert session_key_of(_request("call-a", long)) == "call-a"


async def test_a_copy_still_running_a_cancelled_prompt_pass_is_not_picked_as_idle() -> None:
    """A barge-in cancels a reply during its prompt pass: llama.cpp runs the
    pass to its end (it looks at the cancel only between chunks), so the
    copy is busy for a while after the reply's caller has gone. It counted
    as idle, and the next call's turn was sent there to wait behind it."""
    engine = build_local_engine(LLMConfig(isolation="inprocess", parallel=1, threads=1, replicas=2))
    assert isinstance(engine, ReplicaSet)
    await engine.start()
    try:
        # A long prompt no slot has cached: a prompt pass of a good part of a second.
        words = " ".join(f"item{n} costs {n * 7 % 97} dollars" for n in range(200))
        request = _request("call-a", f"Here is my order: {words}. What is the total?", max_tokens=8)
        reply = asyncio.ensure_future(_say(engine, request))
        async with asyncio.timeout(30):
            while not any(engine.active):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # inside the prompt pass
        assert not reply.done()
        reply.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reply
        home = engine._homes["call-a"]
        assert engine.active == [0, 0]
        lingering = engine.copies[home].lingering_requests()
        assert lingering == 1, "the prompt pass ended before the check: make the prompt longer"
        # Not the copy still working, for any call (counted idle, every
        # other call went there in turn).
        assert [engine.pick(f"call-{n}") for n in "bcde"] == [1 - home] * 4
        async with asyncio.timeout(30):
            while engine.copies[home].lingering_requests():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        await engine.close()
