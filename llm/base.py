"""The one interface every LLM engine implements.

A call session never knows which engine answers it: it builds a
:class:`GenerationRequest`, iterates :meth:`LLMEngine.stream` for text deltas
and cancels the consuming task (or closes the iterator) to abort. Every engine
must free the request in the engine on cancellation, so a barge-in or a
hang-up costs no further compute.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import InitVar, dataclass, field
from typing import TypeVar

from llm.sampling import SamplingParams, sampling_alias

_T = TypeVar("_T")


@dataclass
class Usage:
    """Token counts for one generation; filled in by the engine as it streams."""

    prompt_tokens: int = 0
    # Prompt tokens served from the engine's prefix cache (not recomputed).
    cached_tokens: int = 0
    completion_tokens: int = 0
    # Speculative decoding: tokens proposed by the drafter and how many the
    # target model accepted. Zero when speculation is off.
    draft_tokens: int = 0
    accepted_tokens: int = 0
    # Times the reply was carried on after its engine died mid-stream (llm/continuation.py).
    continuations: int = 0
    # Times the reply stepped aside for other calls' first sentences (llm/yielding.py).
    yields: int = 0
    # Prompt tokens that the reply's later parts (a continuation after a
    # yield or a dead engine) computed, beyond the cache; prompt_tokens and
    # cached_tokens are the first part's.
    later_parts_prompt_computed: int = 0

    @property
    def prompt_computed(self) -> int:
        """Prompt tokens the engine computed for this request (all its parts),
        not served from its prefix cache: with completion_tokens, the work."""
        return max(0, self.prompt_tokens - self.cached_tokens) + self.later_parts_prompt_computed

    @property
    def acceptance_rate(self) -> float | None:
        if self.draft_tokens == 0:
            return None
        return self.accepted_tokens / self.draft_tokens

    def as_dict(self) -> dict[str, int | float | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "continuations": self.continuations,
            "yields": self.yields,
        }


@dataclass
class GenerationRequest:
    """One reply to generate. ``messages`` are OpenAI-style chat messages,
    system prompt first, history in order, the caller's turn last.

    ``sampling`` is everything the engine samples with; callers pass the
    server's defaults (``config.llm.sampling``), merged with any per-call
    overrides. ``max_tokens`` and ``temperature`` are the older spellings:
    given (not None), they override the same fields of ``sampling``, and
    ``request.max_tokens`` / ``request.temperature`` read them back."""

    request_id: str
    messages: list[dict[str, str]]
    max_tokens: InitVar[int | None] = None
    temperature: InitVar[float | None] = None
    usage: Usage = field(default_factory=Usage)
    # Stable per call (the call id): a replica pool pins every request of one
    # call to the same replica, so that replica's prefix cache stays hot.
    session_key: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The last message is the start of the assistant's reply, to be carried
    # on from (not answered): a reply whose engine died mid-stream goes on
    # on the next one from what was already said (voice/call/turn.py).
    continue_final: bool = False

    def __post_init__(self, max_tokens: int | None, temperature: float | None) -> None:
        self.sampling = self.sampling.merged({"max_tokens": max_tokens, "temperature": temperature})


GenerationRequest.max_tokens = sampling_alias("max_tokens")  # type: ignore[assignment,method-assign]
GenerationRequest.temperature = sampling_alias("temperature")  # type: ignore[assignment,method-assign]


class EngineError(RuntimeError):
    """The engine failed to produce a reply (not a cancellation)."""

    # The ``error`` event code a turn that fails with this sends the caller.
    code = "llm_failed"
    # What an upstream server said about its refusal, kept out of the
    # message: a server may quote the request (the caller's words) back, and
    # the message reaches WARNING/ERROR logs. Logged at DEBUG where it is read.
    detail: str = ""
    # The request itself was refused (its prompt, a field): sent again it
    # gets the same answer, so nothing retries it (a reply cut mid-way is
    # not carried on with it, llm/continuation.py).
    refused: bool = False


class PromptTooLong(EngineError):
    """The prompt leaves the reply no room in the engine's context: the
    request's fault, not the engine's (it is not marked down, no other
    replica is tried); the call's token budget grows more careful
    (voice/call/session.py, token_scale)."""

    refused = True


def says_prompt_too_long(kind: object, message: object) -> bool:
    """An engine's or server's error type and message say the prompt did not
    fit its context: llama.cpp (``exceed_context_size_error``, "exceeds the
    available context size"), vLLM ("This model's maximum context length
    is", "longer than the maximum model length"), OpenAI
    (``context_length_exceeded``)."""
    text = f"{kind} {message}".lower()
    return any(k in text for k in _PROMPT_TOO_LONG)


_PROMPT_TOO_LONG = ("exceed_context_size", "context_length_exceeded", "context size", "context length", "model length")


class SentenceEndUnsupported(EngineError):
    """This engine has no next-token probabilities to offer (asked once; the
    end-of-turn policy then goes on without them)."""


class EngineUnavailable(EngineError):
    """No engine can take the request right now (the supervised engine is
    restarting and no secondary is configured, or every replica is down)."""

    code = "llm_unavailable"


class LLMEngine(abc.ABC):
    """An engine is started once per process and shared by every call."""

    name: str = "abstract"

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and run one warm-up generation. Returns when warm."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Yield text deltas as the model produces them.

        Cancelling the consumer (or ``aclose()``) aborts the request inside the
        engine. ``request.usage`` is complete once iteration ends.
        """

    async def warm_up(self, head: list[dict[str, str]]) -> None:
        """One real generation before readiness: the first step pays for lazy
        allocations (and JIT, for some drafters), and ``head`` (the system
        prompt and example turns every prompt starts with,
        LLMConfig.prompt_head) lands in the prefix cache, so the first caller
        is served as fast as the tenth."""
        request = GenerationRequest("warmup", [*head, {"role": "user", "content": "Hello?"}], max_tokens=8)
        async for _ in self.stream(request):
            pass

    async def prefill(self, messages: list[dict[str, str]], session_key: str | None = None) -> Usage:
        """Compute (and cache) the prompt for ``messages`` without keeping any
        output: a one-token generation; returns its usage. Engines with automatic prefix caching
        (llama.cpp slots, vLLM APC) then serve the real request's shared
        prefix from cache."""
        request = GenerationRequest(f"prefill-{id(messages)}", messages, max_tokens=1, session_key=session_key)
        async for _ in self.stream(request):
            pass
        return request.usage

    async def sentence_end_probability(self, messages: list[dict[str, str]], session_key: str | None = None) -> float:
        """P(the caller's sentence ends after the last (user) message's
        words), an end-of-turn input: the model's mass on ". ? !" or its
        end-of-message token next (llm/sentence_end.py). Raises
        :class:`SentenceEndUnsupported` where this engine cannot say (a
        remote server that is not firstline's own)."""
        raise SentenceEndUnsupported(f"the {self.name} engine cannot score where a sentence ends")

    def end_session(self, session_key: str) -> None:
        """The call behind ``session_key`` ended: an engine that keeps
        per-call state elsewhere (a router's session table, a pool's pin)
        lets it go. Never blocks and never raises: a hang-up must not wait
        on the LLM tier."""
        return None

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raise :class:`EngineError` if this engine cannot honour ``sampling``
        (e.g. DRY on vLLM), so a server can refuse the request up front
        instead of sampling differently from what was asked. The base
        engine (llama.cpp, remote servers) takes every field."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the engine (threads, processes, memory)."""

    def lingering_requests(self) -> int:
        """Requests whose caller has gone (a barge-in, a timed-out probe) that
        still hold the engine's compute: llama.cpp finishes a prompt pass it
        began. The base engine stops a request when its caller goes: 0."""
        return 0

    def describe(self) -> dict[str, object]:
        """Model, device and speculation settings, for logs and benchmarks."""
        return {"engine": self.name}

    # (first token, each next words) in seconds: set by llm/engines.py
    # build_engine on an engine in the voice process, where no HTTP deadline
    # (RemoteEngine's) bounds a request; None elsewhere (the engine child,
    # whose client has that deadline; benchmarks).
    stream_limits: tuple[float, float] | None = None

    def within_limits(self, stream: AsyncGenerator[str, None], warm: bool, who: str) -> AsyncIterator[str]:
        """``stream`` bounded by :attr:`stream_limits` once the engine is
        ``warm`` (the warm-up's first step pays for lazy allocations)."""
        if self.stream_limits is None or not warm:
            return stream
        return within_time(stream, *self.stream_limits, who)

    async def answer_within_limits(self, answer: Awaitable[_T], warm: bool, who: str) -> _T:
        """One short answer (a sentence-end probe) bounded as a reply's first
        token is, once its kind is ``warm`` (the first probe compiles and
        allocates what the warm-up's reply did not need): a wedged engine
        fails the probe, and the cancel frees it in the engine (or drops it
        from the queue), instead of holding the call's one probe slot for good."""
        if self.stream_limits is None or not warm:
            return await answer
        limit = self.stream_limits[0]
        try:
            async with asyncio.timeout(limit):
                return await answer
        except TimeoutError:
            raise EngineError(f"{who} gave no answer within {limit:g} s") from None


async def within_time(
    stream: AsyncGenerator[str, None], first_token_s: float, stall_s: float, who: str
) -> AsyncIterator[str]:
    """``stream``, failed with :class:`EngineError` when its first words take
    longer than ``first_token_s`` or the next ones longer than ``stall_s``
    (time spent waiting on the engine: a delta its consumer holds does not
    count). A wedged engine fails its turn instead of hanging it, and the
    cancel frees the request in the engine."""
    loop = asyncio.get_running_loop()
    limit, what = first_token_s, "produced no token within"
    try:
        while True:
            try:
                async with asyncio.timeout_at(loop.time() + limit):
                    delta = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise EngineError(f"{who} {what} {limit:g} s") from None
            yield delta
            if delta:
                limit, what = stall_s, "stalled for"
    finally:
        await stream.aclose()
