"""An OpenAI-compatible HTTP server in front of any :class:`~llm.base.LLMEngine`.

    python -m llm.openai_server --host 127.0.0.1 --port 8000 [--engine llamacpp|vllm] [--model PATH]

Routes: ``POST /v1/chat/completions`` (``stream: true`` as server-sent events,
with ``stream_options.include_usage``; or one JSON body), ``GET /v1/models``,
``GET /health`` (200 once the model is warm, 503 before). It is what the
supervisor (llm/supervisor.py) runs as a child process, and an endpoint any
OpenAI client (pipecat, the openai SDK, curl) can use for the same model the
voice server embeds.

Sampling: the chat-completions fields the engine honours are applied
(temperature, top_p, max_tokens / max_completion_tokens, stop, seed,
frequency_penalty, presence_penalty; vLLM's extras top_k, min_p,
repetition_penalty; llama.cpp's dry_*), each defaulting to the server's
``LLMConfig.sampling`` (flags, or the supervisor's ``--config-json``). What
it cannot honour (n > 1, logit_bias, logprobs, tools, a non-text
response_format, unknown fields) and out-of-range values get HTTP 400 in
OpenAI's error shape, naming the field in ``error.param``: never a reply that
silently ignored part of the request. vLLM's ``continue_final_message`` (with
``add_generation_prompt: false``) carries on a final assistant message (a
reply whose engine died mid-stream, llm/continuation.py); the vLLM/SGLang
fields vllm-router adds to every body are accepted at the values it writes.

A client that disconnects mid-stream aborts the generation inside the engine:
aiohttp cancels the handler, which closes the engine's stream (llama.cpp drops
the slot, vLLM aborts the request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from llm.base import EngineError, GenerationRequest, LLMEngine, PromptTooLong, SentenceEndUnsupported
from llm.config import LLMConfig, SpeculationConfig
from llm.sampling import (
    SamplingError,
    SamplingParams,
    add_sampling_arguments,
    did_you_mean,
    sampling_from_args,
    shown_name,
)
from streaming.addresses import ConnectionCounts, ConnectionSlot, is_loopback, refusal_bytes
from streaming.open_files import raise_open_files_limit

log = logging.getLogger(__name__)

_ids = itertools.count(1)

# The environment variable that carries the bearer key the server requires
# (the supervisor's random per-process key; unset: no key).
ENGINE_KEY_ENV = "FIRSTLINE_ENGINE_KEY"
# What a client hears of a failed generation; the exception goes to the log.
GENERATION_FAILED = "the engine failed to generate this reply"
REQUEST_REFUSED = "the engine cannot take these messages (its chat template refused them)"
SENTENCE_END_PATH = "/firstline/v1/sentence_end"


def _session_key(http: web.Request) -> str | None:
    """The call a request belongs to (RemoteEngine sends it as X-Session-ID),
    so an engine with several copies (llm/replicas.py) keeps a call on the
    copy that caches its history. Bounded: it is a dict key here."""
    key = http.headers.get("X-Session-ID")
    return key[:128] if key else None


# Requests in progress at once (MAX_REQUESTS, --max-requests): far above what
# a voice tier sends (two per live call at most), far below what exhausts memory.
MAX_REQUESTS = 256
# A request body's limit: a long call's whole history is tens of KiB.
MAX_BODY_BYTES = 4 << 20
# How long a request's body may take to arrive (--body-timeout-s): a client
# trickling one byte a minute held one of the --max-requests for good.
BODY_TIMEOUT_S = 30.0
# A connection with no request in progress is closed after this long (also
# one that never sends its first): aiohttp's default kept an idle socket an
# hour. Above the client pools' idle times (aiohttp's 15 s, RemoteEngine's
# 30 s), so a pooled connection is closed by its client first, not raced.
KEEPALIVE_S = 75.0
# What a connection past its address's cap gets before it is closed
# (--max-connections-per-peer): a 429 in OpenAI's shape, which a client
# reads as busy (RemoteEngine tries the next replica), not a dropped socket,
# which reads as the engine down. Everything behind a router comes from its
# one address.
TOO_MANY_CONNECTIONS = refusal_bytes(
    429,
    "Too Many Requests",
    {
        "error": {
            "message": "too many connections open from one address",
            "type": "rate_limit_exceeded",
            "param": None,
            "code": 429,
        }
    },
    retry_after_s=1,
)


def default_connections_per_peer(max_requests: int) -> int:
    """Twice the requests in progress a voice tier may send (``max_requests``,
    MAX_REQUESTS where unbounded), so a replica's pool never meets the cap.
    Without one, a peer without the key held sockets by the thousand (one
    request each 75 s keeps one) until accept() failed for every client."""
    return 2 * (max_requests if max_requests > 0 else MAX_REQUESTS)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> web.Response:
    # OpenAI's error shape (clients read error.message; param names the field).
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


def _failed(exc: Exception, what: str) -> web.Response:
    """The answer to a request the engine failed before its first words: a
    prompt its context cannot hold is the request's fault (400, OpenAI's
    ``context_length_exceeded``: the client does not mark this server down
    for it), anything else the engine's (500)."""
    if isinstance(exc, PromptTooLong):
        log.warning("%s: %s", what, exc)
        return _error(400, str(exc), "context_length_exceeded")
    if isinstance(exc, EngineError) and exc.refused:
        # The messages themselves (a chat template that refuses them): the
        # client must not mark this server down for it, as a 500 made it.
        log.warning("%s: the engine refused its messages", what)  # its words may quote them: DEBUG
        log.debug("%s refused: %s", what, exc)
        return _error(400, REQUEST_REFUSED)
    log.error("%s failed", what, exc_info=exc)
    return _error(500, GENERATION_FAILED, "engine_error")


