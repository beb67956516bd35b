"""Real OpenAI-compatible LLM servers for the tests: ``python -m
llm.openai_server`` child processes on the embedded SmolLM2 (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time

import aiohttp

from llm.supervisor import free_port


class ServerProcess:
    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm.openai_server", "--port", str(self.port), "--log-level", "WARNING", *extra]
        )
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"

    async def health(self) -> dict | None:
        try:
            async with aiohttp.ClientSession() as s, s.get(self.root + "/health") as r:
                return await r.json() if r.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def wait_healthy(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llm.openai_server exited with {self.proc.returncode}")
            if await self.health() is not None:
                return self
            await asyncio.sleep(0.1)
        raise TimeoutError(f"llm.openai_server on port {self.port} not healthy after {timeout} s")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


async def start_servers(n: int, *extra: str) -> list[ServerProcess]:
    # One after the other: two llama.cpp instances warming up at once on two
    # cores take ~30 s (measured), one at a time under a second each.
    servers: list[ServerProcess] = []
    try:
        for _ in range(n):
            servers.append(ServerProcess(*extra))
            await servers[-1].wait_healthy()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers
