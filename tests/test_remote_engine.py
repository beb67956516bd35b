"""llm.openai_server, RemoteEngine and RemotePool against real servers
(``python -m llm.openai_server`` processes on the embedded SmolLM2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time

import aiohttp
import pytest
import pytest_asyncio

from llm.base import EngineError, EngineUnavailable, GenerationRequest, PromptTooLong
from llm.config import DEFAULT_SYSTEM_PROMPT, LLMConfig
from llm.remote_engine import RemoteEngine, RemotePool, RequestRefused, _score, normalize_base_url
from llm.sampling import SamplingParams
from llm.supervisor import free_port
from tests.openai_servers import ServerProcess, start_servers
from tests.test_llamacpp_engine import check_penalties, check_seed_stop_and_max_tokens, check_truncation

STORY = "You are a storyteller. Always answer with a long story of many short sentences."


def _messages(question: str, system: str = DEFAULT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


async def _collect(engine, request) -> str:
    return "".join([d async for d in engine.stream(request)])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicas() -> list[ServerProcess]:
    servers = await start_servers(2, "--body-timeout-s", "2")
    yield servers
    for s in servers:
        s.stop()


async def test_openai_server_speaks_the_openai_protocol(replicas):
    root = replicas[0].root
    body = {
        "model": "whatever",
        "messages": _messages("What is the capital of France?"),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 24,
    }
    async with aiohttp.ClientSession() as s:
        async with s.get(root + "/v1/models") as r:
            models = await r.json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
        async with s.post(root + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = [line[6:] for line in (await r.text()).splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert "paris" in text.lower()
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 20  # system prompt warmed at start
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        # Non-streaming, and a bad request.
        async with s.post(root + "/v1/chat/completions", json={**body, "stream": False}) as r:
            whole = await r.json()
        assert whole["choices"][0]["message"]["content"].strip() and whole["usage"]["completion_tokens"] > 0
        async with s.post(root + "/v1/chat/completions", json={"messages": []}) as r:
            assert r.status == 400 and "messages" in (await r.json())["error"]["message"]
        # A body past the server's limit is refused in the same JSON shape.
        huge = {**body, "messages": _messages("x" * (5 << 20))}
        async with s.post(root + "/v1/chat/completions", json=huge) as r:
            assert r.status == 413 and "over 4 MiB" in (await r.json())["error"]["message"]
        async with s.post(root + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
        for depth in (5000, *range(800, 1000, 25)):  # past the parser's limit, and just inside it
            nested = b'{"messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * depth + b"]" * depth + b"}"
            async with s.post(root + "/v1/chat/completions", data=nested) as r:
                message = (await r.json())["error"]["message"]  # JSON: not aiohttp's plain 500
                assert r.status == 400, (depth, message)
                assert depth < 5000 or "nested too deep" in message, message
    # A body that trickles in (here: stops) is answered 408 once
    # --body-timeout-s (2 s here) is over: it held one of --max-requests.
    port = int(root.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"messages": ['
        )
        await writer.drain()
        answer = b""
        async with asyncio.timeout(15):
            while b"did not arrive" not in answer and (chunk := await reader.read(4096)):
                answer += chunk
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer, answer


async def test_remote_engine_streams_with_usage(replicas):
    engine = RemoteEngine(replicas[0].root)  # a root URL is accepted too
    await engine.start()
    try:
        assert engine.base_url == replicas[0].url and engine.model == "SmolLM2-135M-Instruct"
        request = GenerationRequest("paris", _messages("What is the capital of France?"), max_tokens=48)
        text = await _collect(engine, request)
        assert "paris" in text.lower()
        u = request.usage
        assert u.prompt_tokens > 0 and u.completion_tokens > 0 and u.cached_tokens >= 20, u
    finally:
        await engine.close()


async def test_cancelling_a_stream_aborts_it_in_the_server(replicas):
    server = replicas[1]
    engine = RemoteEngine(server.url, system_prompt=None)
    await engine.start()
    before = (await server.health())["aborted"]
    request = GenerationRequest("story", _messages("Tell me about a dragon.", STORY), max_tokens=600)
    got = asyncio.Event()

    async def consume():
        async for _ in engine.stream(request):
            got.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        health = await server.health()
        if health["aborted"] > before and health["active"] == 0:
            break
        await asyncio.sleep(0.05)
    assert health["aborted"] == before + 1 and health["active"] == 0, health
    # The slot is free: a new request is answered at once.
    assert await asyncio.wait_for(_collect(engine, GenerationRequest("hi", _messages("Say hello."), 8)), 10)
    await engine.close()


async def test_unreachable_server_is_a_clear_engine_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    engine = RemoteEngine(url, model="m", connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match=r"cannot connect to LLM server http://127\.0\.0\.1:\d+"):
        await _collect(engine, GenerationRequest("x", _messages("hi")))
    assert time.monotonic() - started < 2.0
    with pytest.raises(EngineUnavailable, match="cannot connect"):
        await engine.start()  # resolving the model fails the same way
    await engine.close()


async def test_a_server_whose_host_drops_the_connect_is_marked_down():
    """A host that drops packets (powered off, a firewall): the connect times
    out, and aiohttp's ConnectionTimeoutError is also a TimeoutError. It was
    read as the first-token deadline: the lone engine stayed available,
    /readyz said ready, and every turn waited and failed. (A listener whose
    accept queue is full drops new connection attempts, as such a host does.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    # retry_before_text as for one URL behind a router: a connect that timed
    # out is not tried again (it doubled the turn's wait for nothing).
    engine = RemoteEngine(f"http://127.0.0.1:{port}", model="m", connect_timeout_s=0.5, retry_before_text=True)
    engine.healthy = True  # it answered before its host went away
    try:
        with pytest.raises(EngineUnavailable, match=r"cannot connect to LLM server .* within 0\.5 s"):
            await _collect(engine, GenerationRequest("x", _messages("hi")))
        assert not engine.available and engine.retries == 0
    finally:
        await engine.close()
        for sock in [*fillers, listener]:
            sock.close()


async def test_http_error_is_a_clear_engine_error(replicas):
    engine = RemoteEngine(replicas[0].root + "/nowhere", model="m")  # -> /nowhere/v1/chat/completions: 404
    with pytest.raises(EngineError, match="answered HTTP 404"):
        await _collect(engine, GenerationRequest("x", _messages("hi")))
    await engine.close()


def test_base_url_forms():
    assert normalize_base_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"


async def test_pool_pins_each_call_to_one_replica(replicas):
    pool = RemotePool([RemoteEngine(s.url, system_prompt=None) for s in replicas], health_interval_s=0.5)
    await pool.start()
    try:
        keys = [f"call-{i}" for i in range(12)]
        first = {k: pool.order(k)[0] for k in keys}
        # Stable: a fresh pool (another process, a restart) ranks every key the same.
        fresh = RemotePool([RemoteEngine(s.url) for s in replicas])
        assert {k: fresh.order(k)[0] for k in keys} == first
        assert set(first.values()) == {0, 1}, "rendezvous hashing left a replica without calls"
        for key in keys[:4]:
            cached = []
            history: list[dict[str, str]] = []
            for turn, question in enumerate(["Hi, what time do you open?", "And on Sunday?", "Thanks. Bye."]):
                messages = _messages(question)[:1] + history + [{"role": "user", "content": question}]
                request = GenerationRequest(f"{key}-{turn}", messages, max_tokens=16, session_key=key)
                reply = await _collect(pool, request)
                assert pool.pinned(key) is pool.replicas[first[key]]
                cached.append(request.usage.cached_tokens)
                history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
            # The pinned replica keeps the call's prefix hot: later turns reuse more than the system prompt.
            assert cached[2] > cached[0], cached
    finally:
        await pool.close()


async def test_pool_fails_over_when_a_replica_dies_and_repins(replicas):
    doomed = await ServerProcess().wait_healthy()
    survivor = replicas[0]
    pool = RemotePool([RemoteEngine(survivor.url, system_prompt=None), RemoteEngine(doomed.url, system_prompt=None)],
                      health_interval_s=0.3)  # fmt: skip
    await pool.start()
    try:
        key = next(f"call-{i}" for i in range(100) if pool.order(f"call-{i}")[0] == 1)  # a call on the doomed one
        await _collect(pool, GenerationRequest("t1", _messages("Hello?"), 8, session_key=key))
        assert pool.pinned(key) is pool.replicas[1]
        # Killed mid-reply: the stream in flight fails at once, with a clear message...
        request = GenerationRequest("t2", _messages("Tell me about a dragon.", STORY), 600, session_key=key)
        started = None
        with pytest.raises(EngineError, match="cut mid-reply"):
            async for _ in pool.stream(request):
                if started is None:
                    started = time.monotonic()
                    doomed.kill()
        assert time.monotonic() - started < 1.0
        # ...and the call's next turn goes to the healthy replica, which it is now pinned to.
        text = await _collect(pool, GenerationRequest("t3", _messages("Say hello."), 12, session_key=key))
        assert text.strip() and pool.pinned(key) is pool.replicas[0]
        assert pool.replicas[1].healthy is False and pool.available
        # A new call whose hash prefers the dead replica is served too (health knows it is down).
        other = next(k for k in (f"new-{i}" for i in range(100)) if _score(k, doomed.url) > _score(k, survivor.url))
        assert await _collect(pool, GenerationRequest("t4", _messages("Say hi."), 8, session_key=other))
    finally:
        await pool.close()
        doomed.stop()


async def test_pool_with_every_replica_down_says_so():
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    pool = RemotePool([RemoteEngine(u, model="m", connect_timeout_s=0.5) for u in dead])
    with pytest.raises(EngineUnavailable, match="no LLM replica could serve the request: cannot connect"):
        await _collect(pool, GenerationRequest("x", _messages("hi"), session_key="k"))
    with pytest.raises(EngineUnavailable, match="no replica of the LLM pool is available"):
        await pool.start()
    await pool.close()


# -- sampling through llm.openai_server (the supervised engine child) ----------


async def test_every_sampling_field_reaches_the_engine_child(replicas):
    """RemoteEngine sends the whole SamplingParams; llm.openai_server parses
    it and its llama.cpp applies each field (observed in the output)."""
    engine = RemoteEngine(replicas[0].url, system_prompt=None)
    await engine.start()
    try:
        await check_penalties(engine)
        await check_truncation(engine)
        await check_seed_stop_and_max_tokens(engine)
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"n": 2}, "n", "'n' must be 1: one choice per request"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "'logit_bias' is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "no tool calling"),
        ({"response_format": {"type": "json_object"}}, "response_format", "no structured output"),
        ({"logprobs": True}, "logprobs", "no log probabilities"),
        ({"mirostat": 2}, "mirostat", "unsupported field 'mirostat'"),
        ({"temperature": 3}, "temperature", r"'temperature' must be in \[0, 2\], got 3"),
        ({"top_k": -5}, "top_k", r"'top_k' must be an integer >= 0"),
        ({"stop": ["a"] * 9}, "stop", "'stop' takes at most 8 strings"),
    ],
)
async def test_openai_server_answers_400_for_what_it_cannot_honour(replicas, extra, param, message):
    body = {"messages": _messages("Hi"), "max_tokens": 4, **extra}
    async with aiohttp.ClientSession() as s, s.post(replicas[0].url + "/chat/completions", json=body) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400 and error["param"] == param
    assert re.search(message, error["message"]), error