class BadRequest(ValueError):
    """A request this server refuses (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# Fields read outside sampling: the conversation and how to send the reply.
_PROTOCOL_FIELDS = frozenset(
    {"messages", "stream", "stream_options"}
    # vLLM's pair for carrying on a final assistant message (checked in _parse).
    | {"continue_final_message", "add_generation_prompt"}
)
# Accepted and without effect: routing and bookkeeping that change nothing
# about the reply (one model is served, nothing is stored).
_IGNORED_FIELDS = frozenset(
    {"model", "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
    | {"parallel_tool_calls"}  # without tools, nothing to run in parallel
)


def _text_format(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


# OpenAI features this server cannot honour: accepted only at their "off"
# value (clients often send the default explicitly), a 400 otherwise, so a
# client never gets a reply that silently ignored what it asked for.
_ONLY_OFF: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v == 1, "must be 1: one choice per request"),
    "logit_bias": (lambda v: not v, "is not supported"),
    "logprobs": (lambda v: v is False, "is not supported (no log probabilities)"),
    "top_logprobs": (lambda v: v == 0, "is not supported (no log probabilities)"),
    "tools": (lambda v: v == [], "is not supported (no tool calling)"),
    "functions": (lambda v: v == [], "is not supported (no tool calling)"),
    "tool_choice": (lambda v: v in ("none", "auto"), "is not supported (no tool calling)"),
    "function_call": (lambda v: v in ("none", "auto"), "is not supported (no tool calling)"),
    "response_format": (_text_format, 'must be {"type": "text"} (no structured output)'),
    "modalities": (lambda v: v == ["text"], 'must be ["text"] (text replies only)'),
    "audio": (lambda v: False, "is not supported (text replies only)"),
    "prediction": (lambda v: False, "is not supported (no predicted outputs)"),
    "web_search_options": (lambda v: False, "is not supported"),
    "reasoning_effort": (lambda v: False, "is not supported (not a reasoning model)"),
    # vLLM / SGLang extensions that vllm-router writes into every body it
    # forwards, at these values (docs/scaling.md): accepted as sent, since
    # they ask for what this server does anyway.
    "ignore_eos": (lambda v: v is False, "is not supported (generation stops at end of message)"),
    "no_stop_trim": (lambda v: v is False, "is not supported (stop strings are trimmed)"),
    "skip_special_tokens": (lambda v: v is True, "must be true (special tokens are never sent)"),
    "return_hidden_states": (lambda v: v is False, "is not supported"),
    "include_reasoning": (lambda v: isinstance(v, bool), "must be a boolean (this model does not reason)"),
    "separate_reasoning": (lambda v: isinstance(v, bool), "must be a boolean (this model does not reason)"),
    "stream_reasoning": (lambda v: isinstance(v, bool), "must be a boolean (this model does not reason)"),
}


def _check_fields(body: dict[str, Any]) -> None:
    """400 for a field this server cannot honour; unknown fields too, since
    ignoring one (a typo, another server's extension) would answer a request
    other than the one sent."""
    sampling_fields = SamplingParams.openai_fields()
    for name, value in body.items():
        if name in _PROTOCOL_FIELDS or name in _IGNORED_FIELDS or name in sampling_fields or value is None:
            continue
        if name in _ONLY_OFF:
            accepted, why = _ONLY_OFF[name]
            if not accepted(value):
                raise BadRequest(f"'{name}' {why}", name)
            continue
        known = sampling_fields | _PROTOCOL_FIELDS | _IGNORED_FIELDS | set(_ONLY_OFF)
        shown = shown_name(name)
        raise BadRequest(f"unsupported field '{shown}'{did_you_mean(name, known)}", shown)


def _parse(body: Any, defaults: SamplingParams) -> tuple[GenerationRequest, bool, bool]:
    """The request body as a GenerationRequest sampled with ``defaults``
    overridden by the body's sampling fields; raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    clean: list[dict[str, str]] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a string 'role'", "messages")
        content = m.get("content", "")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(text, str) for text in texts):
                raise BadRequest("a text part's 'text' must be a string", "messages")
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest("message 'content' must be a string or a list of text parts", "messages")
        clean.append({"role": m["role"], "content": content})
    _check_fields(body)
    try:
        sampling = defaults.from_openai(body)
    except SamplingError as exc:
        raise BadRequest(str(exc), exc.field) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise BadRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    request = GenerationRequest(
        request_id=f"chatcmpl-{next(_ids)}", messages=clean, sampling=sampling, continue_final=_continues(body, clean)
    )
    return request, bool(stream), include_usage


