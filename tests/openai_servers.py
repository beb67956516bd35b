"""Real OpenAI-compatible LLM servers for the tests: ``python -m
llm.openai_server`` child processes on the embedded SmolLM2 (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time

import aiohttp

from benchmarks.cluster import router_command
from llm.supervisor import free_port


class _Child:
    """A child process the tests start and must not leave behind."""

    proc: subprocess.Popen[bytes]

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


class ServerProcess(_Child):
    def __init__(self, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
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


class RouterProcess(_Child):
    """vLLM's router (PyPI ``vllm-router``, the Rust one) in front of real
    ``llm.openai_server`` replicas: the LLM tier of docs/scaling.md. Health
    checks every second, one failure marks a replica down."""

    def __init__(self, workers: list[str], policy: str = "sticky_least_loaded") -> None:
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.proc = subprocess.Popen(router_command(self.port, workers, policy), stdout=subprocess.DEVNULL)

    async def wait_ready(self, timeout: float = 60.0) -> RouterProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm-router exited with {self.proc.returncode}")
            try:
                async with aiohttp.ClientSession() as s, s.get(self.root + "/health") as r:
                    if r.status == 200:
                        return self
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"vllm-router on port {self.port} not ready after {timeout} s")
