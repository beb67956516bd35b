"""A reply that survives its engine dying mid-stream.

Without this, a SIGKILL of the engine (or of a replica behind the router)
in the middle of a reply loses the turn: the caller hears the sentences
already sent and then nothing. :func:`stream_continuing` instead asks the
next engine (the restarted child, the secondary, another replica) to carry
the reply on from the text already generated: that text becomes the start
of the assistant's message (``continue_final``: vLLM's
``continue_final_message``; llama.cpp continues a final assistant message),
so the caller hears at most a pause, and no sentence twice.

Only a stream cut *after* some text is carried on; one that fails before
any text is the engine's to retry (RemoteEngine) or the turn's to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from llm.base import EngineError, EngineUnavailable, GenerationRequest, LLMEngine, PromptTooLong
from llm.remote_engine import FailedBeforeText, ServerMisconfigured

log = logging.getLogger(__name__)

# Cuts carried on per reply: an engine that keeps dying ends the reply.
MAX_CONTINUATIONS = 2
# How long a continuation waits for an engine to come back (a supervised
# child restarts in about a second; a router marks a dead replica down
# within its health interval).
WAIT_S = 10.0
RETRY_EVERY_S = 0.2


def continuation_of(request: GenerationRequest, said: str, deltas: int, n: int, tag: str = "c") -> GenerationRequest:
    """The request that carries ``request``'s reply on after ``said`` (which
    came as ``deltas`` streamed pieces, about a token each: a cut stream
    never sent its usage). ``tag`` names why, in the request id. A request
    that itself carries a reply on (a part after a yield) has its
    assistant message grown by ``said``, not a second one after it.
    The tokens already spent are the engine's count where it gave one: with
    speculative decoding a piece carries several tokens, and counting pieces
    let every continuation overrun max_tokens."""
    left = max(1, request.sampling.max_tokens - max(deltas, request.usage.completion_tokens))
    messages = request.messages
    if request.continue_final and messages and messages[-1].get("role") == "assistant":
        messages, said = messages[:-1], messages[-1]["content"] + said
    return GenerationRequest(
        f"{request.request_id}-{tag}{n}",
        [*messages, {"role": "assistant", "content": said}],
        sampling=request.sampling.merged({"max_tokens": left}),
        session_key=request.session_key,
        continue_final=True,
    )


async def stream_continuing(
    engine: LLMEngine,
    request: GenerationRequest,
    wait_s: float = WAIT_S,
    max_continuations: int = MAX_CONTINUATIONS,
    refit: Callable[[], list[dict[str, str]]] | None = None,
) -> AsyncIterator[str]:
    """``engine.stream(request)``, carried on from what it said if it is cut
    mid-reply. ``request.usage`` ends up counting every part's completion
    tokens and ``request.usage.continuations`` the cuts carried on. A prompt
    the engine's context cannot hold is sent once more as ``refit()``
    rebuilds it (the call's budget made smaller), instead of failing the
    turn."""
    said = ""
    deltas = 0
    current = request
    deadline: float | None = None
    while True:
        got_text = False
        part_deltas = 0
        try:
            async with contextlib.aclosing(engine.stream(current)) as stream:
                async for delta in stream:
                    got_text = True
                    said += delta
                    deltas += 1
                    part_deltas += 1
                    yield delta
            return
        except EngineError as exc:
            if isinstance(exc, PromptTooLong) and not said and refit is not None:
                request.messages = refit()
                refit = None  # once: a prompt that still does not fit fails the turn
                log.warning("%s: the prompt did not fit the engine's context; sent again shorter", request.request_id)
                continue
            # A part that carries a reply on (after a yield) had its reply
            # said before it: an engine it cannot reach when it starts (a
            # child restarting while the reply stood aside, a busy or failing
            # server, a stream cut before text) is waited for as a cut
            # mid-reply is (the caller heard the first sentence, then
            # silence and no failure line). Not a server that refuses every
            # request, nor an answer that would come back the same (a
            # malformed one).
            gone = (
                request.continue_final
                and isinstance(exc, EngineUnavailable | FailedBeforeText)
                and not isinstance(exc, ServerMisconfigured)
            )
            if not (said or gone) or exc.refused:
                # A refused continuation (a server without continue_final_message,
                # a prompt plus what was said past the context) would be
                # refused again every RETRY_EVERY_S until wait_s: silence.
                # A part that carries a reply on (after a yield) is carried
                # on like any: most of a stepping-aside reply is such parts.
                raise
            now = time.monotonic()
            if got_text or deadline is None:  # a new cut
                if request.usage.continuations >= max_continuations:
                    raise
                request.usage.continuations += 1
                deadline = now + wait_s
                log.warning(
                    "%s: engine failed mid-reply (%s); carrying the reply on (%d characters said)",
                    request.request_id, exc, len(said),
                )  # fmt: skip
            elif now >= deadline:
                raise
            else:
                await asyncio.sleep(RETRY_EVERY_S)  # no engine yet: the restart is under way
        finally:
            # A part cut mid-stream never got its usage: its pieces, about a token each.
            tokens = current.usage.completion_tokens or part_deltas
            if current is not request:
                request.usage.completion_tokens += tokens
                request.usage.later_parts_prompt_computed += current.usage.prompt_computed
            elif not request.usage.completion_tokens:
                request.usage.completion_tokens = tokens
        current = continuation_of(request, said, deltas, request.usage.continuations)