def _continues(body: dict[str, Any], messages: list[dict[str, str]]) -> bool:
    """vLLM's ``continue_final_message`` (with ``add_generation_prompt``
    false): carry on the final assistant message instead of answering."""
    carry_on = body.get("continue_final_message", False)
    generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(carry_on, bool | None) or not isinstance(generation_prompt, bool | None):
        raise BadRequest("'continue_final_message' and 'add_generation_prompt' must be booleans")
    if not carry_on:
        if generation_prompt is False:
            raise BadRequest("'add_generation_prompt': false is supported only with continue_final_message")
        return False
    if generation_prompt:
        raise BadRequest("continue_final_message needs add_generation_prompt: false", "add_generation_prompt")
    if messages[-1]["role"] != "assistant":
        raise BadRequest("continue_final_message needs an assistant message last", "messages")
    return True


def _prompt_timings(request: GenerationRequest) -> dict[str, int] | None:
    """The prompt's cached and computed tokens, in llama.cpp server's
    ``timings`` names, for the first chunk: a client that stops reading
    early (a reply cut at its sentence cap) never sees the usage chunk."""
    u = request.usage
    if not u.prompt_tokens:
        return None
    return {"cache_n": u.cached_tokens, "prompt_n": max(0, u.prompt_tokens - u.cached_tokens)}


def _usage_body(request: GenerationRequest) -> dict[str, Any]:
    u = request.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _finish_reason(request: GenerationRequest, context_tokens: int | None = None) -> str:
    """ "length" where the reply was cut: at its max_tokens, or where it
    filled the context (vLLM lowers max_tokens to what the context leaves;
    llama.cpp stops when the slot is full): a client reads "stop" as whole."""
    usage = request.usage
    full = context_tokens is not None and usage.prompt_tokens + usage.completion_tokens >= context_tokens
    return "length" if usage.completion_tokens >= request.sampling.max_tokens or full else "stop"


