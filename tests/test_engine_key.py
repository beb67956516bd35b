"""The supervised engine child (llm/openai_server.py under llm/supervisor.py)
listens on loopback and answers /v1 only to the supervisor's random
per-process key, which travels by environment, not argv."""

from __future__ import annotations

import aiohttp

from llm.base import GenerationRequest
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
