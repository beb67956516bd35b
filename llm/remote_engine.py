"""Engines that stream from OpenAI-compatible servers over HTTP.

:class:`RemoteEngine` talks to one base URL: our own ``python -m
llm.openai_server``, ``vllm serve``, or anything else that streams chat
completions as server-sent events. Cancelling the consumer closes the HTTP
connection, which both vLLM and llm.openai_server take as an abort. Every
failure (refused connection, HTTP error, a stream cut before ``[DONE]``, no
first token in time, a stall) is an :class:`~llm.base.EngineError` that says
which server failed and how.

Behind vLLM's router (``vllm-router --policy sticky_least_loaded``, the
documented way to scale the LLM tier: docs/scaling.md) every request of a
call carries the call id as ``X-Session-ID``, so the router keeps the call
on one replica (its prefix cache stays hot), and the call's end is sent as
``POST /finish_session`` so the router frees the session at once instead of
after its two-hour expiry.

:class:`RemotePool` spreads calls over several replicas. A call is pinned to
one replica (rendezvous hashing of the call id, so its prefix cache stays
hot and a replica that leaves only moves its own calls); replicas are
health-checked, and a request whose replica fails before any text came back
is retried on the next healthy one, to which the call is then re-pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from llm.base import (
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    LLMEngine,
    PromptTooLong,
    SentenceEndUnsupported,
    Usage,
    says_prompt_too_long,
)
from llm.config import DEFAULT_SYSTEM_PROMPT, LLMConfig, prompt_head

log = logging.getLogger(__name__)

# The bearer key remote servers want (`vllm serve --api-key`, a standalone
# llm.openai_server's FIRSTLINE_ENGINE_KEY): by environment only, not a flag
# (argv is in `ps`) nor the LLMConfig (a supervised child gets it as argv).
REMOTE_KEY_ENV = "FIRSTLINE_REMOTE_API_KEY"

# Pins kept per pool (LRU): far more than concurrent calls, bounded anyway.
MAX_PINS = 10_000
# How long a request that failed before any text is retried (a router's
# health check notices a dead replica within its 1-2 s interval).
RETRY_BEFORE_TEXT_S = 3.0


def normalize_base_url(url: str) -> str:
    """``http://host:port``, ``…/v1`` or ``…/v1/`` -> ``http://host:port/v1``."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


class FailedBeforeText(EngineError):
    """The server failed the request before generating anything (a 5xx, a
    dropped connection): trying again cannot say anything twice."""


class CutBeforeText(FailedBeforeText):
    """The stream broke after the server's 200 but before any text (a
    replica killed while the request queued or prefilled; vLLM sends its
    headers first): nothing was said, so it may be sent again."""


class ConnectTimedOut(EngineUnavailable):
    """The connection was not even set up within the connect timeout (a host
    that drops packets): down, and not worth waiting for again this turn."""


class Overloaded(FailedBeforeText):
    """HTTP 429: the server is up but turned this request away; another
    replica may take it, and this one is not marked down."""


class ServerMisconfigured(FailedBeforeText):
    """HTTP 401, 403 or 404: this server refuses every request (a key it no
    longer takes, a model it does not serve after a rolling change), not
    this one's fields: marked down, and another replica may take it."""


class RequestRefused(EngineError):
    """HTTP 4xx other than 429: the request itself was refused (too long a
    prompt, a bad field). Another replica would refuse it too: no failover,
    and the server is not marked down for it."""

    refused = True


class PromptRefused(RequestRefused, PromptTooLong):
    """HTTP 400 saying the prompt does not fit the server's context."""


# The most of an error response read for its message, within the request's
# deadline: a server may send headers and then stall its body, or send a
# body of any size.
ERROR_BODY_BYTES = 4096
ERROR_DETAIL_CHARS = 200
# The most of a short answer's body read (/v1/models, a sentence-end
# probe): a server answering with gigabytes within the timeout filled the
# voice process's memory, and every call on it died.
MAX_JSON_BYTES = 1024 * 1024
# The most a usage or timings count is believed: a server's counts feed
# process-wide counters (a negative one raised in Counter.inc, a NaN or an
# infinite one stuck there for good) and a call's token scale.
MAX_COUNT = 1 << 24
# A reply longer than this many characters per token asked for is cut:
# the stall timeout moves on with every piece of text, so a server that
# ignores max_tokens could stream to a call for as long as it liked.
MAX_CHARS_PER_TOKEN = 64
# How soon a lone server marked down after a failed request is looked at.
FIRST_HEALTH_LOOK_S = 0.2