class OpenAIServer:
    """The aiohttp application around one engine (started by :meth:`start`)."""

    def __init__(
        self,
        engine: LLMEngine,
        model_name: str,
        max_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        api_key: str | None = None,
        max_requests: int = MAX_REQUESTS,
        stuck_after_s: float = 0.0,
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_connections_per_peer: int | None = None,
    ) -> None:
        self.engine = engine
        cap = (
            default_connections_per_peer(max_requests) if max_connections_per_peer is None else max_connections_per_peer
        )
        self._connections = ConnectionCounts(cap)
        self._slots: dict[Any, ConnectionSlot] = {}  # aiohttp's handler -> its count
        self.refused_connections = 0  # closed at accept: their address was at its cap
        self.body_timeout_s = body_timeout_s
        # An engine with work and no progress (no token, no answer) for this
        # long is stuck (a hung CUDA kernel, deadlocked slot threads) while
        # this loop still answers: /health says 503, so a supervisor restarts
        # it and a balancer takes it out. 0: never said.
        self.stuck_after_s = stuck_after_s
        self._working = 0  # engine calls in progress (replies and probes)
        self._progress_at = time.monotonic()
        self._stuck_said_at: float | None = None  # the stuck episode already logged
        # A wait on the engine gave up without a word (its client's first-token
        # timeout); cleared by the engine's next output.
        self._unanswered = False
        self._probe: asyncio.Task[None] | None = None
        # Requests in progress (body read included) past which a new one is
        # answered 429 before its body is read: each may carry 4 MiB and
        # waits in the engine's queue, which has no bound of its own. 0: none
        # (the supervised child: its one client's calls are bounded by admission).
        self.max_requests = max_requests
        self._in_progress = 0
        self.model_name = model_name
        # Bearer key every /v1 request must carry (None: open, as a plain
        # OpenAI-compatible server). The supervisor sets a random one per
        # process so nothing else on the host can drive its engine child.
        self.api_key = api_key
        # What a request samples with for every field its body leaves out
        # (the supervised child gets the voice server's LLMConfig.sampling).
        self.sampling = (sampling or SamplingParams()).merged({"max_tokens": max_tokens})
        self.ready = False
        self.active = 0
        self.aborted = 0  # generations ended by a client disconnect
        self.served = 0  # chat completions started (a router's spread is visible here)
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None

    @web.middleware
    async def _bounded(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        if 0 < self.max_requests <= self._in_progress:
            response = _error(429, f"busy: {self.max_requests} requests in progress", "rate_limit_exceeded")
            response.headers["Retry-After"] = "1"
            return response
        self._in_progress += 1
        try:
            return await handler(request)
        finally:
            self._in_progress -= 1

    @web.middleware
    async def _require_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # /health stays open: with a key set it says only whether the engine is warm.
        if self.api_key is not None and request.path != "/health":
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), self.api_key.encode()
            ):
                refused = _error(401, "missing or wrong API key", "authentication_error")
                # Closed: a connection without the key holds nothing here
                # (kept alive, one request a minute held its socket for good).
                refused.force_close()
                return refused
        return await handler(request)

    def app(self) -> web.Application:
        # The key first: a caller without it is not counted against the bound.
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._require_key, self._bounded])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        # firstline's own: what RemoteEngine.sentence_end_probability asks
        # (a plain OpenAI server answers 404 and the policy goes on without it).
        app.router.add_post(SENTENCE_END_PATH, self.sentence_end)
        app.router.add_get("/health", self.health)
        return app

    @contextlib.contextmanager
    def _engine_work(self) -> Any:
        started = time.monotonic()
        if not self._working:
            self._progress_at = started  # the clock starts with the work
        self._working += 1
        answered = False
        try:
            yield
            answered = True
        finally:
            self._working -= 1
            now = self._progress_at = time.monotonic()
            if answered:
                self._unanswered = False
            elif now - started >= min(SUSPECT_WAIT_S, self.stuck_after_s):
                # Its client gave up (a first-token timeout closes the request):
                # with nobody waiting any more the clock above sees no work, so a
                # wedged engine looked healthy for good. /health probes it.
                self._unanswered = True

    async def _watched(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """``stream``'s deltas, the time spent waiting on the engine for each
        counted as engine work (not the time a slow client takes to read
        them: that is no sign of a stuck engine)."""
        deltas = aiter(stream)
        while True:
            with self._engine_work():
                try:
                    delta = await anext(deltas)
                except StopAsyncIteration:
                    return
            yield delta

    @property
    def _context_tokens(self) -> int | None:
        config = getattr(self.engine, "config", None)
        return getattr(config, "context_tokens", None)

    @property
    def stuck(self) -> bool:
        """Work in the engine and nothing from it for stuck_after_s."""
        idle = time.monotonic() - self._progress_at
        return 0 < self.stuck_after_s < idle and self._working > 0

    def _probe_if_unanswered(self) -> None:
        """A wait gave up without a word and nothing waits now: one tiny
        request, so a wedged engine has work again and the clock can see it
        (a healthy one answers at once and clears the doubt)."""
        if not self._unanswered or self._working or (self._probe is not None and not self._probe.done()):
            return
        if self.stuck_after_s <= 0:
            return
        self._probe = asyncio.ensure_future(self._probe_engine())

    async def _probe_engine(self) -> None:
        request = GenerationRequest("health-probe", [{"role": "user", "content": "Hello."}], max_tokens=1)
        try:
            async for _ in self._watched(self.engine.stream(request)):
                pass
        except Exception:
            # It answered, with an error: not wedged (a dead engine is said
            # by its own availability), and not probed again for it.
            log.debug("the engine probe failed", exc_info=True)
            self._unanswered = False

    async def health(self, _request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "loading"}, status=503)
        if not getattr(self.engine, "available", True):
            return web.json_response({"status": "engine dead"}, status=503)
        self._probe_if_unanswered()
        if self.stuck:
            # Once per episode: /health is open, and anything on the host
            # asking it in a loop wrote an ERROR line per request.
            if self._stuck_said_at != self._progress_at:
                self._stuck_said_at = self._progress_at
                log.error("the engine has had work and no progress for %.0f s", self.stuck_after_s)
            return web.json_response({"status": "engine stuck"}, status=503)
        if self.api_key is not None:  # open to any local process: no paths, no counters
            return web.json_response({"status": "ok"})
        return web.json_response(
            {
                "status": "ok",
                "active": self.active,
                "aborted": self.aborted,
                "served": self.served,
                "engine": self.engine.describe(),
            }
        )

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "firstline"}],
            }
        )

    async def _body(self, http: web.Request) -> tuple[Any, web.Response | None]:
        """The request's JSON body, or the error to answer instead."""
        if not self.ready:
            return None, _error(503, "model is loading", "unavailable")
        try:
            async with asyncio.timeout(self.body_timeout_s or None):
                return await http.json(), None
        except TimeoutError:
            late = _error(408, f"the body did not arrive within {self.body_timeout_s:g} s")
            late.force_close()  # the rest of it may still come
            return None, late
        except web.HTTPRequestEntityTooLarge:
            # aiohttp's own answer is plain text: an OpenAI client reads
            # error.message from JSON.
            large = _error(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB", param="messages")
            large.force_close()
            return None, large
        except (ValueError, UnicodeDecodeError) as exc:
            return None, _error(400, f"the body is not valid JSON: {exc}")
        except RecursionError:  # JSON nested ~1,000 deep: a bad request, not a 500 and a traceback
            return None, _error(400, "the body is nested too deep")

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        body, refused = await self._body(http)
        if refused is not None:
            return refused
        try:
            request, stream, include_usage = _parse(body, self.sampling)
            self.engine.check_sampling(request.sampling)
        except RecursionError:  # a value nested just shallow enough to parse, walked deeper
            return _error(400, "a field is nested too deep")
        except BadRequest as exc:
            return _error(400, str(exc), param=exc.param)
        except EngineError as exc:  # e.g. DRY asked of a vLLM engine
            return _error(400, str(exc), param=getattr(exc.__cause__, "field", None))
        rid = http.headers.get("X-Request-Id")
        if rid:
            request.request_id = rid[:128]
        request.session_key = _session_key(http)
        self.active += 1
        self.served += 1
        try:
            if stream:
                return await self._stream(http, request, include_usage)
            return await self._complete(request)
        finally:
            self.active -= 1

    async def sentence_end(self, http: web.Request) -> web.Response:
        body, refused = await self._body(http)
        if refused is not None:
            return refused
        messages = body.get("messages") if isinstance(body, dict) else None
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)
            or messages[-1]["role"] != "user"
        ):  # fmt: skip
            return _error(
                400, "'messages' must be a list of {role, content} strings ending with the user's", "messages"
            )
        try:
            with self._engine_work():
                probability = await self.engine.sentence_end_probability(messages, _session_key(http))
        except SentenceEndUnsupported as exc:
            return _error(501, str(exc), "not_supported")
        except Exception as exc:
            return _failed(exc, "sentence-end probe")
        return web.json_response({"probability": probability})

    async def _complete(self, request: GenerationRequest) -> web.Response:
        try:
            text = "".join([d async for d in self._watched(self.engine.stream(request))])
        except Exception as exc:
            return _failed(exc, f"generation {request.request_id}")
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
                        "finish_reason": _finish_reason(request, self._context_tokens),
                    }
                ],
                "usage": _usage_body(request),
            }
        )

    async def _stream(self, http: web.Request, request: GenerationRequest, include_usage: bool) -> web.StreamResponse:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, timings: dict[str, int] | None = None) -> bytes:
            body: dict[str, Any] = {
                "id": request.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if timings:
                body["timings"] = timings
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        stream = self.engine.stream(request)
        first = True
        try:
            # Not prepared until the first token: an engine that fails at once
            # still gets a proper HTTP error status.
            async for delta in self._watched(stream):
                if first:
                    await response.prepare(http)
                    opening = {"role": "assistant", "content": delta}
                    await response.write(chunk(opening, timings=_prompt_timings(request)))
                    first = False
                else:
                    await response.write(chunk({"content": delta}))
            if first:
                await response.prepare(http)
                await response.write(chunk({"role": "assistant", "content": ""}))
            await response.write(chunk({}, _finish_reason(request, self._context_tokens)))
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
            if first:
                return _failed(exc, f"generation {request.request_id}")
            log.exception("generation %s failed", request.request_id)
            # Mid-stream: an error event and no [DONE], so the client knows.
            err = {"error": {"message": GENERATION_FAILED, "type": "engine_error", "code": 500}}
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return response

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        """Listen first (``/health`` answers 503 while loading), then warm the
        engine. ``sock``: a listening socket to serve on instead (the
        supervisor binds it and hands it over)."""
        # handler_cancellation: a client disconnect cancels its handler, which
        # is how a hang-up reaches the engine as an abort.
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, keepalive_timeout=KEEPALIVE_S
        )
        await self._runner.setup()
        self._cap_connections(self._runner.server)
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, host, port, reuse_address=True)
        self._site = site
        await site.start()
        bound = self._runner.addresses[0][1]
        await self.engine.start()
        self.ready = True
        return bound

    def _cap_connections(self, server: Any) -> None:
        """Count each address's open connections from accept; past
        ``max_connections_per_peer`` a new one is closed before a byte of it
        is read, answered 429. (aiohttp's Server is told of each connection
        first thing; its own connection_made/lost still run.)"""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            peer = transport.get_extra_info("peername")
            slot = self._connections.open(str(peer[0]) if isinstance(peer, tuple) and peer else None)
            if slot is None:
                self.refused_connections += 1
                level = logging.WARNING if self.refused_connections == 1 else logging.DEBUG
                log.log(level, "connection from %s closed at accept: %d already open from it", peer[0],
                        self._connections.cap)  # fmt: skip
                # Nothing of it is read: answered and closed.
                transport.pause_reading()
                transport.write(TOO_MANY_CONNECTIONS)
                transport.close()
                return
            self._slots[handler] = slot

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            slot = self._slots.pop(handler, None)
            if slot is not None:
                slot.close()
            lost(handler, exc)

        server.connection_made, server.connection_lost = connection_made, connection_lost

    async def close(self) -> None:
        self.ready = False
        if self._probe is not None:
            self._probe.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.engine.close()


