"""The LLM engine dies mid-call (SIGKILL of its process); the call does not.

Real calls over the native websocket protocol, real speech, real models: the
voice server runs its llama.cpp engine out of process under the supervisor
(``--engine-isolation process``); a second ``python -m llm.openai_server``
is the secondary engine where one is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import time

import pytest
import pytest_asyncio
from websockets.exceptions import InvalidStatus

from benchmarks.client import NativeCaller
from llm.base import EngineError, EngineUnavailable, GenerationRequest
from llm.config import LLMConfig
from llm.supervisor import SupervisedEngine
from tests.conftest import with_silence
from tests.openai_servers import ServerProcess
from voice.server.app import VoiceServer
from voice.server.config import ServerConfig

STORY = "You are a storyteller. Always answer with a long story of many short sentences."


async def _voice_server(llm: LLMConfig) -> VoiceServer:
    srv = VoiceServer(ServerConfig(port=0, max_calls=4, llm=llm))
    await srv.start()
    return srv


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secondary() -> ServerProcess:
    server = ServerProcess()
    yield await server.wait_healthy()
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def supervised_server() -> VoiceServer:
    srv = await _voice_server(LLMConfig(isolation="process", restart_backoff_s=0.2))
    yield srv
    await srv.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def failover_server(secondary: ServerProcess) -> VoiceServer:
    llm = LLMConfig(isolation="process", secondary_urls=[secondary.url], restart_backoff_s=0.2, health_interval_s=0.5)
    srv = await _voice_server(llm)
    yield srv
    await srv.close()


async def _say(caller: NativeCaller, clip, tail_s: float = 1.3) -> None:
    await caller.play(with_silence(clip.load(8000), 8000, 1.0 * tail_s), 8000, "mulaw", realtime=False)


def _events(caller: NativeCaller) -> list[dict]:
    deltas = len(caller.result.of("response.delta"))
    kept = [r.event for r in caller.result.events if r.event["type"] not in ("response.delta", "transcript.partial")]
    return [*kept, {"response.delta events": deltas}]


def _restarts_metric(server: VoiceServer) -> float:
    for line in server.runtime.metrics.render().decode().splitlines():
        if line.startswith("firstline_engine_restarts_total "):
            return float(line.split()[1])
    raise AssertionError("firstline_engine_restarts_total not exported")


async def test_engine_killed_mid_reply_the_reply_goes_on_on_the_restarted_engine(supervised_server, phone_prompts):
    srv = supervised_server
    engine = srv.runtime.engine
    assert isinstance(engine, SupervisedEngine) and engine.primary_up
    url = f"ws://127.0.0.1:{srv.port}/v1/call"
    async with NativeCaller(url) as caller:
        ready = await caller.start("mulaw", 8000, system_prompt=STORY, options={"max_tokens": 160})
        assert ready["engine"]["isolation"] == "process"
        await _say(caller, phone_prompts[3])
        await caller.wait_for("response.delta", turn=1, timeout=60)
        pid = engine.pid
        os.kill(pid, signal.SIGKILL)  # the engine process dies mid-reply
        said_before = "".join(e["text"] for e in caller.result.of("response.delta"))
        # The restarted engine carries the reply on from what was said
        # (llm/continuation.py): no error, the turn is not lost.
        done = await caller.wait_for("response.done", turn=1, timeout=60)
        assert not done["cancelled"] and done["usage"]["continuations"] == 1, done
        assert not caller.result.of("error"), caller.result.of("error")
        reply = "".join(e["text"] for e in caller.result.of("response.delta"))
        assert reply.startswith(said_before) and len(reply) > len(said_before) + 10, (said_before, reply)
        sentences = [e["text"] for e in caller.result.of("response.sentence")]
        assert len(sentences) == len(set(sentences)), f"a sentence said twice: {sentences}"
        # The supervisor brought the engine back by itself, and counted it.
        await engine.wait_up(60)
        assert engine.pid != pid and engine.restarts == 1 and engine.crashes == 1
        assert _restarts_metric(srv) == 1.0
        # Same call, next turn: answered by the restarted engine.
        await _say(caller, phone_prompts[10])
        try:
            done2 = await caller.wait_for("response.done", turn=2, timeout=60)
        except TimeoutError:
            raise AssertionError(f"turn 2 never finished; events: {_events(caller)}") from None
        assert done2["text"] and not done2["cancelled"], done2
        assert not caller.result.of("error")
        assert caller.ws is not None and caller.ws.state.name == "OPEN"


async def test_without_secondary_a_turn_while_down_fails_fast_and_readiness_says_so(supervised_server, monkeypatch):
    srv = supervised_server
    engine = srv.runtime.engine
    await engine.wait_up(60)
    restarts = engine.restarts
    os.kill(engine.pid, signal.SIGKILL)
    # The watcher sees the exit when the child's SIGCHLD is handled: tens of
    # ms on a quiet machine, more on a busy CI box (a fixed 50 ms failed there).
    for _ in range(200):
        if not srv.runtime.llm_available:
            break
        await asyncio.sleep(0.01)
    # Within the admission grace the replica stays ready: a load balancer
    # that dropped it at the first failed request took a tier sharing one
    # LLM router out all at once, for an outage its calls ride out.
    assert not srv.runtime.llm_available and srv.ready
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="restarting"):
        async for _ in engine.stream(GenerationRequest("x", [{"role": "user", "content": "Hi"}], 8)):
            pass
    assert time.monotonic() - started < 1.5  # at once, not after the ~2.5 s restart
    # A new call while no engine has answered for longer than the grace is
    # refused at the door (the restart takes ~2.5 s; the grace is cut to
    # 0.3 s here so the refusal falls inside it).
    monkeypatch.setattr(srv.registry.admission.config, "llm_down_grace_s", 0.3)
    while srv.runtime.llm_down_s() <= 0.3:
        assert not srv.runtime.llm_available, "the engine came back before the grace ran out"
        await asyncio.sleep(0.02)
    assert not srv.ready  # past the grace: readiness and the door agree
    url = f"ws://127.0.0.1:{srv.port}/v1/call"
    with pytest.raises(InvalidStatus) as refused:
        async with NativeCaller(url):
            pass
    assert refused.value.response.status_code == 503
    assert json.loads(refused.value.response.body)["reason"] == "llm_unavailable"
    await engine.wait_up(60)
    assert srv.ready and engine.restarts == restarts + 1
    async with NativeCaller(url) as caller:  # the engine is back: calls are admitted again
        assert (await caller.start("mulaw", 8000))["type"] == "ready"


async def test_secondary_serves_while_the_primary_restarts(failover_server, phone_prompts):
    srv = failover_server
    engine = srv.runtime.engine
    assert isinstance(engine, SupervisedEngine) and engine.secondary is not None
    url = f"ws://127.0.0.1:{srv.port}/v1/call"
    async with NativeCaller(url) as caller:
        await caller.start("mulaw", 8000, options={"max_tokens": 32})  # short replies: this machine may be busy
        await _say(caller, phone_prompts[5])
        try:
            done1 = await caller.wait_for("response.done", turn=1, timeout=60)
        except TimeoutError:
            raise AssertionError(f"turn 1 never finished; events: {_events(caller)}") from None
        assert done1["text"] and engine.secondary_requests == 0
        # The primary dies between turns and restarts slowly: the next turn is
        # answered by the secondary, with no error.
        engine.next_restart_delay_s = 600.0  # held down until restart_now() below
        engine.kill_child()
        await _say(caller, phone_prompts[12])
        done2 = await caller.wait_for("response.done", turn=2, timeout=60)
        assert done2["text"] and not done2["cancelled"], done2
        assert engine.secondary_requests >= 1 and not caller.result.of("error")
        assert srv.ready  # a turn has an engine to go to
        # Back on the primary once it is up again.
        engine.restart_now()
        await engine.wait_up(60)
        served_by_secondary = engine.secondary_requests
        await _say(caller, phone_prompts[20])
        done3 = await caller.wait_for("response.done", turn=3, timeout=60)
        assert done3["text"] and engine.secondary_requests == served_by_secondary


async def test_primary_killed_before_first_token_is_retried_on_the_secondary(failover_server):
    engine = failover_server.runtime.engine
    await engine.wait_up(60)
    engine.next_restart_delay_s = 0.2
    # Killed, but the watcher has not run yet: the request still goes to the
    # primary, fails to connect, and is retried on the secondary.
    os.kill(engine.pid, signal.SIGKILL)
    served_before = engine.secondary_requests
    request = GenerationRequest("r", [{"role": "user", "content": "Say hello."}], 12, session_key="k")
    text = "".join([d async for d in engine.stream(request)])
    assert text.strip() and request.usage.completion_tokens > 0
    assert engine.secondary_requests == served_before + 1, "not answered by the secondary"
    await engine.wait_up(60)


async def test_a_secondary_that_cannot_score_sentence_ends_does_not_turn_the_probe_off(failover_server, monkeypatch):
    """While the primary restarts, sentence-end probes go to the secondary;
    one that cannot score them (a plain vLLM server: 404) said so as
    SentenceEndUnsupported, and every call stopped asking for good (the
    runtime remembers it), though the primary can once it is back. It is
    a passing failure now; the primary answers again after its restart."""
    from llm.base import EngineError, SentenceEndUnsupported

    engine = failover_server.runtime.engine
    await engine.wait_up(60)
    messages = [{"role": "user", "content": "My account number is"}]
    assert 0.0 <= await engine.sentence_end_probability(messages, "k") <= 1.0
    replicas = getattr(engine.secondary, "replicas", [engine.secondary])
    for replica in replicas:  # what a server without the route is remembered as (remote_engine.py)
        monkeypatch.setattr(replica, "_scores_sentence_end", False)
    engine.next_restart_delay_s = 600.0
    engine.kill_child()
    async with asyncio.timeout(10):
        while engine.primary_up:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    with pytest.raises(EngineError) as failed:
        await engine.sentence_end_probability(messages, "k")
    assert not isinstance(failed.value, SentenceEndUnsupported), failed.value
    engine.restart_now()
    await engine.wait_up(60)
    assert 0.0 <= await engine.sentence_end_probability(messages, "k") <= 1.0


async def test_a_restart_that_cannot_fork_is_tried_again(supervised_server, monkeypatch):
    """The first restart after a crash fails in the OS (EAGAIN from the
    fork, as right after an OOM kill; injected here, as no test can make
    the kernel refuse on cue): the watcher tries again instead of dying
    with it, which left the LLM down for good."""
    import llm.supervisor

    srv = supervised_server
    engine = srv.runtime.engine
    await engine.wait_up(60)
    restarts = engine.restarts
    real_exec = asyncio.create_subprocess_exec
    refusals = []

    async def refuse_once(*args, **kwargs):
        if not refusals and "llm.openai_server" in args:  # the engine's start only, not another spawn
            refusals.append(args[0])
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return await real_exec(*args, **kwargs)

    # A session of its own: a signal to the server's process group (Ctrl-C)
    # does not reach the engine the draining calls still need.
    assert os.getpgid(engine.pid) != os.getpgid(0)
    monkeypatch.setattr(llm.supervisor.asyncio, "create_subprocess_exec", refuse_once)
    os.kill(engine.pid, signal.SIGKILL)
    for _ in range(500):  # until the watcher has seen the exit
        if not engine.primary_up:
            break
        await asyncio.sleep(0.01)
    await engine.wait_up(60)
    assert refusals and engine.restarts == restarts + 2 and srv.runtime.llm_available


async def test_a_child_that_is_alive_but_hung_is_killed_and_restarted(supervised_server, monkeypatch):
    """SIGSTOP stands for a child that is alive and answers nothing (a
    deadlocked loop, a stuck driver): the watcher only waited for it to
    exit, so every turn waited out the first-token timeout and failed while
    readiness said all was well. Its /health misses now kill it."""
    engine = supervised_server.runtime.engine
    await engine.wait_up(60)
    restarts, crashes, pid = engine.restarts, engine.crashes, engine.pid
    monkeypatch.setattr(engine.config, "child_health_interval_s", 0.3)
    monkeypatch.setattr(engine.config, "child_health_misses", 2)
    await asyncio.sleep(2.5)  # the watcher's current wait (the default 2 s) ends: it asks every 0.3 s now
    assert engine.pid == pid and engine.crashes == crashes  # a healthy child is left alone
    # One exit waiter per child, however often it is asked: a waiter per
    # check stayed pending until the child exited (the leak test of the
    # carriers' hang-ups found hundreds).
    waiting = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "Process.wait"]
    assert len(waiting) <= 3, len(waiting)
    os.kill(pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(60):
            while engine.restarts == restarts or not engine.primary_up:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert engine.pid != pid and engine.crashes == crashes + 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left stopped
    reply = ""
    async for delta in engine.stream(GenerationRequest("x", [{"role": "user", "content": "Hi"}], 8)):
        reply += delta
    assert reply.strip()


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _restarted(engine, restarts: int) -> None:
    """Until the supervisor has started a child after ``restarts`` and it is up."""
    async with asyncio.timeout(120):
        while engine.restarts == restarts or not engine.primary_up:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def _killed_and_restarted(engine) -> None:
    restarts = engine.restarts
    engine.kill_child()
    await _restarted(engine, restarts)


async def test_what_a_killed_child_started_goes_with_it(supervised_server, monkeypatch, tmp_path):
    """vLLM's engine core and workers are processes the child starts; a
    SIGKILLed child left them running (and holding GPU memory, so every
    restart after failed). A `sleep` the child starts stands in for them
    here (vLLM's own, on this machine, takes a minute to start): once the
    child is killed and restarted, nothing of it is left running."""
    engine = supervised_server.runtime.engine
    await engine.wait_up(60)
    pidfile = tmp_path / "grandchild.pid"
    real_command = engine.command

    def with_a_grandchild(port: int, listen_fd: int | None = None) -> list[str]:
        # The shell starts the stand-in, then becomes the engine (exec): the
        # stand-in is the engine's child, in its process group.
        command = real_command(port, listen_fd)
        return ["/bin/sh", "-c", f'sleep 600 & echo $! > {pidfile}; exec "$@"', "sh", *command]

    monkeypatch.setattr(engine, "command", with_a_grandchild)
    await _killed_and_restarted(engine)
    grandchild = int(pidfile.read_text())
    assert _running(grandchild) and os.getpgid(grandchild) == engine.pid
    monkeypatch.setattr(engine, "command", real_command)
    await _killed_and_restarted(engine)
    for _ in range(100):  # its reaper (init) may take a moment
        if not _running(grandchild):
            break
        await asyncio.sleep(0.05)
    assert not _running(grandchild), "the killed child's own child still runs"


async def test_a_process_that_takes_the_childs_port_gets_nothing(supervised_server):
    """Between a child's death and its successor's start, anything on the
    host could bind the port the child had: the child bound it itself, late
    (after its imports), and the supervisor's health checks, which carry the
    engine key, went to whatever answered there. The supervisor now binds
    the socket and hands it over, on another port when that one is taken."""
    from aiohttp import web

    engine = supervised_server.runtime.engine
    await engine.wait_up(60)
    port = int(engine.base_url.rsplit(":", 1)[1].split("/")[0])
    asked: list[tuple[str, str | None]] = []

    async def impostor(request: web.Request) -> web.Response:
        asked.append((request.path, request.headers.get("Authorization")))
        return web.json_response({"status": "ok", "data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", impostor)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    restarts = engine.restarts
    engine.kill_child()
    try:
        for _ in range(100):  # the port is free once the killed child is gone
            try:
                site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
                await site.start()
                break
            except OSError:
                await asyncio.sleep(0.02)
        else:
            raise AssertionError("the killed child's port never came free")
        await _restarted(engine, restarts)
        assert not asked, asked
        assert not engine.base_url.endswith(f":{port}/v1")
        reply = ""
        async for delta in engine.stream(GenerationRequest("x", [{"role": "user", "content": "Hi"}], 8)):
            reply += delta
        assert reply.strip()
    finally:
        await runner.cleanup()


def test_the_child_serves_its_one_client_without_a_request_bound() -> None:
    """The standalone server answers 429 past 256 requests in progress; the
    supervised child's one client is the voice server, whose calls
    admission bounds, so a replica with a hundred calls up (a stream, a
    sentence-end probe and a preemptive reply each) gets no 429s from it,
    nor from the per-address connection cap (twice 256 by default: all of
    its connections come from 127.0.0.1)."""
    from llm.openai_server import build_parser

    command = SupervisedEngine(LLMConfig(isolation="process")).command(8123)
    args = build_parser().parse_args(command[command.index("llm.openai_server") + 1 :])
    assert args.max_requests == 0 and build_parser().parse_args([]).max_requests == 256
    assert args.max_connections_per_peer == 0, args


@pytest.mark.parametrize(
    ("method", "says"),
    [("suffix", "does not support speculation method 'suffix'"), ("eagle3", "needs speculation.draft_model")],
)
def test_speculation_llamacpp_cannot_run_is_refused_in_the_voice_server(method: str, says: str) -> None:
    """The child would exit while starting, and the parent said only that
    (its status); the reason is the voice server's own error now, before a
    child is spawned or a model loaded."""
    from llm.config import SpeculationConfig

    config = LLMConfig(isolation="process", speculation=SpeculationConfig(method=method))
    with pytest.raises(EngineError, match=re.escape(says)):
        SupervisedEngine(config)


async def test_a_secondary_down_at_start_is_watched_until_it_answers() -> None:
    """A secondary that was not up when the server started counted as down
    until one of its own requests got through, and none is sent to a server
    counted as down: a primary that failed later left the fallback unused
    and every new call refused. It is watched from the start now."""
    from llm.engines import build_engine
    from tests.openai_servers import free_port

    port = free_port()
    config = LLMConfig(isolation="process", secondary_urls=[f"http://127.0.0.1:{port}/v1"], health_interval_s=0.2)
    engine = build_engine(config)
    assert isinstance(engine, SupervisedEngine)
    await engine.start()
    later = ServerProcess(port=port)
    try:
        assert engine.secondary is not None and not engine.secondary.available
        await later.wait_healthy()
        for _ in range(150):
            if engine.secondary.available:
                break
            await asyncio.sleep(0.1)
        assert engine.secondary.available, "the secondary answered /health and is still counted as down"
    finally:
        later.stop()
        await engine.close()
