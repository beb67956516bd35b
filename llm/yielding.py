"""A reply that steps aside for other calls' first sentences.

Once a reply's first sentence is out, its caller has seconds of speech to
hear before the next one is needed, while another call may be waiting for
its own first sentence (its TTFS) on the same engine and the same cores.
:func:`stream_yielding` then stops generating (the request is cancelled
inside the engine, which frees its place in the batch), waits until no
call waits for a first sentence or until the sentence said so far is
nearly heard, and carries the reply on from the text already generated
(``continue_final``, as llm/continuation.py does for an engine that died):
the caller hears the same reply, with no sentence twice. The prefix cache
holds the prompt and the text said, so carrying on costs a few tokens of
prefill, not the whole prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from llm.base import GenerationRequest, LLMEngine
from llm.continuation import continuation_of, stream_continuing

# Most times a reply steps aside: each costs a cancelled request and a short prefill.
MAX_YIELDS = 4
# How long the sentences already out take to say: a brisk 200 words a
# minute, so the estimate errs early. The reply carries on this margin
# before they end: the next sentence still has to be generated, on a
# loaded engine, and reach the TTS. With 0.3 s, 13 of 31 later sentences
# at 12 calls came after the caller had heard the ones before them
# (benchmarks/results/bench, 3b76549).
SECONDS_PER_WORD = 0.3
MARGIN_S = 1.0
MAX_HOLD_S = 3.0
# A reply does not step aside for less than this.
MIN_HOLD_S = 0.2


def hold_s(words_out: int, first_out_at: float | None, now: float) -> float:
    """How long a reply may stand aside: until the words already out (the
    first of them sent at ``first_out_at``; None: held, not yet sent) are
    nearly said."""
    start = now if first_out_at is None else first_out_at
    return max(0.0, min(MAX_HOLD_S, start + words_out * SECONDS_PER_WORD - MARGIN_S - now))


async def stream_yielding(
    engine: LLMEngine,
    request: GenerationRequest,
    should_yield: Callable[[], bool],
    step_aside: Callable[[], Awaitable[None]],
    max_yields: int = MAX_YIELDS,
    refit: Callable[[], list[dict[str, str]]] | None = None,
) -> AsyncIterator[str]:
    """``stream_continuing(engine, request)``, except that after every delta
    the consumer has handled, ``should_yield()`` may stop the generation;
    ``step_aside()`` is awaited and the reply carries on. ``request.usage``
    counts every part's tokens; ``request.usage.yields`` the times it
    stepped aside. ``refit``: as for stream_continuing (the first part)."""
    said = ""
    deltas = 0
    part = request
    while True:
        stepped = False
        try:
            first_part = refit if part is request else None
            async with contextlib.aclosing(stream_continuing(engine, part, refit=first_part)) as stream:
                async for delta in stream:
                    said += delta
                    deltas += 1
                    yield delta
                    if request.usage.yields < max_yields and should_yield():
                        stepped = True
                        break
        finally:
            if part is not request:
                _add_usage(request, part)
        if not stepped:
            return
        request.usage.yields += 1
        await step_aside()
        part = continuation_of(request, said, deltas, request.usage.yields, tag="y")


def _add_usage(request: GenerationRequest, part: GenerationRequest) -> None:
    total, more = request.usage, part.usage
    total.completion_tokens += more.completion_tokens
    total.draft_tokens += more.draft_tokens
    total.accepted_tokens += more.accepted_tokens
    total.continuations += more.continuations
    total.later_parts_prompt_computed += more.prompt_computed
