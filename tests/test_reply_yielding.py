"""Replies step aside for other calls' first sentences (llm/yielding.py,
streaming/fair_share.FirstSentences): the wait is bounded, it ends when no
turn waits, and the reply carries on from what it said, not from the top."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from llm.base import GenerationRequest
from llm.yielding import MAX_HOLD_S, hold_s, stream_yielding
from streaming.fair_share import FirstSentences


async def test_stepping_aside_is_bounded_and_ends_when_no_turn_waits() -> None:
    first = FirstSentences()
    await first.step_aside(5.0)  # nobody waits: no wait, not counted
    assert first.yields == 0
    other = object()
    first.waiting(other)
    started = time.monotonic()
    await first.step_aside(0.2)  # the other turn never gets its sentence: bounded
    assert time.monotonic() - started >= 0.19
    aside = asyncio.create_task(first.step_aside(10.0))
    await asyncio.sleep(0.05)
    assert not aside.done()
    first.done(other)  # its first sentence is out
    async with asyncio.timeout(1):
        await aside
    assert first.yields == 2 and not first.any_waiting


def test_the_hold_ends_before_the_words_out_are_said() -> None:
    now = 100.0
    # 10 words sent 1 s ago: about 3 s to say, 1 s margin, 1 s gone.
    assert abs(hold_s(10, now - 1.0, now) - 1.0) < 1e-9
    assert abs(hold_s(5, None, now) - 0.5) < 1e-9  # held, not yet sent: from now
    assert hold_s(3, now - 0.5, now) == 0.0  # already due: carry on at once
    assert hold_s(100, now, now) == MAX_HOLD_S


async def test_a_reply_that_steps_aside_carries_on_where_it_stopped(server) -> None:
    """On the real engine, greedy: the reply cut after a few pieces and
    carried on (a second request, continue_final) is the same text as the
    reply generated in one go, and counts the pieces of both parts."""
    engine = server.runtime.engine
    config = server.runtime.config.llm
    messages = [{"role": "system", "content": config.system_prompt},
                {"role": "user", "content": "How do I change my voicemail greeting?"}]  # fmt: skip
    greedy = config.sampling.merged({"temperature": 0.0, "max_tokens": 48})
    whole = GenerationRequest("whole", messages, sampling=greedy)
    expected = "".join([delta async for delta in engine.stream(whole)])
    pieces: list[str] = []
    asides = 0

    async def step_aside() -> None:
        nonlocal asides
        asides += 1
        await asyncio.sleep(0.05)

    stepped = GenerationRequest("stepped", messages, sampling=greedy)
    async for delta in stream_yielding(engine, stepped, lambda: len(pieces) in (4, 12), step_aside):
        pieces.append(delta)
    assert asides == 2 and stepped.usage.yields == 2
    assert "".join(pieces) == expected
    assert stepped.usage.completion_tokens == whole.usage.completion_tokens == 48


async def test_a_call_reply_steps_aside_while_another_turn_waits(server, jfk, monkeypatch) -> None:
    """On the real server: while another turn waits for its first sentence
    (held here), a call's reply sends its first sentence, then stops
    generating; once the other turn has its sentence the reply carries on
    (well before the hold would end), is counted in /metrics and in the
    turn's metrics, and is a whole reply."""
    import llm.yielding
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    # A hold far longer than any real one (3 s a word, up to 30 s), so that
    # here the other turn's first sentence, not the hold, ends the wait, on
    # however loaded a machine.
    monkeypatch.setattr(llm.yielding, "SECONDS_PER_WORD", 3.0)
    monkeypatch.setattr(llm.yielding, "MAX_HOLD_S", 30.0)
    monkeypatch.setattr(llm.yielding, "MARGIN_S", 0.0)

    first_sentences = server.runtime.first_sentences
    assert first_sentences is not None  # on by default

    def yields() -> float:
        return server.runtime.metrics.registry.get_sample_value("firstline_reply_yields_total") or 0.0

    before = yields()
    other = object()  # a turn of another call, waiting for its first sentence
    first_sentences.waiting(other)
    released = False
    try:
        async with NativeCaller(f"ws://127.0.0.1:{server.port}/v1/call") as caller:
            # Greedy and room for three sentences: the reply goes on after its first.
            await caller.start("mulaw", 8000, sampling={"temperature": 0.0, "max_tokens": 96})
            await caller.play(with_silence(jfk.load(8000), 8000, 1.5), 8000, "mulaw", realtime=False)
            await caller.wait_for("response.sentence", timeout=60, first=True)
            async with asyncio.timeout(10):
                while yields() == before:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            first_sentences.done(other)
            released = True
            let_go = time.monotonic()
            done = await caller.wait_for("response.done", timeout=60)
            metrics = await caller.wait_for("turn.metrics", timeout=10)
            sentences = caller.result.of("response.sentence")
            second_at = caller.result.first_at("response.sentence", index=1)
    finally:
        if not released:
            first_sentences.done(other)
    assert yields() >= before + 1
    assert metrics["yields"] >= 1 and done["usage"]["yields"] == metrics["yields"]
    assert len(sentences) >= 2 and not done["cancelled"]
    assert done["text"] == " ".join(s["text"] for s in sentences)
    # It stood aside until let go, then carried on at once: well before the
    # hold would have ended (the words out, nearly said).
    first_at = caller.result.first_at("response.sentence", first=True)
    assert first_at is not None and second_at is not None
    hold_end = first_at + hold_s(len(sentences[0]["text"].split()), first_at, first_at)
    assert let_go + 5 < hold_end, "the reply's first sentence is too short to hold it"
    assert let_go < second_at < hold_end


