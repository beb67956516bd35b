"""The embedded llama.cpp engine (the server's own, already warm)."""

from __future__ import annotations

import asyncio

from llm.base import GenerationRequest
from llm.config import DEFAULT_SYSTEM_PROMPT


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]


async def _collect(engine, request):
    return [d async for d in engine.stream(request)]


async def test_streams_a_sensible_reply_with_usage(server):
    engine = server.runtime.engine
    request = GenerationRequest("paris", _messages("What is the capital of France?"), max_tokens=48)
    deltas = await _collect(engine, request)
    assert len(deltas) >= 3
    assert "paris" in "".join(deltas).lower()
    assert request.usage.prompt_tokens > 0 and request.usage.completion_tokens > 0
    # The system prompt was cached by the warm-up generation.
    assert request.usage.cached_tokens >= 20, request.usage


async def test_cancel_frees_the_slot_and_the_next_request_works(server):
    engine = server.runtime.engine
    long_request = GenerationRequest(
        "story", _messages("Tell me a very long story about a dragon, with many chapters."), max_tokens=600
    )
    got_first = asyncio.Event()

    async def consume():
        async for _ in engine.stream(long_request):
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # All slots must be usable again: as many parallel requests as slots.
    n = server.config.llm.parallel
    requests = [GenerationRequest(f"after{i}", _messages("Say hello."), max_tokens=12) for i in range(n)]
    replies = await asyncio.wait_for(asyncio.gather(*(_collect(engine, r) for r in requests)), 60)
    assert all("".join(r).strip() for r in replies)
