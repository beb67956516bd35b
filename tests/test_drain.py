"""Graceful drain: `firstline serve` as a real process gets SIGTERM mid-call.

Readiness goes 503 at once, new calls are refused, the live call still gets
its reply; a call still open when the drain ends (deadline, or a second
signal) is told why and closed with 1001; the process then exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import time

from benchmarks.client import NativeCaller
from tests.conftest import with_silence
from tests.http_get import http_json
from voice.server.app import VoiceServer
from voice.server.config import ServerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_ready(port: int, proc: asyncio.subprocess.Process, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.returncode is None, "server exited during startup"
        try:
            status, _ = await http_json(port, "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("server never became ready")


async def test_sigterm_drains_then_exits_zero(phone_prompts) -> None:
    port = _free_port()
    # Long enough that the turn finishes even on a loaded CI box; the test
    # ends the drain early with a second SIGTERM instead of waiting it out.
    drain_s = 60.0
    cmd = [sys.executable, "-m", "voice.server.cli", "serve", "--port", str(port), "--drain-timeout-s", str(drain_s)]
    # Logs to a file, not a pipe: a pipe nobody reads would block the server.
    log = tempfile.TemporaryFile()
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL, stderr=log, env={**os.environ})
    try:
        await _wait_ready(port, proc)
        url = f"ws://127.0.0.1:{port}/v1/call"
        async with NativeCaller(url) as caller:
            await caller.start("mulaw", 8000)
            audio = with_silence(phone_prompts[4].load(8000), 8000, 1.0)
            await caller.play(audio, 8000, "mulaw", realtime=True, speed=4.0)
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # mid-turn: the reply is not out yet
            assert not caller.result.of("response.done"), "the turn was over before the drain: nothing tested"
            await asyncio.sleep(0.2)
            status, body = await http_json(port, "/readyz")
            assert status == 503 and body["draining"] is True
            status, body = await http_json(port, "/v1/call", upgrade=True)
            assert status == 503 and body["reason"] == "draining"
            # The live call finishes its turn during the drain...
            done = await caller.wait_for("response.done", timeout=30)
            assert done["text"] and not done["cancelled"]
            # ...and stays up while the drain waits for it.
            await asyncio.sleep(0.5)
            assert caller.ws is not None and caller.ws.close_code is None
            assert (await http_json(port, "/readyz"))[0] == 503
            assert time.monotonic() - t_term < drain_s
            # A second signal ends the drain now: the call is told why, then 1001.
            proc.send_signal(signal.SIGTERM)
            ended = await caller.wait_for("call.ended", timeout=10)
            assert ended["reason"] == "server_shutdown"
            await asyncio.wait_for(caller.ws.wait_closed(), 5)
            assert caller.ws.close_code == 1001 and caller.ws.close_reason == "server shutting down"
        rc = await asyncio.wait_for(proc.wait(), 30)
        log.seek(0)
        assert rc == 0, log.read().decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def test_drain_deadline_ends_open_calls_with_1001(server: VoiceServer) -> None:
    """In process, on the warm models: a call still open at the deadline."""
    srv = VoiceServer(ServerConfig(port=0), runtime=server.runtime)
    await srv.start()
    try:
        async with NativeCaller(f"ws://127.0.0.1:{srv.port}/v1/call") as caller:
            await caller.start("pcm16", 16000)
            t0 = time.monotonic()
            await srv.drain(deadline_s=1.0)
            took = time.monotonic() - t0
            assert 0.9 <= took <= 4.0, took
            ended = await caller.wait_for("call.ended", timeout=5)
            assert ended["reason"] == "server_shutdown"
            assert caller.ws is not None
            await asyncio.wait_for(caller.ws.wait_closed(), 5)
            assert caller.ws.close_code == 1001
            assert not srv.ready and (await http_json(srv.port, "/readyz"))[0] == 503
    finally:
        await srv.close()