async def test_remote_engine_reports_a_refused_field(replicas, caplog):
    # The server vets values itself (any client may call it); RemoteEngine
    # passes its answer on, field and range included, as the error's detail:
    # out of its message, which reaches WARNING logs (a server may quote the
    # request, the caller's words, back), and in the DEBUG log.
    engine = RemoteEngine(replicas[0].url, model="m", system_prompt=None)
    request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=4))
    object.__setattr__(request.sampling, "temperature", 5.0)  # past our validation, as another client might send
    with caplog.at_level(logging.DEBUG, logger="llm.remote_engine"):
        with pytest.raises(EngineError, match=r"answered HTTP 400$") as refused:
            await _collect(engine, request)
    assert re.search(r"'temperature' must be in \[0, 2\], got 5", refused.value.detail), refused.value.detail
    assert any(refused.value.detail in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    await engine.close()


async def test_a_malformed_chunk_is_an_error_that_does_not_carry_the_words(caplog):
    """An upstream (a broken proxy in front of the LLM server) streams a
    chunk that is not JSON: the turn fails with an EngineError that names
    the server and the size, not the chunk's text (model output on the
    caller's conversation), which goes to DEBUG only. The upstream is a
    stand-in: no real server sends this."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "your PIN is 4321"\n\n')
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        engine = RemoteEngine(f"http://127.0.0.1:{port}", model="m", system_prompt=None)
        request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=4))
        with caplog.at_level("INFO"), pytest.raises(EngineError, match="malformed chunk") as failed:
            await _collect(engine, request)
        assert "4321" not in str(failed.value) and "4321" not in caplog.text
        await engine.close()
    finally:
        await runner.cleanup()


class Upstream:
    """A stand-in for an OpenAI-compatible server that misbehaves (no real
    one does these on purpose): ``chat`` answers /v1/chat/completions;
    /health answers 200; ``calls`` counts the chat requests."""

    def __init__(self, chat, models=None, posts=None) -> None:
        self.chat = chat
        self.models = models  # answers /v1/models when given
        self.posts = posts or {}  # other POST routes: path -> handler
        self.calls = 0
        self.runner = None
        self.url = ""

    async def __aenter__(self) -> Upstream:
        from aiohttp import web

        async def chat(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            return await self.chat(request)

        async def health(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", health)
        if self.models is not None:
            app.router.add_get("/v1/models", self.models)
        for path, handler in self.posts.items():
            app.router.add_post(path, handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)  # stalled handlers are cut at cleanup
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def _text_chunk(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


async def _error_then_stall(request):
    from aiohttp import web

    response = web.StreamResponse(status=503, headers={"Retry-After": "1"})
    await response.prepare(request)
    await asyncio.sleep(60)  # headers, then a body that never comes
    return response


async def _error_not_utf8(request):
    from aiohttp import web

    return web.Response(status=503, body=b"\xff\xfe\xfa overloaded \x80")


async def _keep_alive_after_text(request):
    from aiohttp import web

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_text_chunk("Hello"))
    for _ in range(120):  # comments and empty deltas, never another word
        await response.write(b": keep-alive\n\n" + _text_chunk(""))
        await asyncio.sleep(0.25)
    return response


async def _one_huge_line(request):
    from aiohttp import web

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: " + b"x" * (600 * 1024) + b"\n\n")
    await asyncio.sleep(60)
    return response


@pytest.mark.parametrize(
    "chat, error",
    [
        (_error_then_stall, "answered HTTP 503"),
        (_error_not_utf8, "answered HTTP 503: .*overloaded"),
        (_keep_alive_after_text, "stalled for 1.0 s"),
        (_one_huge_line, "cut before any text"),
    ],
    ids=["error-body-stalls", "error-body-not-utf8", "keep-alive-after-text", "one-huge-line"],
)
async def test_a_misbehaving_upstream_fails_the_turn_in_time(chat, error):
    """Each ends the turn with an EngineError within the request's limits
    (first token 1 s, stall 1 s; 5 s allowed), never a hang or a raw
    decode error."""
    async with Upstream(chat) as upstream:
        engine = RemoteEngine(upstream.url, model="m", first_token_timeout_s=1.0, stall_timeout_s=1.0)
        request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=4))
        with pytest.raises(EngineError) as failed:
            await asyncio.wait_for(_collect(engine, request), 5)
        assert re.search(error, f"{failed.value}: {failed.value.detail}"), (str(failed.value), failed.value.detail)
        await engine.close()


async def test_one_replica_that_cannot_score_sentence_ends_does_not_turn_the_probe_off():
    """A pool where one replica has no sentence-end route (another server, a
    rolling upgrade): a call pinned there gets an engine error for that
    pause, not "unsupported", which switched the LLM end-of-turn input off
    for every call of the process until a restart. Only when no replica can
    score is it unsupported."""
    from aiohttp import web

    from llm.base import SentenceEndUnsupported
    from llm.openai_server import SENTENCE_END_PATH

    async def scores(_request):
        return web.json_response({"probability": 0.7})

    async def unused(_request):
        return web.Response(status=500)

    messages = _messages("I would like to")
    async with Upstream(unused, posts={SENTENCE_END_PATH: scores}) as able, Upstream(unused) as unable:
        pool = RemotePool([RemoteEngine(u.url, model="m", system_prompt=None) for u in (able, unable)])
        keys = [f"call-{i}" for i in range(64)]
        on_able = next(k for k in keys if pool.order(k)[0] == 0)
        on_unable = next(k for k in keys if pool.order(k)[0] == 1)
        for _ in range(2):  # the second time the replica is known unable
            with pytest.raises(EngineError) as failed:
                await pool.sentence_end_probability(messages, on_unable)
            assert not isinstance(failed.value, SentenceEndUnsupported)
        assert await pool.sentence_end_probability(messages, on_able) == 0.7
        await pool.close()
    async with Upstream(unused) as one, Upstream(unused) as two:
        pool = RemotePool([RemoteEngine(u.url, model="m", system_prompt=None) for u in (one, two)])
        for key in keys[:8]:  # each replica asked once: both known unable
            with contextlib.suppress(EngineError):
                await pool.sentence_end_probability(messages, key)
        assert not any(r.scores_sentence_end for r in pool.replicas)
        with pytest.raises(SentenceEndUnsupported):
            await pool.sentence_end_probability(messages, keys[0])
        await pool.close()


async def test_a_pool_tries_one_replica_marked_down_after_the_healthy_ones_not_all():
    """The healthy replica fails a turn: one replica marked down is tried as a
    last resort (health may lag behind a recovery), not every one of them:
    each dead one cost the turn its connect timeout more, so a pool with
    several down replicas took seconds per turn to say it failed."""
    from aiohttp import web

    async def restarting(_request):
        return web.Response(status=503, text="restarting")

    async with Upstream(restarting) as up, Upstream(restarting) as down1, Upstream(restarting) as down2:
        upstreams = (up, down1, down2)
        engines = [RemoteEngine(u.url, model="m", system_prompt=None, health_interval_s=None) for u in upstreams]
        pool = RemotePool(engines, health_interval_s=3600)
        engines[0].healthy = True
        with pytest.raises(EngineUnavailable, match="no LLM replica could serve"):
            await _collect(pool, GenerationRequest("x", _messages("hi"), session_key="call-1"))
        assert up.calls == 1 and down1.calls + down2.calls == 1, (up.calls, down1.calls, down2.calls)
        # With none up, every one is a last resort.
        with pytest.raises(EngineUnavailable):
            await _collect(pool, GenerationRequest("y", _messages("hi"), session_key="call-2"))
        assert up.calls + down1.calls + down2.calls == 2 + 3
        await pool.close()


async def test_a_lone_engine_that_failed_once_is_available_again():
    """One failed request (a router's 503 while a replica restarts) marks a
    lone engine down, and /readyz with it; it watches /health until the
    server answers, so an idle replica does not stay unready for good."""

    async def busy(request):
        from aiohttp import web

        return web.Response(status=503, text="restarting")

    async with Upstream(busy) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None, health_interval_s=0.2)
        await engine.start()
        assert engine.available
        with pytest.raises(EngineError, match="HTTP 503"):
            await _collect(engine, GenerationRequest("x", _messages("hi")))
        assert not engine.available
        for _ in range(50):
            if engine.available:
                break
            await asyncio.sleep(0.1)
        assert engine.available
        await engine.close()


async def test_a_pool_does_not_fail_over_a_refused_request_and_skips_a_busy_replica():
    """A 4xx is the request's fault: no other replica is asked and none is
    marked down. A 429 is a busy replica: the next one serves the turn,
    and the busy one stays in the pool."""
    from aiohttp import web

    async def refuse(request):
        # vLLM's words (vllm/renderers/params.py) for a prompt its context cannot hold.
        message = "This model's maximum context length is 2048 tokens. However, your request has 2134 input tokens."
        return web.json_response({"error": {"message": message, "type": "BadRequestError"}}, status=400)

    async def too_busy(request):
        return web.Response(status=429, headers={"Retry-After": "1"})

    async def answer(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_text_chunk("Hi.") + b"data: [DONE]\n\n")
        return response

    async with Upstream(refuse) as a, Upstream(refuse) as b:
        pool = RemotePool([RemoteEngine(u.url, model="m", system_prompt=None) for u in (a, b)], health_interval_s=60)
        await pool.start()
        with pytest.raises(PromptTooLong, match="HTTP 400: the prompt does not fit its context"):
            await _collect(pool, GenerationRequest("x", _messages("hi"), session_key="call-1"))
        assert a.calls + b.calls == 1 and all(r.healthy for r in pool.replicas)
        await pool.close()
    async with Upstream(too_busy) as busy, Upstream(answer) as free:
        replicas = [RemoteEngine(u.url, model="m", system_prompt=None) for u in (busy, free)]
        pool = RemotePool(replicas, health_interval_s=60)
        await pool.start()
        key = next(k for k in (f"call-{n}" for n in range(100)) if pool.order(k)[0] == 0)  # busy one first
        assert await _collect(pool, GenerationRequest("x", _messages("hi"), session_key=key)) == "Hi."
        assert busy.calls == 1 and all(r.healthy for r in pool.replicas)
        await pool.close()


async def test_a_pool_fails_over_a_replica_that_refuses_every_request():
    """401, 403, 404 are the replica's (a key it no longer takes, a model
    it does not serve after a rolling change), not the request's: they were
    refusals, so no other replica was asked, and every call whose hash
    landed there failed every turn. Now the next replica serves the turn
    and the refusing one is marked down."""
    from aiohttp import web

    async def answer(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_text_chunk("Hi.") + b"data: [DONE]\n\n")
        return response

    for status in (401, 403, 404):

        async def refuse_all(request, status=status):
            return web.json_response({"error": {"message": "no", "type": "invalid_request_error"}}, status=status)

        async with Upstream(refuse_all) as wrong, Upstream(answer) as right:
            replicas = [RemoteEngine(u.url, model="m", system_prompt=None) for u in (wrong, right)]
            pool = RemotePool(replicas, health_interval_s=60)
            await pool.start()
            key = next(k for k in (f"call-{n}" for n in range(100)) if pool.order(k)[0] == 0)
            assert await _collect(pool, GenerationRequest("x", _messages("hi"), session_key=key)) == "Hi.", status
            assert wrong.calls == 1 and not replicas[0].healthy and replicas[1].healthy, status
            await pool.close()


async def test_a_refused_continuation_fails_the_turn_at_once():
    """A reply cut mid-way is carried on with continue_final_message; a
    server that refuses that (OpenAI's own API answers 400 for a field it
    does not know; this upstream is its stand-in) refuses every retry too:
    the turn fails at once instead of being re-sent every 0.2 s for the
    whole wait (about 50 requests and 10 s of the caller's silence)."""
    from aiohttp import web

    from llm.continuation import stream_continuing

    async def cut_then_refuse(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("continue_final_message"):
            error = {"message": "Unrecognized request argument supplied: continue_final_message",
                     "type": "invalid_request_error"}  # fmt: skip
            return web.json_response({"error": error}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_text_chunk("Sure, I can"))
        request.transport.close()  # the server dies mid-reply
        return response

    async with Upstream(cut_then_refuse) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=16))
        said = []
        with pytest.raises(EngineError) as failed:
            async for delta in stream_continuing(engine, request, wait_s=5.0):
                said.append(delta)
        assert "".join(said) == "Sure, I can" and failed.value.refused, failed.value
        assert upstream.calls == 2, upstream.calls
        await engine.close()


async def test_what_a_server_says_stays_out_of_the_error_and_odd_model_lists_are_no_model(caplog):
    """An error chunk mid-reply may quote the caller: its words go to
    DEBUG and the error's detail, not its message (which is logged at
    WARNING/ERROR). A /v1/models answer of an odd shape is "lists no
    model", not a KeyError (which ended a pool's health loop). The upstream
    is a stand-in: no real server sends these on purpose."""
    from aiohttp import web

    async def error_mid_reply(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_text_chunk("Hello") + b'data: {"error": {"message": "bad input: my PIN is 4321"}}\n\n')
        return response

    async with Upstream(error_mid_reply) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        with caplog.at_level("INFO"), pytest.raises(EngineError, match="failed mid-reply") as failed:
            await _collect(engine, GenerationRequest("x", _messages("hi")))
        assert "4321" not in str(failed.value) and "4321" in failed.value.detail
        assert all("4321" not in r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)
        await engine.close()

    async def odd_models(request: web.Request) -> web.Response:
        return web.json_response({"data": ["m"]})

    async with Upstream(error_mid_reply, models=odd_models) as upstream:
        engine = RemoteEngine(upstream.url, system_prompt=None)
        with pytest.raises(EngineError, match="lists no model"):
            await engine.start()
        await engine.close()


async def test_a_stream_cut_before_any_text_is_sent_again():
    """A replica killed while the request queues or prefills has already
    sent its 200 (vLLM sends headers first): nothing was said, so the
    request is sent again, as a refused POST is (behind vllm-router the
    retry lands on a live replica). It failed the turn. The upstream is a
    stand-in for that dying replica."""
    from aiohttp import web

    async def die_then_answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if upstream.calls == 1:
            request.transport.close()  # killed before its first token
            return response
        await response.write(_text_chunk("Hi.") + b"data: [DONE]\n\n")
        return response

    async with Upstream(die_then_answer) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None, retry_before_text=True)
        assert await _collect(engine, GenerationRequest("x", _messages("hi"))) == "Hi."
        assert upstream.calls == 2 and engine.retries == 1
        await engine.close()


async def test_a_voice_server_starts_unready_while_its_llm_server_is_down():
    """A voice replica whose LLM server (a router restarting during a
    deploy) does not answer yet starts anyway, unready and refusing calls,
    and is ready once the server answers: it exited at start, and under a
    process manager crash-looped with the router."""
    from voice.server.app import VoiceServer
    from voice.server.config import ServerConfig

    port = free_port()
    llm = LLMConfig(engine="remote", remote_urls=[f"http://127.0.0.1:{port}/v1"], health_interval_s=0.2)
    srv = VoiceServer(ServerConfig(port=0, max_calls=2, llm=llm))
    await srv.start()
    late = None
    try:
        assert not srv.runtime.llm_available and not srv.ready
        # An LLM that never answered is refused at the door however young the
        # outage (the grace is for engines that were up); with the grace off
        # the door stays open and readiness still says no engine is up.
        assert srv.runtime.llm_refusal(10.0) == "no LLM engine has answered yet"
        admission = srv.registry.admission.config
        admission.llm_down_grace_s = None
        assert srv.runtime.llm_refusal(None) is None and not srv.ready
        admission.llm_down_grace_s = 10.0
        late = ServerProcess(port=port)
        await late.wait_healthy()
        for _ in range(100):
            if srv.runtime.llm_available:
                break
            await asyncio.sleep(0.1)
        assert srv.runtime.llm_available and srv.ready
        reply = await _collect(srv.runtime.engine, GenerationRequest("x", _messages("Hi"), max_tokens=8))
        assert reply.strip()
    finally:
        await srv.close()
        if late is not None:
            late.stop()
    # A server that refuses us (a wrong key: 401) is a configuration error,
    # not a server still starting: the replica does not start (its /health
    # would say 200 and make it ready for calls that all fail).
    from aiohttp import web

    async def unauthorized(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "Invalid API key"}}, status=401)

    async with Upstream(unauthorized, models=unauthorized) as upstream:
        llm = LLMConfig(engine="remote", remote_urls=[upstream.url + "/v1"])
        srv = VoiceServer(ServerConfig(port=0, max_calls=2, llm=llm))
        with pytest.raises(RequestRefused, match="HTTP 401"):
            await srv.start()
        await srv.close()


