"""An OpenAI-compatible HTTP server in front of any :class:`~llm.base.LLMEngine`.

    python -m llm.openai_server --host 127.0.0.1 --port 8000 [--engine llamacpp|vllm] [--model PATH]

Routes: ``POST /v1/chat/completions`` (``stream: true`` as server-sent events,
with ``stream_options.include_usage``; or one JSON body), ``GET /v1/models``,
``GET /health`` (200 once the model is warm, 503 before). It is what the
supervisor (llm/supervisor.py) runs as a child process, and an endpoint any
OpenAI client (pipecat, the openai SDK, curl) can use for the same model the
voice server embeds.

A client that disconnects mid-stream aborts the generation inside the engine:
aiohttp cancels the handler, which closes the engine's stream (llama.cpp drops
the slot, vLLM aborts the request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from llm.base import GenerationRequest, LLMEngine
from llm.config import LLMConfig, SpeculationConfig

log = logging.getLogger(__name__)

_ids = itertools.count(1)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _parse(body: Any, default_max_tokens: int) -> tuple[GenerationRequest, bool, bool]:
    """The request body as a GenerationRequest; raises ValueError on bad input."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    clean: list[dict[str, str]] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("each message needs a string 'role'")
        content = m.get("content", "")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError("message 'content' must be a string or a list of text parts")
        clean.append({"role": m["role"], "content": content})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("'max_tokens' must be a positive integer")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError("'temperature' must be a number")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    request = GenerationRequest(
        request_id=f"chatcmpl-{next(_ids)}", messages=clean, max_tokens=max_tokens, temperature=float(temperature)
    )
    return request, stream, include_usage


def _usage_body(request: GenerationRequest) -> dict[str, Any]:
    u = request.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _finish_reason(request: GenerationRequest) -> str:
    return "length" if request.usage.completion_tokens >= request.max_tokens else "stop"