def test_replies_step_aside_by_default_where_the_llm_shares_this_cpu() -> None:
    from voice.server.cli import build_parser, config_from_args

    def steps_aside(*flags: str) -> bool:
        return config_from_args(build_parser().parse_args(["serve", *flags])).replies_step_aside

    assert steps_aside()  # llama.cpp on the CPU
    assert not steps_aside("--llm-device", "cuda")  # a step's cost barely grows with its batch
    assert not steps_aside("--engine", "remote", "--remote-url", "http://127.0.0.1:1/v1")
    assert steps_aside("--llm-device", "cuda", "--first-sentences-first")
    assert not steps_aside("--no-first-sentences-first")

    def lanes(*flags: str) -> int:
        return config_from_args(build_parser().parse_args(["serve", *flags])).first_sentence_lanes_in_use

    def holds(*flags: str) -> bool:
        return config_from_args(build_parser().parse_args(["serve", *flags])).holds_for_resume

    assert holds()  # where replies step aside
    assert not holds("--no-hold-for-resume")
    assert not holds("--llm-device", "cuda")  # a token costs little there

    assert lanes() == 0  # no limit unless asked
    assert lanes("--first-sentence-lanes", "1") == 1 and lanes("--first-sentence-lanes", "2") == 2
    # Only where replies step aside (the LLM on this machine's CPU).
    assert lanes("--llm-device", "cuda", "--first-sentence-lanes", "1") == 0
    with pytest.raises(SystemExit, match="first-sentence-lanes"):
        lanes("--first-sentence-lanes", "-1")


