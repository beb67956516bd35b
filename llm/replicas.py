"""Several copies of one local engine in one process, each on its own
threads: ``--llm-replicas``.

Why: on a CPU a llama.cpp step that carries two sequences costs each about
what it costs alone (benchmarks/first_sentence_lanes.py), so two turns that
reach one engine together both get their first sentence late, and an engine
with more threads spins at OpenMP barriers on the cores the Whisper decoder
needs (llm.config.threads_for). Two single-threaded copies have no barrier
and run two turns truly side by side on two cores; the OS shares the cores
between them and the decoder. The weights are one memory map (llama.cpp
mmaps the GGUF), so a copy costs its KV cache and prompt cache only.

Routing: a request goes to the copy that served the same call last, whose
prefix cache holds the call's history, unless that copy has more than
``home_slack`` requests under way beyond the least busy copy; then (and for
a call's first request) to the least busy copy. Every copy holds the system
prompt in every slot from its warm-up.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from llm.base import GenerationRequest, LLMEngine
from llm.config import LLMConfig
from llm.remote_engine import session_key_of
from llm.sampling import SamplingParams

# Calls remembered for routing (their last copy); the oldest are forgotten
# first, so a server that never hears end_session still stays bounded.
_HOMES_KEPT = 4096


class ReplicaSet(LLMEngine):
    """``copies`` engines behind one :class:`LLMEngine`."""

    def __init__(self, copies: list[LLMEngine], home_slack: int = LLMConfig.replica_home_slack) -> None:
        if not copies:
            raise ValueError("a replica set needs at least one engine")
        self.copies = copies
        self.home_slack = home_slack
        self.name = copies[0].name
        self.active = [0] * len(copies)
        self.served = [0] * len(copies)  # requests routed to each copy (describe: /health)
        self._homes: OrderedDict[str, int] = OrderedDict()
        self._next = itertools.count()  # requests with no call key take turns

    @property
    def config(self) -> Any:
        """The copies' config (copies: one config), as a lone engine's: the
        engine server reads its context from it (finish_reason "length")."""
        return getattr(self.copies[0], "config", None)

    async def start(self) -> None:
        # One after another: loading is CPU-bound, and a failure stops early.
        # Each copy's start warms it up, so every copy caches the system prompt.
        for copy in self.copies:
            await copy.start()

    def pick(self, key: str | None) -> int:
        """The copy a request of call ``key`` goes to (see the module doc)."""
        home = self._homes.get(key) if key else None
        # With the work a copy still runs for callers gone (a prompt pass a
        # barge-in cancelled): counted idle, it got the next turn, which
        # waited behind it.
        load = [n + copy.lingering_requests() for n, copy in zip(self.active, self.copies, strict=True)]
        fewest = min(load)
        if home is not None and load[home] <= fewest + self.home_slack:
            index = home
        else:
            idle = [i for i, n in enumerate(load) if n == fewest]
            index = idle[next(self._next) % len(idle)]
        self.served[index] += 1
        if key:
            self._homes[key] = index
            self._homes.move_to_end(key)
            while len(self._homes) > _HOMES_KEPT:
                self._homes.popitem(last=False)
        return index

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        index = self.pick(session_key_of(request))
        self.active[index] += 1
        try:
            stream = self.copies[index].stream(request)
            try:
                async for delta in stream:
                    yield delta
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        finally:
            self.active[index] -= 1

    async def sentence_end_probability(self, messages: list[dict[str, str]], session_key: str | None = None) -> float:
        index = self.pick(session_key)
        self.active[index] += 1
        try:
            return await self.copies[index].sentence_end_probability(messages, session_key)
        finally:
            self.active[index] -= 1

    def end_session(self, session_key: str) -> None:
        self._homes.pop(session_key, None)
        for copy in self.copies:
            copy.end_session(session_key)

    def check_sampling(self, sampling: SamplingParams) -> None:
        self.copies[0].check_sampling(sampling)

    async def close(self) -> None:
        # Every copy is closed even if one fails; the first failure is raised.
        results = await asyncio.gather(*(c.close() for c in self.copies), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def describe(self) -> dict[str, object]:
        return {**self.copies[0].describe(), "replicas": len(self.copies), "served_by_replica": list(self.served)}