async def test_openai_server_bounds_the_requests_in_progress():
    """Past --max-requests in progress a request is answered 429 (OpenAI's
    rate-limit shape, Retry-After) before its body is read: each may carry
    4 MiB and waits in the engine's queue, which has no bound of its own.
    Once the earlier ones end, requests are answered again."""
    server = await ServerProcess("--max-requests", "2").wait_healthy()
    url = server.url + "/chat/completions"
    body = {"messages": _messages("Count from one to two hundred, in words."), "stream": True, "max_tokens": 400}
    try:
        async with aiohttp.ClientSession() as s:
            held = [await s.post(url, json=body) for _ in range(2)]
            for response in held:
                assert response.status == 200
                await response.content.readline()  # generating: in progress
            async with s.post(url, json=body) as third:
                refused = await third.json()
                assert third.status == 429 and third.headers["Retry-After"] == "1", refused
                assert refused["error"]["type"] == "rate_limit_exceeded"
            for response in held:
                response.close()  # a client that goes aborts its generation
            answered = None
            for _ in range(100):
                async with s.post(url, json={**body, "stream": False, "max_tokens": 4}) as r:
                    if r.status == 200:
                        answered = await r.json()
                        break
                await asyncio.sleep(0.1)
            assert answered is not None and answered["choices"][0]["message"]["content"]
    finally:
        server.stop()