class OpenAIServer:
    """The aiohttp application around one engine (started by :meth:`start`)."""

    def __init__(self, engine: LLMEngine, model_name: str, max_tokens: int = 96) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_tokens = max_tokens
        self.ready = False
        self.active = 0
        self.aborted = 0  # generations ended by a client disconnect
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response(
            {"status": "ok", "active": self.active, "aborted": self.aborted, "engine": self.engine.describe()}
        )

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "firstline"}],
            }
        )

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        if not self.ready:
            return _error(503, "model is loading", "unavailable")
        try:
            body = await http.json()
            request, stream, include_usage = _parse(body, self.max_tokens)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, str(exc))
        rid = http.headers.get("X-Request-Id")
        if rid:
            request.request_id = rid[:128]
        self.active += 1
        try:
            if stream:
                return await self._stream(http, request, include_usage)
            return await self._complete(request)
        finally:
            self.active -= 1

    async def _complete(self, request: GenerationRequest) -> web.Response:
        try:
            text = "".join([d async for d in self.engine.stream(request)])
        except Exception as exc:
            log.exception("generation %s failed", request.request_id)
            return _error(500, f"{type(exc).__name__}: {exc}", "engine_error")
        return web.json_response(
            {
                "id": request.request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": _finish_reason(request),
                    }
                ],
                "usage": _usage_body(request),
            }
        )

    async def _stream(self, http: web.Request, request: GenerationRequest, include_usage: bool) -> web.StreamResponse:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            body = {
                "id": request.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        stream = self.engine.stream(request)
        first = True
        try:
            # Not prepared until the first token: an engine that fails at once
            # still gets a proper HTTP error status.
            async for delta in stream:
                if first:
                    await response.prepare(http)
                    await response.write(chunk({"role": "assistant", "content": delta}))
                    first = False
                else:
                    await response.write(chunk({"content": delta}))
            if first:
                await response.prepare(http)
                await response.write(chunk({"role": "assistant", "content": ""}))
            await response.write(chunk({}, _finish_reason(request)))
            if include_usage:
                usage: dict[str, Any] = {
                    "id": request.request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_name,
                    "choices": [],
                    "usage": _usage_body(request),
                }
                if request.usage.draft_tokens:  # llama.cpp server's own field names
                    usage["timings"] = {
                        "draft_n": request.usage.draft_tokens,
                        "draft_n_accepted": request.usage.accepted_tokens,
                    }
                await response.write(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            # The client went away (aiohttp cancels the handler, or a write
            # fails): closing the stream below aborts the engine's request.
            self.aborted += 1
            raise
        except Exception as exc:
            log.exception("generation %s failed", request.request_id)
            if first:
                return _error(500, f"{type(exc).__name__}: {exc}", "engine_error")
            # Mid-stream: an error event and no [DONE], so the client knows.
            err = {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "engine_error", "code": 500}}
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return response

    async def start(self, host: str, port: int) -> int:
        """Listen first (``/health`` answers 503 while loading), then warm the engine."""
        # handler_cancellation: a client disconnect cancels its handler, which
        # is how a hang-up reaches the engine as an abort.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await self._site.start()
        bound = self._runner.addresses[0][1]
        await self.engine.start()
        self.ready = True
        return bound

    async def close(self) -> None:
        self.ready = False
        if self._runner is not None:
            await self._runner.cleanup()
        await self.engine.close()


def _model_name(config: LLMConfig, engine: LLMEngine) -> str:
    model = engine.describe().get("model") or config.model
    if model:
        path = Path(str(model))
        return path.name.removesuffix(".gguf").split(".Q")[0] if path.suffix == ".gguf" else path.name
    return "SmolLM2-135M-Instruct"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm.openai_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine", choices=["llamacpp", "vllm"], default="llamacpp")
    p.add_argument("--model", default=None, help="GGUF (llamacpp) or HF folder (vllm); default: embedded SmolLM2")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: from the model file)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4, help="slots (llama.cpp) / max sequences (vLLM)")
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=96, help="default when a request sets none")
    p.add_argument("--speculation", choices=["none", "ngram", "eagle3", "draft_model", "mtp", "suffix"], default="none")
    p.add_argument("--speculative-tokens", type=int, default=4)
    p.add_argument("--draft-model", default=None)
    p.add_argument("--system-prompt", default=None, help="warm-up prompt (lands in the prefix cache)")
    p.add_argument("--config-json", default=None, help="a whole LLMConfig as JSON (overrides the flags above)")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_json(text: str) -> LLMConfig:
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(LLMConfig)}
    spec = SpeculationConfig(**data.pop("speculation", {}))
    return LLMConfig(**{k: v for k, v in data.items() if k in known}, speculation=spec)


def config_from_args(args: argparse.Namespace) -> LLMConfig:
    if args.config_json:
        return config_from_json(args.config_json)

    config = LLMConfig(
        engine=args.engine,
        model=args.model,
        device=args.device,
        threads=args.threads,
        parallel=args.parallel,
        context_tokens=args.context_tokens,
        max_tokens=args.max_tokens,
        speculation=SpeculationConfig(
            method=args.speculation, num_tokens=args.speculative_tokens, draft_model=args.draft_model
        ),
    )
    if args.system_prompt:
        config.system_prompt = args.system_prompt
    return config


def _die_with_parent() -> None:
    """A supervised engine never outlives the voice server that started it:
    a daemon thread watches the parent pid (set by the supervisor) and ends
    this process once the parent is gone, even a SIGKILLed one. (Polling, not
    PR_SET_PDEATHSIG, which fires when the spawning *thread* exits.)"""
    parent = os.environ.get("FIRSTLINE_PARENT_PID")
    if parent is None:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.5)
        log.warning("parent process %s is gone; exiting", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)  # SIGTERM did not end it in time

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


async def serve(args: argparse.Namespace) -> None:
    from llm.engines import build_local_engine

    config = config_from_args(args)
    engine = build_local_engine(config)
    server = OpenAIServer(engine, args.served_model_name or _model_name(config, engine), config.max_tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.perf_counter()
    port = await server.start(args.host, args.port)
    log.info(
        "OpenAI-compatible server on http://%s:%d/v1 (model %s, %s), warm in %.1f s",
        args.host,
        port,
        server.model_name,
        engine.name,
        time.perf_counter() - started,
    )
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