# A wait on the engine this long that ends without a word (or stuck_after_s,
# if shorter) makes /health probe it once nothing else waits on it: a reply
# cut by a barge-in waits tens of ms between tokens; a client's first-token
# timeout gives up after seconds. A healthy engine answers the probe at once.
SUSPECT_WAIT_S = 1.0


def default_stuck_after_s(config: LLMConfig) -> float:
    """How long an engine may have work and give nothing before /health says
    it is stuck: far past the point where every client gave up on it (the
    first-token timeout), and past a first request that compiles a shape
    the warm-up did not (vLLM on a CPU: tens of seconds)."""
    return max(60.0, 4 * config.first_token_timeout_s)


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
    p.add_argument("--replicas", type=int, default=1, help="copies of the llama.cpp engine (llm/replicas.py)")
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None, help="default when a request sets none (96)")
    p.add_argument("--speculation", choices=["none", "ngram", "eagle3", "draft_model", "mtp", "suffix"], default="none")
    p.add_argument("--speculative-tokens", type=int, default=4)
    p.add_argument("--draft-model", default=None)
    p.add_argument("--system-prompt", default=None, help="warm-up prompt (lands in the prefix cache)")
    # Defaults for every field a request leaves out.
    add_sampling_arguments(p)
    p.add_argument("--config-json", default=None, help="a whole LLMConfig as JSON (overrides the flags above)")
    p.add_argument(
        "--max-requests", type=int, default=MAX_REQUESTS, help="requests in progress at once, more get 429 (0: none)"
    )
    p.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=None,
        help="connections one address (an IPv6 /64) may hold open, more are answered 429 at accept "
        "(default: twice --max-requests; 0: no cap)",
    )
    p.add_argument(
        "--listen-fd", type=int, default=None, help="serve on this inherited listening socket (the supervisor's)"
    )
    p.add_argument(
        "--stuck-after-s",
        type=float,
        default=None,
        help="/health says 503 once the engine has work and no progress this long "
        "(default: four first-token timeouts, at least 60 s; 0: never)",
    )
    p.add_argument(
        "--body-timeout-s",
        type=float,
        default=BODY_TIMEOUT_S,
        help="a request body must arrive within this long, or 408 (0: no limit)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help=f"listen beyond loopback with no {ENGINE_KEY_ENV} set: refused otherwise, since "
        "anyone who reaches the port could drive the engine",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def open_to_all(host: str, keyed: bool, no_auth: bool) -> str | None:
    """Why a server on ``host`` must not start, or None: listening beyond
    loopback with no key means anyone who reaches it drives the engine (its
    GPU, every call's replies) and reads nothing back but tokens."""
    if keyed or no_auth or is_loopback(host):
        return None
    return (
        f"--host {host or '(all)'} listens beyond this machine and {ENGINE_KEY_ENV} is not set: anyone who "
        f"reaches the port could drive the engine. Set {ENGINE_KEY_ENV} (clients send it as a bearer key; "
        "firstline serve --engine remote sends FIRSTLINE_REMOTE_API_KEY), or pass --no-auth for a private network"
    )


def config_from_json(text: str) -> LLMConfig:
    data = json.loads(text)
    # max_tokens / temperature: legacy spellings (init-only, not fields).
    known = {f.name for f in dataclasses.fields(LLMConfig)} | {"max_tokens", "temperature"}
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
        replicas=args.replicas,
        context_tokens=args.context_tokens,
        sampling=sampling_from_args(args, max_tokens=args.max_tokens),
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


# How often a child server looks whether its engine has died under it.
DEAD_ENGINE_CHECK_S = 1.0


async def _exit_when_the_engine_dies(engine: LLMEngine, stop: asyncio.Event) -> bool:
    """vLLM's engine core is a process of its own: when it dies this server
    stays up, answering 500 to everything. Exiting instead lets the voice
    server's supervisor (llm/supervisor.py) start a new one. True: it died."""
    while not stop.is_set():
        await asyncio.sleep(DEAD_ENGINE_CHECK_S)
        if not getattr(engine, "available", True):
            log.error("the %s engine has died; exiting so that a new one is started", engine.name)
            stop.set()
            return True
    return False


async def serve(args: argparse.Namespace, config: LLMConfig) -> int:
    from llm.engines import build_local_engine

    # The key comes by environment, never argv (which `ps` shows to every user);
    # popped first, so nothing this process starts (the engine) inherits it.
    api_key = os.environ.pop(ENGINE_KEY_ENV, None) or None
    engine = build_local_engine(config)
    server = OpenAIServer(
        engine,
        args.served_model_name or _model_name(config, engine),
        sampling=config.sampling,
        api_key=api_key,
        max_requests=max(0, args.max_requests),
        stuck_after_s=default_stuck_after_s(config) if args.stuck_after_s is None else args.stuck_after_s,
        body_timeout_s=max(0.0, args.body_timeout_s),
        max_connections_per_peer=None
        if args.max_connections_per_peer is None
        else max(0, args.max_connections_per_peer),
    )
    log.debug("open files limit: %d", raise_open_files_limit())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.perf_counter()
    handed = None if args.listen_fd is None else socket.socket(fileno=args.listen_fd)
    port = await server.start(args.host, args.port, handed)
    log.info(
        "OpenAI-compatible server on http://%s:%d/v1 (model %s, %s), warm in %.1f s",
        args.host,
        port,
        server.model_name,
        engine.name,
        time.perf_counter() - started,
    )
    watchdog = asyncio.create_task(_exit_when_the_engine_dies(engine, stop))
    await stop.wait()
    died = watchdog.done() and not watchdog.cancelled() and watchdog.result()
    watchdog.cancel()
    await server.close()
    return 1 if died else 0


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a sampling flag out of range, bad --config-json
        parser.error(str(exc))
    # A handed-over socket (the supervisor's) is bound to loopback already.
    refused = (
        None
        if args.listen_fd is not None
        else open_to_all(args.host, bool(os.environ.get(ENGINE_KEY_ENV)), args.no_auth)
    )
    if refused is not None:
        parser.error(refused)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(serve(args, config))


if __name__ == "__main__":
    sys.exit(main())