def _raw_chunk(text: str) -> bytes:
    return b"data: " + text.encode() + b"\n\n"


@pytest.mark.parametrize(
    "chunk, error",
    [
        ('{"choices": [1]}', None),
        ('{"choices": "abc"}', "choices are not a list"),
        ('{"choices": [{"delta": {"content": 7}}]}', "content is not a string"),
        ('{"choices": [{"delta": "Hi"}], "usage": [1], "timings": "x"}', None),
        ("[" * 5000 + "]" * 5000, "malformed chunk"),
    ],
    ids=["choice-not-object", "choices-not-list", "content-not-string", "odd-usage", "deep-nesting"],
)
async def test_a_chunk_of_another_shape_is_an_engine_error_or_nothing(chunk, error):
    """Whatever shape a chunk has, the stream either reads no text from it
    or fails with an EngineError (which the pool, the supervisor and the
    carry-on handle), never an AttributeError, TypeError or RecursionError
    that they do not. The upstream is a stand-in: no real server sends these."""

    async def chat(request):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_text_chunk("Hello") + _raw_chunk(chunk) + _text_chunk(" there.") + b"data: [DONE]\n\n")
        return response

    async with Upstream(chat) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=8))
        if error is None:
            assert await _collect(engine, request) == "Hello there."
        else:
            with pytest.raises(EngineError, match=error):
                await _collect(engine, request)
        await engine.close()