class RemoteEngine(LLMEngine):
    name = "remote"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        connect_timeout_s: float = 2.0,
        first_token_timeout_s: float = 10.0,
        stall_timeout_s: float = 10.0,
        api_key: str | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        example_turns: tuple[tuple[str, str], ...] = (),
        full_sampling: bool = False,
        retry_before_text: bool = False,
        health_interval_s: float | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.root = self.base_url.removesuffix("/v1")
        self.model = model
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.api_key = api_key
        # Send every sampling field, "off" ones too: for a server whose own
        # defaults fill gaps (the supervised child; SamplingParams.to_openai).
        self.full_sampling = full_sampling
        # Retry a request that failed before any text (see _post): for a URL
        # that fronts several replicas (vllm-router). Off where something
        # else fails over (RemotePool, the supervisor's secondary).
        self.retry_before_text = retry_before_text
        self.retries = 0
        # Warmed at start (None: no warm-up), so it sits in the server's prefix cache.
        self.system_prompt = system_prompt
        self.example_turns = example_turns
        self.healthy = False
        # Bumped by every request the server answered: a health probe that
        # failed does not mark down a server that served one meanwhile.
        self._answered = 0
        # A lone engine (no pool's health loop over it) watches its own way
        # back: once marked down it asks /health this often until it
        # answers, so one failed request cannot keep /readyz at 503 on an
        # idle replica (None: someone else watches, a pool or a supervisor).
        self.health_interval_s = health_interval_s
        self._recovering: asyncio.Task[None] | None = None
        self._closed = False
        self._session: aiohttp.ClientSession | None = None
        # Responses being streamed -> why they were aborted (None: not aborted).
        self._open: dict[aiohttp.ClientResponse, str | None] = {}
        # False once the server answered /finish_session with 404: not a router.
        self._finishes_sessions = True
        # False once the server had no sentence-end route: not firstline's own.
        self._scores_sentence_end = True
        self._finishing: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(
        cls, url: str, config: LLMConfig, retry_before_text: bool = True, watch_health: bool = False
    ) -> RemoteEngine:
        return cls(
            url,
            api_key=os.environ.get(REMOTE_KEY_ENV) or None,
            retry_before_text=retry_before_text,
            health_interval_s=config.health_interval_s if watch_health else None,
            model=config.remote_model,
            connect_timeout_s=config.connect_timeout_s,
            first_token_timeout_s=config.first_token_timeout_s,
            stall_timeout_s=config.stall_timeout_s,
            system_prompt=config.system_prompt,
            example_turns=config.example_turns,
        )

    @property
    def available(self) -> bool:
        return self.healthy

    def _mark_down(self) -> None:
        self.healthy = False
        if self.health_interval_s is None or self._closed:
            return
        if self._recovering is None or self._recovering.done():
            with contextlib.suppress(RuntimeError):  # no running loop: shutting down
                self._recovering = asyncio.get_running_loop().create_task(
                    self._recover(), name=f"llm-health-{self.root}"
                )

    async def _recover(self) -> None:
        assert self.health_interval_s is not None
        log.warning("LLM server %s is down; checking /health every %g s", self.root, self.health_interval_s)
        # The first look comes soon: behind a router one worker's failure
        # (a cut stream, a 5xx) marks the whole router down, and every voice
        # replica unready with it, for as long as this first wait; HAProxy
        # (fall 2, fastinter 250 ms) then took them all out together.
        wait = min(FIRST_HEALTH_LOOK_S, self.health_interval_s)
        while not self.healthy and not self._closed:
            await asyncio.sleep(wait)
            wait = self.health_interval_s
            if await self.check_health():
                log.warning("LLM server %s is back", self.root)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.connect_timeout_s),
                headers=headers,
            )
        return self._session

    async def check_health(self) -> bool:
        """Up when GET /health answers 200 (vLLM and llm.openai_server, when
        ready) or, failing that, GET /readiness does: vllm-router's /health
        is 503 while *any* of its workers is down, its /readiness 200 while
        one can serve. On /health alone one dead worker kept every voice
        replica behind the router marked down, /readyz 503, out of HAProxy.
        A request answered while the probe was out wins over a failed probe."""
        answered = self._answered
        up = await self._probe("/health") or await self._probe("/readiness")
        if up or self._answered == answered:
            self.healthy = up
        return self.healthy

    async def _probe(self, path: str) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=self.connect_timeout_s + 1.0, sock_connect=self.connect_timeout_s)
            async with self._client().get(self.root + path, timeout=timeout) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _json(
        self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """One short (not streamed) request: its status and, for a 200, its
        JSON body, else the start of its text."""
        timeout = aiohttp.ClientTimeout(total=self.first_token_timeout_s, sock_connect=self.connect_timeout_s)
        try:
            async with self._client().request(method, url, json=body, headers=headers, timeout=timeout) as r:
                if r.status != 200:
                    return r.status, (await r.content.read(ERROR_BODY_BYTES)).decode("utf-8", "replace")[:300]
                return r.status, json.loads(await _read_at_most(r, MAX_JSON_BYTES, url))
        except aiohttp.ClientConnectorError as exc:
            raise EngineUnavailable(f"cannot connect to LLM server {self.root}: {exc}") from exc
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError, which it also is
            raise EngineUnavailable(
                f"cannot connect to LLM server {self.root} within {self.connect_timeout_s:g} s"
            ) from exc
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError, HttpProcessingError) as exc:
            # The text of a parse error may quote the answer: its type only.
            raise EngineError(f"LLM server {url}: {type(exc).__name__}") from exc

    async def _resolve_model(self) -> str:
        url = self.base_url + "/models"
        status, data = await self._json("GET", url)
        if status != 200:
            # A 4xx is this server's configuration (a wrong key, model or
            # path): refused, so a voice replica does not start and wait for it.
            kind = RequestRefused if 400 <= status < 500 and status != 429 else EngineError
            error = kind(f"LLM server {url} answered HTTP {status}")
            error.detail = str(data)[:ERROR_DETAIL_CHARS]
            raise error
        # Any shape a server may send: a malformed list is "no model", not a
        # KeyError that ends the pool's health loop.
        models = data.get("data") if isinstance(data, dict) else None
        first = models[0] if isinstance(models, list) and models else None
        model = first.get("id") if isinstance(first, dict) else None
        if not isinstance(model, str) or not model:
            raise EngineError(f"LLM server {url} lists no model")
        return model

    async def start(self) -> None:
        started = time.perf_counter()
        if self.model is None:
            self.model = await self._resolve_model()
        if self.system_prompt is not None:
            await self.warm_up(prompt_head(self.system_prompt, self.example_turns))
        self.healthy = True
        self._answered += 1
        log.info("remote LLM %s (%s) ready in %.2f s", self.base_url, self.model, time.perf_counter() - started)

    def await_server(self) -> None:
        """start() failed (the server or router not up yet): stay unavailable
        and watch /health until it answers; the model is asked for then, at
        the first request."""
        self._mark_down()

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self._stream(request)

    @property
    def scores_sentence_end(self) -> bool:
        """Not yet known unable to score sentence ends (see below)."""
        return self._scores_sentence_end

    async def sentence_end_probability(self, messages: list[dict[str, str]], session_key: str | None = None) -> float:
        """Asked of firstline's own engine server (llm/openai_server.py); any
        other server has no such route and is remembered as unable."""
        from llm.openai_server import SENTENCE_END_PATH

        if not self._scores_sentence_end:
            raise SentenceEndUnsupported(f"LLM server {self.root} cannot score where a sentence ends")
        headers = {"X-Session-ID": session_key} if session_key else None
        status, data = await self._json("POST", self.root + SENTENCE_END_PATH, {"messages": messages}, headers)
        if status in (404, 405, 501):
            self._scores_sentence_end = False
            raise SentenceEndUnsupported(f"LLM server {self.root} cannot score where a sentence ends")
        if status != 200:
            raise EngineError(f"LLM server {self.root} answered HTTP {status}: {data}")
        probability = data.get("probability") if isinstance(data, dict) else None
        if not isinstance(probability, int | float) or not 0.0 <= probability <= 1.0:
            raise EngineError(f"LLM server {self.root} sent no probability: {str(data)[:200]}")
        return float(probability)

    def abort_all(self, reason: str) -> None:
        """End every stream in flight now, each with ``EngineError(reason)``
        (the supervisor calls this the moment its child dies)."""
        self.healthy = False
        for response in list(self._open):
            self._open[response] = reason
            response.close()

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """With ``retry_before_text``, a stream cut before its first text is
        sent again within RETRY_BEFORE_TEXT_S, as a refused POST is (_post):
        behind vllm-router the next try lands on a live replica."""
        for attempt in range(2):  # once more at most: a cut that repeats is the request's
            try:
                # aclosing: a consumer that stops here (a barge-in) closes the
                # HTTP stream now, which aborts the generation in the server,
                # not whenever the loop finalizes the generator.
                async with contextlib.aclosing(self._stream_once(request)) as stream:
                    async for delta in stream:
                        yield delta
                return
            except CutBeforeText as exc:
                if not self.retry_before_text or attempt:
                    raise
                log.debug("LLM server %s: %s; sending it again", self.root, exc)
                self.retries += 1
                await asyncio.sleep(0.1)

    async def _stream_once(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self.model is None:
            self.model = await self._resolve_model()
        url = self.base_url + "/chat/completions"
        body = {
            "model": self.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            # The whole sampling config, so the server samples exactly as an
            # in-process engine would (vLLM extras only when they are set).
            **request.sampling.to_openai(full=self.full_sampling),
        }
        if request.continue_final:
            # vLLM's (and llm.openai_server's) way to carry on the last message.
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_token_timeout_s
        response: aiohttp.ClientResponse | None = None
        finished = False
        chars_left = request.max_tokens * MAX_CHARS_PER_TOKEN
        try:
            response = await self._post(url, body, request, deadline)
            self._open[response] = None
            got_text = False
            while True:
                try:
                    # Text, not any line, moves the deadline on: a server
                    # sending keep-alive comments or empty deltas after the
                    # first words is stalled all the same.
                    async with asyncio.timeout_at(deadline):
                        line = await response.content.readline()
                except TimeoutError:
                    what = "stalled for" if got_text else "sent no token within"
                    limit = self.stall_timeout_s if got_text else self.first_token_timeout_s
                    raise EngineError(f"LLM server {self.root} {what} {limit} s") from None
                except (aiohttp.ClientError, OSError, HttpProcessingError) as exc:
                    # HttpProcessingError: LineTooLong, one line over aiohttp's
                    # 512 KiB: the answer itself, so not one to send again.
                    again = not isinstance(exc, HttpProcessingError)
                    # LineTooLong's text quotes the line (model output): its type only.
                    detail = type(exc).__name__ if not again else f"{type(exc).__name__}: {str(exc)[:120]}"
                    raise self._cut(response, detail, got_text, again) from exc
                if not line:
                    raise self._cut(response, "connection closed before [DONE]", got_text)
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    finished = True
                    break
                try:
                    chunk = json.loads(data)
                except (ValueError, RecursionError):
                    # The chunk is model output on the caller's conversation:
                    # its text only at DEBUG (the error is logged at ERROR).
                    log.debug("malformed chunk from %s: %r", self.root, data[:200])
                    raise EngineError(f"LLM server {self.root} sent a malformed chunk ({len(data)} bytes)") from None
                text = _absorb(chunk, request.usage, self.root)
                if text:
                    got_text = True
                    chars_left -= len(text)
                    if chars_left < 0:
                        # Closed, not released: the server stops generating.
                        log.warning("LLM server %s went on past max_tokens: reply cut", self.root)
                        break
                    yield text
                    # From when the reader is back: a reply held by its
                    # consumer (a gate, a yield to another call) is not stalled.
                    deadline = loop.time() + self.stall_timeout_s
                ended = _ended_by_engine(chunk)
                if ended is not None:
                    # vLLM ends a reply it drops (a pause, a shutdown, a
                    # scale-down behind the router) with 200, this reason and
                    # [DONE]: a cut reply, for the carry-on and the pool, as
                    # the in-process engine reads it; not a reply that ended.
                    # Before any text, one that may be sent again.
                    what = f"LLM server {self.root} ended the reply itself ({ended})"
                    raise EngineError(what) if got_text else CutBeforeText(what)
        finally:
            if response is not None:
                self._open.pop(response, None)
                if finished:
                    response.release()
                else:
                    # Closing the connection (not returning it to the pool) is
                    # what tells the server to abort the generation.
                    response.close()

    async def _post(
        self, url: str, body: dict[str, Any], request: GenerationRequest, deadline: float
    ) -> aiohttp.ClientResponse:
        """The streaming response, status 200. With ``retry_before_text``, a
        refused connection or a 5xx (nothing was generated yet, so nothing
        is said twice) is tried again after a short backoff for up to
        RETRY_BEFORE_TEXT_S: behind vllm-router, a replica killed a moment
        ago keeps getting its sticky sessions until the router's health
        check marks it down (about a second), then the retry lands on a live
        one. A server that is simply down fails the turn after that, not at
        the first-token deadline."""
        loop = asyncio.get_running_loop()
        give_up = min(deadline, loop.time() + RETRY_BEFORE_TEXT_S)
        backoff = 0.1
        while True:
            try:
                return await self._post_once(url, body, request, deadline)
            except EngineError as exc:
                # Not a connect that timed out: the host is not answering at
                # all, and a second wait only doubled the turn's.
                retryable = isinstance(exc, EngineUnavailable | FailedBeforeText)
                retryable = retryable and not isinstance(exc, ConnectTimedOut)
                if not (self.retry_before_text and retryable) or loop.time() + backoff >= give_up:
                    raise
                log.debug("LLM server %s: %s; retrying in %.1f s", self.root, exc, backoff)
                self.retries += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _post_once(
        self, url: str, body: dict[str, Any], request: GenerationRequest, deadline: float
    ) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._client().post(url, json=body, headers=self._headers(request))
        except aiohttp.ConnectionTimeoutError as exc:
            # A host that drops packets (off, a firewall). Caught before
            # TimeoutError, which it also is: read as the first-token deadline,
            # it left the server "up", and every turn waited and failed.
            self._mark_down()
            raise ConnectTimedOut(
                f"cannot connect to LLM server {self.root} within {self.connect_timeout_s:g} s"
            ) from exc
        except TimeoutError:
            limit = self.first_token_timeout_s
            raise EngineError(f"LLM server {self.root} did not answer within {limit} s") from None
        except aiohttp.ClientConnectorError as exc:
            self._mark_down()
            raise EngineUnavailable(f"cannot connect to LLM server {self.root}: {exc}") from exc
        except aiohttp.ClientError as exc:
            self._mark_down()
            raise FailedBeforeText(f"LLM server {self.root} failed the request: {type(exc).__name__}: {exc}") from exc
        if response.status == 200:
            self.healthy = True  # it answered: up, whatever an earlier request met
            self._answered += 1
            return response
        message = f"LLM server {url} answered HTTP {response.status}"
        detail, kind = await self._error_detail(response, deadline)
        if detail:
            log.debug("request %s: %s says: %s", request.request_id, self.root, detail)
        error: EngineError
        if response.status >= 500:
            self._mark_down()
            error = FailedBeforeText(message)
        elif response.status == 429:
            error = Overloaded(message)
        elif response.status == 400 and says_prompt_too_long(kind, detail):
            error = PromptRefused(f"{message}: the prompt does not fit its context")
        elif response.status in (401, 403, 404):
            self._mark_down()
            error = ServerMisconfigured(f"{message} (its key or model)")
        else:
            error = RequestRefused(message)
        error.detail = detail
        raise error

    async def _error_detail(self, response: aiohttp.ClientResponse, deadline: float) -> tuple[str, str | None]:
        """What an error response says about itself (its JSON error's
        message, else its text), short, and its JSON error's type or code: at
        most ERROR_BODY_BYTES of the body are read, within the request's
        deadline, decoded whatever they hold."""
        raw = b""
        try:
            async with asyncio.timeout_at(deadline):
                raw = await response.content.read(ERROR_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError, HttpProcessingError):
            pass
        finally:
            response.close()  # not released: the rest of the body is not read
        text = raw.decode("utf-8", "replace")
        message = kind = None
        try:
            error = json.loads(text)
            error = error.get("error", error) if isinstance(error, dict) else None
            if isinstance(error, dict):
                message = error.get("message")
                kind = f"{error.get('type')} {error.get('code')}"
        except ValueError:
            pass
        return " ".join(str(message if message else text).split())[:ERROR_DETAIL_CHARS], kind

    @staticmethod
    def _headers(request: GenerationRequest) -> dict[str, str]:
        headers = {"X-Request-Id": request.request_id}
        if request.session_key:
            # vllm-router's sticky_least_loaded (and consistent_hash) key.
            headers["X-Session-ID"] = request.session_key
        return headers

    def end_session(self, session_key: str) -> None:
        if not self._finishes_sessions:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._finish_session(session_key))
        except RuntimeError:
            return  # no loop: the process is shutting down
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish_session(self, session_key: str) -> None:
        url = self.root + "/finish_session"
        try:
            timeout = aiohttp.ClientTimeout(total=self.connect_timeout_s + 1.0, sock_connect=self.connect_timeout_s)
            async with self._client().post(url, params={"session_id": session_key}, timeout=timeout) as r:
                if r.status in (404, 405):
                    # A plain vllm serve / llm.openai_server: nothing to finish, ever.
                    self._finishes_sessions = False
                elif r.status != 200:
                    log.debug("finish_session at %s answered HTTP %d", self.root, r.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("finish_session at %s failed: %s", self.root, exc)

    def _cut(
        self, response: aiohttp.ClientResponse, detail: str, got_text: bool, worth_again: bool = True
    ) -> EngineError:
        """The stream broke. Before any text and ``worth_again`` (not a fault
        of the answer itself), it is a CutBeforeText: sent once more."""
        self._mark_down()
        reason = self._open.get(response)
        if reason is not None:
            return EngineUnavailable(reason)
        if got_text:
            return EngineError(f"stream from LLM server {self.root} cut mid-reply ({detail})")
        what = f"stream from LLM server {self.root} cut before any text ({detail})"
        return CutBeforeText(what) if worth_again else EngineError(what)

    async def close(self) -> None:
        self.healthy = False
        self._closed = True
        if self._recovering is not None:
            self._recovering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovering
        if self._finishing:
            await asyncio.wait(self._finishing, timeout=self.connect_timeout_s + 1.0)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def describe(self) -> dict[str, object]:
        return {"engine": self.name, "url": self.base_url, "model": self.model}


async def _read_at_most(response: aiohttp.ClientResponse, limit: int, url: str) -> bytes:
    """The whole body, or EngineError once it is over ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise EngineError(f"LLM server {url}: an answer of {response.content_length} bytes; the limit is {limit}")
    body = bytearray()
    async for part in response.content.iter_any():
        body += part
        if len(body) > limit:
            raise EngineError(f"LLM server {url}: an answer over {limit} bytes")
    return bytes(body)


# Finish reasons of a reply the engine itself dropped (vLLM: a request it
# aborted, or one that failed inside it).
ENDED_BY_ENGINE = frozenset({"abort", "error"})


def _count(value: Any) -> int:
    """A token count a server sent, believed only as a whole number in
    0..MAX_COUNT (JSON lets a server send -1, NaN, Infinity or a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return int(min(max(value, 0), MAX_COUNT))


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _absorb(chunk: Any, usage: Usage, server: str) -> str:
    """A stream chunk's text, its counts taken into ``usage``. A chunk of
    another shape is an EngineError (a failed reply the pool, the
    supervisor and the carry-on all know), never an AttributeError."""
    if not isinstance(chunk, dict):
        raise EngineError(f"LLM server {server} sent a non-object chunk")
    if chunk.get("error"):
        err = chunk["error"]
        message = err.get("message") if isinstance(err, dict) else err
        # Its words may quote the request (the caller's): DEBUG only, as for
        # an error answer (_post_once).
        error = EngineError(f"LLM server {server} failed mid-reply (its message is logged at DEBUG)")
        error.detail = str(message)[:ERROR_DETAIL_CHARS]
        log.debug("LLM server %s failed mid-reply: %s", server, error.detail)
        raise error
    u = _object(chunk.get("usage"))
    if u:
        usage.prompt_tokens = _count(u.get("prompt_tokens"))
        usage.completion_tokens = _count(u.get("completion_tokens"))
        usage.cached_tokens = _count(_object(u.get("prompt_tokens_details")).get("cached_tokens"))
    timings = _object(chunk.get("timings"))  # llama.cpp server and llm.openai_server: speculation counters
    if timings and not u and "cache_n" in timings:
        # The prompt's cache hit, before the usage chunk (a reply read only
        # up to its sentence cap never gets that far).
        usage.cached_tokens = _count(timings["cache_n"])
        usage.prompt_tokens = usage.cached_tokens + _count(timings.get("prompt_n"))
    if timings and "draft_n" in timings:
        usage.draft_tokens = _count(timings.get("draft_n"))
        usage.accepted_tokens = min(_count(timings.get("draft_n_accepted")), usage.draft_tokens)
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise EngineError(f"LLM server {server} sent a chunk whose choices are not a list")
    parts = []
    for choice in choices:
        content = _object(_object(choice).get("delta")).get("content")
        if content is not None and not isinstance(content, str):
            raise EngineError(f"LLM server {server} sent a chunk whose content is not a string")
        if content:
            parts.append(content)
    return "".join(parts)


def _ended_by_engine(chunk: dict[str, Any]) -> str | None:
    """The finish reason of a chunk whose reply the engine dropped, else None."""
    for choice in chunk.get("choices") or []:
        reason = _object(choice).get("finish_reason")
        if isinstance(reason, str) and reason in ENDED_BY_ENGINE:
            return reason
    return None


def _score(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{url}".encode(), digest_size=8).digest(), "big")


def session_key_of(request: GenerationRequest) -> str:
    """The call id when the session set one; otherwise a digest of the system
    prompt and the first user message, which stay the same for every turn of
    a call (a digest: the keys are kept, thousands of them, and a prompt may
    be megabytes)."""
    if request.session_key:
        return request.session_key
    return hashlib.blake2b(json.dumps(request.messages[:2], sort_keys=True).encode(), digest_size=16).hexdigest()


class RemotePool(LLMEngine):
    name = "pool"

    def __init__(self, replicas: list[RemoteEngine], health_interval_s: float = 1.0, name: str = "pool") -> None:
        if not replicas:
            raise ValueError("a pool needs at least one replica")
        self.replicas = replicas
        self.health_interval_s = health_interval_s
        self.name = name
        self.failovers = 0  # requests moved off a failed replica
        self._pins: OrderedDict[str, int] = OrderedDict()
        self._health_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, urls: list[str], config: LLMConfig, name: str = "pool") -> RemotePool:
        replicas = [RemoteEngine.from_config(u, config, retry_before_text=False) for u in urls]
        return cls(replicas, health_interval_s=config.health_interval_s, name=name)

    @property
    def available(self) -> bool:
        return any(r.healthy for r in self.replicas)

    async def start(self) -> None:
        results = await asyncio.gather(*(r.start() for r in self.replicas), return_exceptions=True)
        for replica, result in zip(self.replicas, results, strict=True):
            if isinstance(result, BaseException):
                replica.healthy = False
                log.warning("replica %s not available at start: %s", replica.base_url, result)
        if not self.available:
            raise EngineUnavailable(
                "no replica of the LLM pool is available: " + "; ".join(str(r) for r in results if r is not None)
            )
        self.await_server()

    def await_server(self) -> None:
        """Watch the replicas' /health (from start; or after a start that
        found none up, which the health loop then brings in as they answer,
        each asked for its model then)."""
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.create_task(self._health_loop(), name=f"{self.name}-health")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            # All at once: one after another, a replica whose host drops
            # packets (up to ~6 s a check) kept a recovered one out that long.
            was = [replica.healthy for replica in self.replicas]
            results = await asyncio.gather(*(r.check_health() for r in self.replicas), return_exceptions=True)
            for replica, was_up, result in zip(self.replicas, was, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("replica %s: health check failed (%s)", replica.base_url, type(result).__name__)
                ok = result is True
                if ok and replica.model is None:
                    try:
                        replica.model = await replica._resolve_model()
                    except Exception as exc:  # whatever a replica answers, the loop goes on for the others
                        log.warning("replica %s: model not resolved (%s)", replica.base_url, type(exc).__name__)
                if ok != was_up:
                    log.warning("replica %s is %s", replica.base_url, "back" if ok else "down")

    def pinned(self, key: str) -> RemoteEngine | None:
        index = self._pins.get(key)
        return None if index is None else self.replicas[index]

    def _pin(self, key: str, index: int) -> None:
        self._pins[key] = index
        self._pins.move_to_end(key)
        while len(self._pins) > MAX_PINS:
            self._pins.popitem(last=False)

    def order(self, key: str) -> list[int]:
        """Replicas to try for ``key``: its pinned one if healthy, then the
        healthy ones by rendezvous hash, then the unhealthy ones (last resort:
        health may lag behind a recovery)."""
        ranked = sorted(range(len(self.replicas)), key=lambda i: _score(key, self.replicas[i].base_url), reverse=True)
        pinned = self._pins.get(key)
        if pinned is not None and self.replicas[pinned].healthy:
            ranked.remove(pinned)
            ranked.insert(0, pinned)
        return [i for i in ranked if self.replicas[i].healthy] + [i for i in ranked if not self.replicas[i].healthy]

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        key = session_key_of(request)
        errors: list[str] = []
        order = self.order(key)
        healthy = [i for i in order if self.replicas[i].healthy]
        if healthy:
            # After the healthy ones, one replica marked down as a last resort
            # (health may lag behind a recovery), not every one: each dead one
            # cost the turn its connect timeout more. The call's own first:
            # its prompt is in that one's cache.
            down = [i for i in order if i not in healthy]
            pinned = self._pins.get(key)
            if pinned in down:
                down.remove(pinned)
                down.insert(0, pinned)
            order = healthy + down[:1]
        for attempt, index in enumerate(order):
            replica = self.replicas[index]
            if attempt:
                self.failovers += 1
                request.usage = Usage()
            started = False
            try:
                async with contextlib.aclosing(replica.stream(request)) as stream:  # see RemoteEngine._stream
                    async for delta in stream:
                        if not started:
                            started = True
                            self._pin(key, index)
                        yield delta
                self._pin(key, index)
                return
            except RequestRefused:
                raise  # the request, not the replica: every replica would refuse it
            except EngineError as exc:
                if not isinstance(exc, Overloaded):  # busy, not down
                    replica.healthy = False
                if started:
                    # Text already went out: another replica cannot take it back.
                    raise
                log.warning("replica %s failed (%s); trying the next", replica.base_url, exc)
                errors.append(str(exc))
        raise EngineUnavailable("no LLM replica could serve the request: " + "; ".join(errors))

    async def sentence_end_probability(self, messages: list[dict[str, str]], session_key: str | None = None) -> float:
        # The call's own replica (its prefix cache holds this prompt); no
        # failover: a probe that fails only costs the pause its LLM input.
        index = self.order(session_key or "")[0]
        try:
            return await self.replicas[index].sentence_end_probability(messages, session_key)
        except SentenceEndUnsupported:
            if not any(r.scores_sentence_end for r in self.replicas):
                raise
            # One replica that cannot (another server, mid rolling upgrade):
            # unsupported would switch the probe off for every call of this
            # process for good; this pause goes without it.
            raise EngineError(f"LLM replica {self.replicas[index].root} cannot score where a sentence ends") from None

    def end_session(self, session_key: str) -> None:
        index = self._pins.pop(session_key, None)
        if index is not None:
            self.replicas[index].end_session(session_key)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(r.close() for r in self.replicas))

    def describe(self) -> dict[str, object]:
        return {
            "engine": self.name,
            "replicas": [r.base_url for r in self.replicas],
            "healthy": [r.healthy for r in self.replicas],
        }
