"""llama.cpp engine (via the prebuilt `xllamacpp` wheel): the embedded CPU default.

xllamacpp runs llama.cpp's own server loop in-process: continuous batching
across ``parallel`` slots, prompt (prefix) caching per slot, and ngram
speculation with draft/accept counters. A request is a blocking call that
invokes a callback per streamed chunk; returning True from the callback
cancels the request inside llama.cpp, which is how barge-in frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llm.base import (
    EngineError,
    GenerationRequest,
    LLMEngine,
    PromptTooLong,
    SentenceEndUnsupported,
    says_prompt_too_long,
)
from llm.config import LLMConfig
from llm.sentence_end import TOP_TOKENS, GGUFChatTemplate, open_prompt, sentence_end_mass
from streaming.threads import name_os_thread

log = logging.getLogger(__name__)

_SPECULATION_TYPES = {
    "none": "COMMON_SPECULATIVE_TYPE_NONE",
    "ngram": "COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE",
    "draft_model": "COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE",
    "eagle3": "COMMON_SPECULATIVE_TYPE_DRAFT_EAGLE3",
    "mtp": "COMMON_SPECULATIVE_TYPE_DRAFT_MTP",
}

_DONE = object()


def check_speculation(config: LLMConfig) -> None:
    """The speculation llama.cpp cannot run, said before any model loads
    (the supervisor asks in the voice server: its child only exited while
    starting, and the reason was the child's)."""
    spec = config.speculation
    if spec.method == "none":
        return
    if spec.method not in _SPECULATION_TYPES:
        raise EngineError(f"llama.cpp does not support speculation method {spec.method!r}")
    if spec.method != "ngram" and not spec.draft_model:
        raise EngineError(f"speculation {spec.method!r} needs speculation.draft_model")


class _ThreadWork:
    """One request's work on a llama.cpp thread, counted as lingering once its
    caller has gone while the thread still runs it (llama.cpp looks at the
    cancel only between chunks, so a prompt pass it began runs to its end).
    A copy so busy is not idle to llm/replicas.py's balancer."""

    def __init__(self, engine: LlamaCppEngine, cancelled: threading.Event | None = None) -> None:
        self.engine = engine
        self.cancelled = cancelled
        self.started = self.done = self.left = False

    def begin(self) -> bool:
        """In the thread: False if the caller left before it started."""
        with self.engine._work_lock:
            if self.cancelled is not None and self.cancelled.is_set():
                return False
            self.started = True
            return True

    def end(self) -> None:
        """In the thread, however the call into llama.cpp ended."""
        with self.engine._work_lock:
            self.done = True
            if self.left:
                self.engine._lingering -= 1

    def leave(self) -> None:
        """On the loop: the caller has gone (the cancel is set here, under the
        same lock as begin's check, so no start slips between the two)."""
        with self.engine._work_lock:
            if self.cancelled is not None:
                self.cancelled.set()
            if self.started and not self.done and not self.left:
                self.left = True
                self.engine._lingering += 1


def resolve_gguf(model: str | None, embedded_quant: str | None = None) -> Path:
    """The GGUF to load: ``model``, or the embedded one (requantized to
    ``embedded_quant`` once, cached: llm/models.py)."""
    if model is None:
        from llm.models import embedded_gguf_path, requantized_gguf

        shipped = embedded_gguf_path()
        return requantized_gguf(shipped, embedded_quant) if embedded_quant else shipped
    path = Path(model).expanduser()
    if not path.is_file():
        raise EngineError(f"llama.cpp needs a GGUF file; {path} does not exist")
    return path


class LlamaCppEngine(LLMEngine):
    name = "llamacpp"

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        quant = config.embedded_quant if config.device == "cpu" else None
        self.model_path = resolve_gguf(config.model, quant)
        self._server: Any = None
        self._template: asyncio.Future[GGUFChatTemplate] | None = None  # read from the GGUF once
        self._probed = False  # a probe has answered: the next ones are bounded
        # One thread per llama.cpp slot: each blocking request holds a thread
        # until it finishes or is cancelled.
        self._pool = ThreadPoolExecutor(
            max_workers=config.parallel,
            thread_name_prefix="llamacpp",
            initializer=name_os_thread,
            initargs=("llamacpp",),
        )
        self.startup_s: float | None = None
        self._work_lock = threading.Lock()
        self._lingering = 0  # _ThreadWork

    def lingering_requests(self) -> int:
        return self._lingering

    def _params(self) -> Any:
        import xllamacpp

        cfg = self.config
        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.n_ctx = cfg.context_tokens * cfg.parallel  # llama.cpp splits n_ctx across slots
        params.n_parallel = cfg.parallel
        params.cpuparams.n_threads = cfg.threads
        params.cpuparams_batch.n_threads = cfg.threads
        params.cpuparams.poll = cfg.thread_poll
        params.cpuparams_batch.poll = cfg.thread_poll
        params.n_gpu_layers = 999 if cfg.device == "cuda" else 0
        params.warmup = True
        params.cache_prompt = True
        params.cache_ram_mib = cfg.prompt_cache_ram_mib
        if cfg.slot_choice == "lru-restore" and cfg.prompt_cache_ram_mib > 0:
            # Similarity 0 sends every request down llama.cpp's LRU path,
            # which saves the slot it takes and restores the request's best
            # saved prompt (LLMConfig.slot_choice says why).
            params.slot_prompt_similarity = 0.0
        # llama.cpp logs every slot event at the default verbosity; keep errors.
        params.verbosity = -1
        spec = cfg.speculation
        check_speculation(cfg)
        if spec.method != "none":
            params.speculative.types = [getattr(xllamacpp.common_speculative_type, _SPECULATION_TYPES[spec.method])]
            if spec.method == "ngram":
                params.speculative.ngram_simple.size_n = spec.ngram_max
                params.speculative.ngram_simple.size_m = spec.num_tokens * 2
            else:
                params.speculative.draft.mparams.path = spec.draft_model
                params.speculative.draft.n_max = spec.num_tokens
        return params

    async def start(self) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()

        def build() -> Any:
            import xllamacpp

            return xllamacpp.Server(self._params())

        self._server = await loop.run_in_executor(self._pool, build)
        await self.warm_up(self.config.prompt_head())
        if self.config.score_sentence_ends:
            # Now, not at the first caller's pause: parsing the GGUF's
            # metadata takes seconds. A model without a template scores nothing.
            with contextlib.suppress(SentenceEndUnsupported):
                await self._chat_template()
        self.startup_s = time.perf_counter() - started
        log.info("llama.cpp engine warm in %.2f s (%s)", self.startup_s, self.model_path.name)

    async def warm_up(self, head: list[dict[str, str]]) -> None:
        """The one real generation, then ``head`` into every slot.
        llama.cpp caches a prompt per slot and turns that arrive together
        land on different slots: a slot that never held the system prompt
        computes it in full (~60 tokens) for a call's first turn
        (tests/test_llamacpp_engine.py sends turns to a fresh engine at
        once and checks each finds it cached). One prefill pinned to each slot
        (``id_slot``) puts it in each; concurrent prefills would not, as a
        quick one frees its slot before the last is assigned."""
        await super().warm_up(head)
        messages = [*head, {"role": "user", "content": "Hello?"}]
        body = {"messages": messages, "max_tokens": 1, "cache_prompt": True}
        loop = asyncio.get_running_loop()
        for slot in range(self.config.parallel):
            result = await loop.run_in_executor(
                self._pool, self._server.handle_chat_completions, {**body, "id_slot": slot}
            )
            if not isinstance(result, dict) or "error" in result:
                raise EngineError(f"llama.cpp warm-up of slot {slot}: {result!r:.200}")

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self.within_limits(self._stream(request), self.startup_s is not None, "the llama.cpp engine")

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._server is None:
            raise EngineError("engine not started")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()
        body = {
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            # Timings on every chunk, not only the last: a reply stopped early
            # (its sentence cap, barge-in) never gets the final usage chunk,
            # and the first chunk's say how much of the prompt was cached.
            "timings_per_token": True,
            # Every sampling field, in llama.cpp's names: nothing falls back
            # to llama.cpp's own defaults (top_k 40, no repeat penalty, ...).
            **request.sampling.to_llamacpp(self.config.context_tokens),
        }

        def on_chunk(chunk: Any) -> bool:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            return cancelled.is_set()

        work = _ThreadWork(self, cancelled)

        def run() -> None:
            try:
                # Cancelled while queued for a slot's thread (a preemptive
                # turn the caller talked over): no prefill at all.
                if work.begin():
                    try:
                        self._server.handle_chat_completions(body, on_chunk)
                    finally:
                        work.end()
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._pool, run)
        try:
            while True:
                chunk = await queue.get()
                if chunk is _DONE:
                    break
                text = self._absorb(chunk, request)
                if text:
                    yield text
            await future  # surfaces an exception raised inside the call
        finally:
            # Barge-in / hang-up: the next callback returns True, which makes
            # llama.cpp drop the request and free its slot; one still queued
            # for the pool never starts.
            work.leave()
            future.cancel()

    @staticmethod
    def _absorb(chunk: Any, request: GenerationRequest) -> str:
        if not isinstance(chunk, dict):
            # Its type only: the chunk may hold model output (logged with the error).
            raise EngineError(f"unexpected llama.cpp chunk of type {type(chunk).__name__}")
        if "error" in chunk or (chunk.get("code", 200) >= 400 and "message" in chunk):
            error = chunk.get("error") or chunk
            kind, message = (error.get("type"), error.get("message")) if isinstance(error, dict) else (None, error)
            failure = PromptTooLong if says_prompt_too_long(kind, message) else EngineError
            refusal = failure(f"llama.cpp: {message}")
            code = error.get("code") if isinstance(error, dict) else chunk.get("code")
            # A 4xx is the request's (its messages, a field), not the engine's.
            refusal.refused = refusal.refused or (isinstance(code, int) and 400 <= code < 500)
            raise refusal
        usage = chunk.get("usage")
        if usage:
            request.usage.prompt_tokens = usage.get("prompt_tokens", 0)
            request.usage.completion_tokens = usage.get("completion_tokens", 0)
            request.usage.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        timings = chunk.get("timings")
        if timings and "cache_n" in timings and not usage:
            request.usage.cached_tokens = timings["cache_n"]
            request.usage.prompt_tokens = timings["cache_n"] + timings.get("prompt_n", 0)
            request.usage.completion_tokens = timings.get("predicted_n", request.usage.completion_tokens)
        if timings and "draft_n" in timings:
            request.usage.draft_tokens = timings.get("draft_n", 0)
            request.usage.accepted_tokens = timings.get("draft_n_accepted", 0)
        text = []
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                text.append(content)
        return "".join(text)

    async def sentence_end_probability(self, messages: list[dict[str, str]], session_key: str | None = None) -> float:
        if self._server is None:
            raise EngineError("engine not started")
        template = await self._chat_template()
        prompt = open_prompt(template.render, messages)
        body = {"prompt": prompt, "n_predict": 1, "n_probs": TOP_TOKENS, "temperature": 0, "cache_prompt": True}

        work = _ThreadWork(self)

        def run() -> Any:
            work.begin()
            try:
                return self._server.handle_completions(body)
            finally:
                work.end()

        answer = asyncio.get_running_loop().run_in_executor(self._pool, run)
        try:
            result = await self.answer_within_limits(answer, self._probed, "llama.cpp sentence-end probe")
        finally:
            work.leave()  # timed out or cancelled: the thread runs the probe to its end
        if not isinstance(result, dict) or "error" in result:
            raise EngineError(f"llama.cpp: {result.get('error') if isinstance(result, dict) else result!r:.200}")
        self._probed = True
        top = result["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return sentence_end_mass(((t.get("token", ""), t.get("id"), t["logprob"]) for t in top), template.end_ids)

    async def _chat_template(self) -> GGUFChatTemplate:
        """The GGUF's chat template, read once off the event loop (the first
        caller waits for it; concurrent callers share the one read)."""
        if self._template is None:
            self._template = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(self._pool, GGUFChatTemplate, self.model_path)
            )
        try:
            return await asyncio.shield(self._template)
        except Exception as exc:  # no template, no gguf package: the policy goes on without it
            raise SentenceEndUnsupported(f"{self.model_path.name}: {exc}") from exc

    async def close(self) -> None:
        self._server = None  # the C++ server shuts down when released
        self._pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, object]:
        return {
            "engine": self.name,
            "model": str(self.model_path),
            "device": self.config.device,
            "threads": self.config.threads,
            "parallel": self.config.parallel,
            "speculation": self.config.speculation.method,
        }