async def test_only_real_time_calls_make_replies_step_aside(server, jfk) -> None:
    """A turn of a call fed at the pace of speech waits for its first
    sentence in the shared registry (others' replies step aside for it); a
    call fed faster than real time (served last: streaming/fair_share.py)
    never enters it, so it cannot hold the others' replies back."""
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    first_sentences = server.runtime.first_sentences
    assert first_sentences is not None
    url = f"ws://127.0.0.1:{server.port}/v1/call"

    async def turn_seen_waiting(fast: bool) -> bool:
        seen = False

        async def watch() -> None:
            nonlocal seen
            while True:
                seen = seen or first_sentences.any_waiting
                await asyncio.sleep(0.002)

        async with NativeCaller(url) as caller:
            ready = await caller.start("mulaw", 8000)
            watcher = asyncio.create_task(watch())
            try:
                audio = with_silence(jfk.load(8000), 8000, 1.5)
                if fast:  # 10 s of silence at once, then the speech: marked low priority
                    await caller.play(np.zeros(8000 * 10, dtype=np.float32), 8000, "mulaw", realtime=False)
                    async with asyncio.timeout(5):
                        while ready["call_id"] not in server.runtime.low_priority:  # noqa: ASYNC110
                            await asyncio.sleep(0.01)
                # Real time (a 1.5x intake would count as fast), or 4x.
                await caller.play(audio, 8000, "mulaw", realtime=True, speed=4.0 if fast else 1.0)
                done = await caller.wait_for("response.done", timeout=60)
                assert done["text"] and not done["cancelled"]
                if fast:
                    assert ready["call_id"] in server.runtime.low_priority
            finally:
                watcher.cancel()
        return seen

    assert await turn_seen_waiting(fast=False)
    assert not await turn_seen_waiting(fast=True)


async def test_one_first_sentence_at_a_time_endpointed_turns_first() -> None:
    """With one lane, the first generation goes at once and the others
    wait; the lane goes next to a turn whose endpoint fired, before an
    earlier preemptive one; a cancelled waiter takes nothing; a holder that
    never leaves holds a waiter at most lane_max_wait_s."""
    first = FirstSentences(lanes=1, lane_max_wait_s=5.0)
    assert await first.lane("a", lambda: True) == 0.0 and first.lanes_busy == 1
    endpointed = {"b": False, "c": True}
    order: list[str] = []

    async def take(key: str) -> None:
        await first.lane(key, lambda: endpointed[key])
        order.append(key)

    b = asyncio.create_task(take("b"))  # preemptive, first in line
    await asyncio.sleep(0.01)
    c = asyncio.create_task(take("c"))  # endpointed, second in line
    gone = asyncio.create_task(first.lane("d", lambda: True))  # its caller goes on
    await asyncio.sleep(0.05)
    assert order == [] and first.lane_waits == 3
    assert first.endpointed_turn_waits and first.holds_lane("a")  # a preemptive "a" would step aside
    gone.cancel()
    await asyncio.sleep(0.01)
    first.done("a")  # a's first sentence is out
    await asyncio.sleep(0.01)
    assert order == ["c"]
    assert not first.endpointed_turn_waits  # only the preemptive "b" waits
    first.leave("c")
    await asyncio.sleep(0.01)
    assert order == ["c", "b"] and first.lanes_busy == 1
    await asyncio.gather(b, c)
    first.leave("b")
    assert first.lanes_busy == 0

    stuck = FirstSentences(lanes=1, lane_max_wait_s=0.1)
    await stuck.lane("holder", lambda: True)
    waited = await stuck.lane("next", lambda: True)
    assert 0.09 <= waited < 1.0 and stuck.lane_timeouts == 1
    assert await FirstSentences(lanes=0).lane("x", lambda: True) == 0.0  # no limit: never waits


