"""The supervised engine child (llm/openai_server.py under llm/supervisor.py)
listens on loopback and answers /v1 only to the supervisor's random
per-process key, which travels by environment, not argv."""

from __future__ import annotations

import aiohttp
import pytest

from llm.base import EngineError, GenerationRequest
from llm.config import LLMConfig
from llm.supervisor import SupervisedEngine


async def test_the_engine_child_answers_only_the_supervisors_key() -> None:
    engine = SupervisedEngine(LLMConfig(isolation="process"))
    other = SupervisedEngine(LLMConfig(isolation="process"))
    assert engine._key and engine._key != other._key  # random per supervisor
    assert not any(engine._key in part for part in engine.command(1234))  # not in `ps`
    await engine.start()
    try:
        url = engine.base_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/models") as r:
                assert r.status == 401
                assert (await r.json())["error"]["type"] == "authentication_error"
            async with s.post(url + "/chat/completions", json=body, headers={"Authorization": "Bearer guess"}) as r:
                assert r.status == 401
            async with s.get(url.removesuffix("/v1") + "/health") as r:
                assert r.status == 200  # a liveness probe needs no key and learns nothing else
                assert await r.json() == {"status": "ok"}
            bad = {"Authorization": "Bearer caf\u00e9"}  # not ASCII: still a plain 401, not a crash
            async with s.get(url + "/models", headers=bad) as r:
                assert r.status == 401
            async with s.get(url + "/models", headers={"Authorization": f"Bearer {engine._key}"}) as r:
                assert r.status == 200
        # The supervisor's own client sends the key: replies flow.
        request = GenerationRequest("key", [{"role": "user", "content": "Say hi."}], 8)
        text = "".join([delta async for delta in engine.stream(request)])
        assert text.strip()
    finally:
        await engine.close()


def test_a_standalone_engine_server_open_beyond_loopback_without_a_key_is_refused() -> None:
    """`python -m llm.openai_server --host 0.0.0.0` with no key served anyone
    who reached the port (the voice server refuses the same at start). It
    exits with the reason before loading any model; a key, --no-auth or a
    loopback host starts it."""
    import os
    import subprocess
    import sys

    from llm.openai_server import ENGINE_KEY_ENV, open_to_all

    env = {k: v for k, v in os.environ.items() if k != ENGINE_KEY_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "llm.openai_server", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and f"{ENGINE_KEY_ENV} is not set" in done.stderr, done.stderr
    assert open_to_all("10.0.0.5", keyed=False, no_auth=False) is not None
    assert open_to_all("", keyed=False, no_auth=False) is not None  # every address
    assert open_to_all("10.0.0.5", keyed=True, no_auth=False) is None
    assert open_to_all("10.0.0.5", keyed=False, no_auth=True) is None
    assert open_to_all("127.0.0.1", keyed=False, no_auth=False) is None
    assert open_to_all("::1", keyed=False, no_auth=False) is None
    assert open_to_all("localhost", keyed=False, no_auth=False) is None


async def test_a_keyed_standalone_engine_server_answers_firstlines_remote_engine(monkeypatch) -> None:
    """A standalone engine server with FIRSTLINE_ENGINE_KEY (as one beyond
    loopback must have): `firstline serve --engine remote` sends the key
    from FIRSTLINE_REMOTE_API_KEY; without it every request is refused 401,
    a misconfiguration said as such (a voice replica does not start on it)."""
    from llm.openai_server import ENGINE_KEY_ENV
    from llm.remote_engine import REMOTE_KEY_ENV, RemoteEngine
    from tests.openai_servers import ServerProcess

    monkeypatch.setenv(ENGINE_KEY_ENV, "k-3f9a")  # the child inherits it (and pops it from its own env)
    server = ServerProcess("--max-connections-per-peer", "6")
    monkeypatch.delenv(ENGINE_KEY_ENV)
    try:
        await server.wait_healthy()
        request = GenerationRequest("key", [{"role": "user", "content": "Say hi."}], 8)
        monkeypatch.setenv(REMOTE_KEY_ENV, "k-3f9a")
        keyed = RemoteEngine.from_config(server.url, LLMConfig(engine="remote"))
        monkeypatch.delenv(REMOTE_KEY_ENV)
        unkeyed = RemoteEngine.from_config(server.url, LLMConfig(engine="remote"))
        try:
            assert "".join([delta async for delta in keyed.stream(request)]).strip()
            with pytest.raises(EngineError, match="answered HTTP 401"):  # asking for the model name first
                _ = [delta async for delta in unkeyed.stream(request)]
            await keyed.close()
            await unkeyed.close()  # their pools' sockets: gone before the count below
            await peer_without_the_key_holds_nothing(server.port)
            again = RemoteEngine(server.url, api_key="k-3f9a")  # the cap let go of them: served
            try:
                assert "".join([delta async for delta in again.stream(request)]).strip()
            finally:
                await again.close()
        finally:
            await keyed.close()
            await unkeyed.close()
    finally:
        server.stop()


async def peer_without_the_key_holds_nothing(port: int) -> None:
    """A request without the key is answered 401 and its connection closed
    (kept alive, one request a minute held a socket for good), and one
    address's open connections are capped at accept: past the cap the next
    is closed before a byte of it is read."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: engine\r\n\r\n")
    async with asyncio.timeout(10):
        answer = await reader.read()  # to EOF: the server closed it
    assert answer.startswith(b"HTTP/1.1 401") and b"Connection: close" in answer, answer[:200]
    writer.close()
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
    reading = asyncio.ensure_future(held[-1][0].read(1))
    done, _ = await asyncio.wait({reading}, timeout=0.3)
    reading.cancel()
    assert not done, "the cap's last connection was refused too (an idle accepted one hears nothing)"
    extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(10):
        refused = await extra_reader.read()  # answered at accept (busy, not down) and closed
    assert refused.startswith(b"HTTP/1.1 429") and b"rate_limit_exceeded" in refused, refused[:200]
    extra_writer.close()
    for _, w in held:
        w.close()
        await w.wait_closed()
    await asyncio.sleep(0.3)  # the server sees them go