async def test_a_servers_counts_are_believed_only_as_sane_whole_numbers():
    """Usage and timings counts feed process-wide counters (a negative one
    raised in Counter.inc, NaN or Infinity stayed there for good) and the
    call's token scale: each is a whole number in 0..MAX_COUNT, accepted
    drafts no more than drafts."""
    from llm.remote_engine import MAX_COUNT

    usage = {"prompt_tokens": -5, "completion_tokens": float("inf"), "prompt_tokens_details": {"cached_tokens": "9"}}
    timings = {"draft_n": 1e30, "draft_n_accepted": float("nan")}

    async def chat(request):
        from aiohttp import web

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        tail = json.dumps({"choices": [], "usage": usage, "timings": timings}).encode()
        await response.write(_text_chunk("Hi.") + b"data: " + tail + b"\n\ndata: [DONE]\n\n")
        return response

    async with Upstream(chat) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=8))
        assert await _collect(engine, request) == "Hi."
        u = request.usage
        assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (0, 0, 0)
        assert (u.draft_tokens, u.accepted_tokens) == (MAX_COUNT, 0)
        await engine.close()


async def test_a_server_that_ignores_max_tokens_is_cut_and_a_huge_answer_refused():
    """The stall timeout moves on with every piece of text, so a server
    that streams past max_tokens is cut by length (MAX_CHARS_PER_TOKEN
    per token asked for); a /v1/models answer over MAX_JSON_BYTES is an
    error, not read whole into the voice process's memory."""
    from aiohttp import web

    from llm.remote_engine import MAX_CHARS_PER_TOKEN, MAX_JSON_BYTES

    async def endless(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(100_000):
            await response.write(_text_chunk("word "))
        return response

    async def huge_models(request):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"data": [' + b'{"id": "m"},' * (MAX_JSON_BYTES // 8) + b'{"id": "m"}]}')
        return response

    async with Upstream(endless, models=huge_models) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=4))
        text = await asyncio.wait_for(_collect(engine, request), 30)
        assert 0 < len(text) <= 4 * MAX_CHARS_PER_TOKEN
        await engine.close()
        engine = RemoteEngine(upstream.url, system_prompt=None)
        with pytest.raises(EngineError, match="over"):
            await engine.start()
        await engine.close()