async def test_a_reply_waits_for_the_first_sentence_lane(server, phone_prompts, monkeypatch) -> None:
    """On the real server, with one lane: while another
    turn generates its first sentence (a lane held here), a call's reply does
    not start; once the lane is free it does, and its turn.metrics say how
    long it waited."""
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    first_sentences = server.runtime.first_sentences
    assert first_sentences is not None
    monkeypatch.setattr(first_sentences, "lanes", 1)  # one lane (off by default)
    # The endpoint window (up to 1.2 s) passes while the turn waits, then
    # the test's own pause: no going ahead after the usual 2 s here.
    monkeypatch.setattr(first_sentences, "lane_max_wait_s", 30.0)
    holder = object()  # another call's turn, generating its first sentence
    assert await first_sentences.lane(holder, lambda: True) == 0.0
    released = False
    try:
        async with NativeCaller(f"ws://127.0.0.1:{server.port}/v1/call") as caller:
            await caller.start("mulaw", 8000)
            prompt = phone_prompts[0]
            # Real time: a call fed faster is served last and takes no lane.
            await caller.play(with_silence(prompt.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True)
            await caller.wait_for("transcript.final", timeout=30)
            await asyncio.sleep(0.4)
            assert not caller.result.of("response.delta"), "the reply started while the lane was held"
            first_sentences.leave(holder)
            released = True
            let_go = time.monotonic()
            sentence = await caller.wait_for("response.sentence", timeout=30, first=True)
            # The metrics of the turn that replied: the prompt's own gap
            # between its two sentences may end a turn the caller then
            # resumes (the 0.2 s sure tier), whose metrics come first.
            async with asyncio.timeout(30):
                while not (replied := [m for m in caller.result.of("turn.metrics") if m["turn"] == sentence["turn"]]):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            metrics = replied[0]
    finally:
        if not released:
            first_sentences.leave(holder)
    first_at = caller.result.first_at("response.sentence", first=True)
    assert first_at is not None and first_at > let_go
    assert metrics["lane_wait_ms"] >= 400
    assert first_sentences.lanes_busy == 0


async def test_a_preemptive_reply_gives_its_lane_to_an_endpointed_turn(server, phone_prompts, monkeypatch) -> None:
    """On the real server: a call's preemptive reply (generated in the pause,
    before its 3 s endpoint) holds the one lane; when another turn whose
    endpoint has fired asks for it, the preemptive reply steps aside at its
    next token (its usage counts it), and the caller still gets one whole
    reply."""
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence
    from voice.call.turn import Turn

    first_sentences = server.runtime.first_sentences
    assert first_sentences is not None
    monkeypatch.setattr(first_sentences, "lanes", 1)  # one lane (off by default)
    endpointed = object()  # another call's turn, endpoint fired, no lane yet
    granted_at: float | None = None
    async with NativeCaller(f"ws://127.0.0.1:{server.port}/v1/call") as caller:
        await caller.start("mulaw", 8000, options={"endpoint_silence_ms": 3000}, sampling={"temperature": 0.0})
        play = asyncio.create_task(
            caller.play(with_silence(phone_prompts[0].load(8000), 8000, 4.0), 8000, "mulaw", realtime=True)
        )
        tried: list[Turn] = []
        try:
            # A preemptive reply whose caller went on (a pause inside the
            # prompt) is cancelled and leaves its lane without stepping aside;
            # then the next preemptive reply is the one to catch.
            for _ in range(4):
                holder: Turn | None = None
                async with asyncio.timeout(30):
                    while holder is None:
                        holder = next(
                            (k for k in list(first_sentences._holders) if isinstance(k, Turn) and k not in tried),
                            None,
                        )
                        await asyncio.sleep(0.002)
                tried.append(holder)
                # Caught at once, in its prefill: the other turn asks before the
                # reply's first token, at which it steps aside.
                assert not holder.committed
                await first_sentences.lane(endpointed, lambda: True)
                granted_at = time.monotonic()
                # What the lane was given up at: not the preemptive reply's
                # first sentence, not its endpoint (3 s on).
                unsent, uncommitted = not holder.sent, not holder.committed
                first_sentences.leave(endpointed)
                if holder.request is not None and holder.request.usage.yields >= 1:
                    break
                # It left its lane without a token: only a cancelled reply does.
                await asyncio.wait({holder.task}, timeout=10)
                assert holder.task.done() and holder.reply_end in ("cancelled", "resumed"), holder.reply_end
                granted_at = None
        finally:
            first_sentences.leave(endpointed)
        done = await caller.wait_for("response.done", timeout=60)
        metrics = await caller.wait_for("turn.metrics", timeout=10)
        await play
    # Given up at the preemptive reply's next token, not at its first
    # sentence or its 3 s endpoint.
    assert granted_at is not None and unsent and uncommitted
    # (The caller may still have gone on after it: then a later preemptive
    # turn is the one answered.)
    assert holder.request is not None and holder.request.usage.yields >= 1
    assert metrics["preemptive"]
    sentences = caller.result.of("response.sentence")
    assert sentences and not done["cancelled"]
    assert done["text"] == " ".join(s["text"] for s in sentences)