async def test_a_part_that_carries_a_reply_on_is_itself_carried_on_when_cut():
    """Every part of a reply after it stepped aside (llm/yielding.py) is a
    continue_final request; one cut mid-stream failed the turn (only the
    first part was carried on), so most of a stepping-aside reply had no
    protection. It is carried on from its own words, the assistant message
    grown, not a second one after it."""
    from aiohttp import web

    from llm.continuation import stream_continuing

    seen: list[list[dict]] = []

    async def cut_once(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body["messages"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if len(seen) == 1:
            await response.write(_text_chunk(" I can"))
            request.transport.close()  # the server dies mid-part
            return response
        await response.write(_text_chunk(" help.") + b"data: [DONE]\n\n")
        return response

    async with Upstream(cut_once) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        messages = [*_messages("hi"), {"role": "assistant", "content": "Sure,"}]
        request = GenerationRequest("x", messages, sampling=SamplingParams(max_tokens=16), continue_final=True)
        text = "".join([d async for d in stream_continuing(engine, request, wait_s=5.0)])
        assert text == " I can help." and request.usage.continuations == 1
        assert seen[1] == [*_messages("hi"), {"role": "assistant", "content": "Sure, I can"}], seen[1]
        await engine.close()


async def test_a_part_after_a_yield_waits_for_an_engine_down_when_it_starts():
    """A reply stepped aside (llm/yielding.py) and the engine went down
    meanwhile (a child restarting): the next part failed before its first
    word and the turn with it, though the caller had heard the first
    sentence (silence, and no failure line: the reply had begun). It is
    carried on once the engine answers. The upstream is a stand-in for the
    engine that is down, then back."""
    from aiohttp import web

    from llm.continuation import stream_continuing

    async def down_then_back(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if upstream.calls == 1:
            request.transport.close()  # gone before the part's first token
            return response
        await response.write(_text_chunk(" help.") + b"data: [DONE]\n\n")
        return response

    async with Upstream(down_then_back) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        messages = [*_messages("hi"), {"role": "assistant", "content": "Sure, I can"}]
        part = GenerationRequest("x-y1", messages, sampling=SamplingParams(max_tokens=16), continue_final=True)
        text = "".join([d async for d in stream_continuing(engine, part, wait_s=5.0)])
        assert text == " help." and part.usage.continuations == 1 and upstream.calls == 2
        await engine.close()

    # A server that refuses every request (401: a key it no longer takes)
    # is not waited for: the part fails at once.
    async def refuses(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "bad key"}}, status=401)

    async with Upstream(refuses) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        part = GenerationRequest("x-y2", messages, sampling=SamplingParams(max_tokens=16), continue_final=True)
        with pytest.raises(EngineError):
            _ = [d async for d in stream_continuing(engine, part, wait_s=5.0)]
        assert upstream.calls == 1 and part.usage.continuations == 0
        await engine.close()


async def test_a_reply_the_engine_aborted_is_carried_on_not_taken_as_done():
    """vLLM ends a reply it drops (a pause, a shutdown, a scale-down behind
    the router) with 200, finish_reason "abort" and [DONE]: it was read as
    a reply that ended, cut mid-sentence with no carry-on. The upstream is
    a stand-in that sends what vLLM sends then."""
    from aiohttp import web

    from llm.continuation import stream_continuing

    seen: list[list[dict]] = []

    async def abort_once(request: web.Request) -> web.StreamResponse:
        seen.append((await request.json())["messages"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if len(seen) == 1:
            aborted = {"choices": [{"delta": {"content": " I"}, "finish_reason": "abort"}]}
            await response.write(_text_chunk("Sure,") + b"data: " + json.dumps(aborted).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            return response
        await response.write(_text_chunk(" can help.") + b"data: [DONE]\n\n")
        return response

    async with Upstream(abort_once) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None)
        request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=16))
        text = "".join([d async for d in stream_continuing(engine, request, wait_s=5.0)])
        assert text == "Sure, I can help." and request.usage.continuations == 1, text
        assert seen[1][-1] == {"role": "assistant", "content": "Sure, I"}, seen[1]
        await engine.close()

    # Aborted before its first word: nothing was said, so it is sent again
    # (behind vllm-router the retry lands on a live replica), as a stream
    # cut before any text is.
    async def abort_first(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if upstream.calls == 1:
            aborted = {"choices": [{"delta": {}, "finish_reason": "abort"}]}
            await response.write(b"data: " + json.dumps(aborted).encode() + b"\n\ndata: [DONE]\n\n")
            return response
        await response.write(_text_chunk("Hi.") + b"data: [DONE]\n\n")
        return response

    async with Upstream(abort_first) as upstream:
        engine = RemoteEngine(upstream.url, model="m", system_prompt=None, retry_before_text=True)
        assert await _collect(engine, GenerationRequest("x", _messages("hi"))) == "Hi."
        assert upstream.calls == 2 and engine.retries == 1
        await engine.close()


def test_a_continuation_gets_the_tokens_left_by_the_engines_count():
    """A cut reply is carried on with what is left of max_tokens: counted
    by the engine where it said (speculative decoding streams several
    tokens a piece), by the pieces otherwise."""
    from llm.base import Usage
    from llm.continuation import continuation_of

    request = GenerationRequest("x", _messages("hi"), sampling=SamplingParams(max_tokens=60))
    assert continuation_of(request, "Sure,", 10, 1).sampling.max_tokens == 50  # pieces: about a token each
    request.usage = Usage(completion_tokens=45)  # the engine's count: 4.5 tokens a piece
    assert continuation_of(request, "Sure,", 10, 1).sampling.max_tokens == 15
    request.usage = Usage(completion_tokens=90)
    assert continuation_of(request, "Sure,", 10, 1).sampling.max_tokens == 1  # never none: the request must be valid


def test_messages_the_engine_refuses_are_a_400_from_its_server() -> None:
    """llama.cpp says 4xx about a request its chat template refuses (two user
    messages in a row under a template that wants them to alternate, as a
    Realtime client's items can make): that was a plain engine failure, so
    the engine server answered 500 and its client marked it down (a pool
    then tried every replica and readiness went with them). A 4xx from the
    engine is the request's: a 400, which no client marks a server down for.
    (The engine's own refusal cannot be had from the embedded model's
    template, which takes any order: its chunk is given here.)"""
    from llm.llamacpp_engine import LlamaCppEngine
    from llm.openai_server import _failed

    request = GenerationRequest("x", _messages("hi"))
    refusal = {"error": {"code": 400, "message": "Conversation roles must alternate", "type": "invalid_request_error"}}
    with pytest.raises(EngineError) as refused:
        LlamaCppEngine._absorb(refusal, request)
    assert refused.value.refused and _failed(refused.value, "chat completion").status == 400
    failure = {"error": {"code": 500, "message": "slot failed", "type": "server_error"}}
    with pytest.raises(EngineError) as failed:
        LlamaCppEngine._absorb(failure, request)
    assert not failed.value.refused and _failed(failed.value, "chat completion").status == 500


async def test_an_engine_with_work_and_no_progress_says_so_on_health():
    """/health said 200 while the engine had work and gave nothing (a hung
    CUDA kernel, deadlocked slot threads: the server's loop still answers),
    so a supervisor never restarted it and a balancer kept sending it calls.
    Past --stuck-after-s of waiting on the engine it says 503 "engine
    stuck". A long prompt pass on one thread stands in for a stuck engine
    here, with the bound set far below it (the default is 20 s)."""
    server = await ServerProcess("--stuck-after-s", "0.3", "--threads", "1", "--parallel", "1").wait_healthy()
    try:
        engine = RemoteEngine(server.url, system_prompt=None, first_token_timeout_s=60.0)
        long = "I would like to talk about my account and the bill I got. " * 40
        request = GenerationRequest("long", _messages(long), sampling=SamplingParams(max_tokens=4))
        answer = asyncio.ensure_future(_collect(engine, request))
        said: list[tuple[int, str]] = []
        async with aiohttp.ClientSession() as s:
            while not answer.done():
                async with s.get(server.root + "/health") as r:
                    said.append((r.status, (await r.json()).get("status")))
                await asyncio.sleep(0.05)
            await answer
            async with s.get(server.root + "/health") as r:
                assert r.status == 200  # done: nothing waits on the engine
        assert (503, "engine stuck") in said, said
        assert said[0] == (200, "ok"), said  # the clock starts with the work
        await engine.close()
    finally:
        server.stop()


async def test_an_engine_its_clients_gave_up_on_is_probed_and_said_stuck():
    """A wedged engine's clients give up at their first-token timeout and
    close their requests; with nothing waiting any more, /health said 200
    for good and the supervisor never restarted it. A wait that gave up
    without a word makes /health send the engine a one-token probe, whose
    wait the clock sees: 503 "engine stuck" while the engine gives nothing,
    200 once it answers. (A long prompt pass on one thread stands in for
    the wedge; the client gives up long before it ends.)"""
    server = await ServerProcess("--stuck-after-s", "0.3", "--threads", "1", "--parallel", "1").wait_healthy()
    try:
        engine = RemoteEngine(server.url, system_prompt=None, first_token_timeout_s=0.4)
        long = "I would like to talk about my account and the bill I got. " * 80
        request = GenerationRequest("long", _messages(long), sampling=SamplingParams(max_tokens=4))
        with pytest.raises(EngineError):
            await _collect(engine, request)  # gave up: nothing waits on the engine now
        said: list[tuple[int, str]] = []
        async with aiohttp.ClientSession() as s:
            for _ in range(400):
                async with s.get(server.root + "/health") as r:
                    said.append((r.status, (await r.json()).get("status")))
                if (503, "engine stuck") in said and said[-1][0] == 200:
                    break
                await asyncio.sleep(0.05)
        assert (503, "engine stuck") in said, said
        assert said[-1] == (200, "ok"), said  # the pass ended, the probe was answered
        await engine.close()
    finally:
        server.stop()


@pytest.mark.parametrize("replicas", ["1", "2"])
async def test_a_reply_cut_by_a_full_context_finishes_for_length(replicas):
    """A reply that filled the context (fewer tokens than its max_tokens)
    said finish_reason "stop", which an OpenAI client reads as whole; so
    did every reply of an engine with copies (the CPU default), whose
    replica set had no config to read the context from."""
    server = await ServerProcess("--context-tokens", "256", "--parallel", "1", "--replicas", replicas).wait_healthy()
    try:
        long = "I would like to talk about my account and the bill I got. " * 13
        body = {"model": "x", "messages": [{"role": "user", "content": long + " Tell me a long story."}],
                "max_tokens": 200, "temperature": 0}  # fmt: skip
        async with aiohttp.ClientSession() as s, s.post(server.url + "/chat/completions", json=body) as r:
            answer = await r.json()
        usage = answer["usage"]
        assert usage["total_tokens"] == 256 and usage["completion_tokens"] < 200, usage
        assert answer["choices"][0]["finish_reason"] == "length", answer
    finally:
        server.stop()
