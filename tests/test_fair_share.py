"""Who is served first (streaming/fair_share.py): a call feeding audio faster
than real time is seen as such, and its turns wait for a real-time call's."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from streaming.fair_share import IntakeRate, LowPriority, ReplyGate


def feed(rate: IntakeRate, multiple: float, seconds: float, start: float = 0.0) -> float:
    """20 ms frames at ``multiple`` x real time for ``seconds`` of wall time."""
    out, t, step = 0.0, start, 0.02 / multiple
    while t < start + seconds:
        out = rate.add(0.02, now=t)
        t += step
    return out


def test_intake_tells_a_real_time_caller_from_a_fast_one() -> None:
    assert 0.9 < feed(IntakeRate(), 1.0, 30.0) < 1.1  # a phone line
    assert feed(IntakeRate(), 1.0, 2.0) < 1.0  # a call's first seconds never look fast
    assert feed(IntakeRate(), 2.7, 8.0) > 1.5  # an endless talker under a 3x budget
    burst = IntakeRate()
    assert burst.add(15.0, now=0.0) > 1.5  # a flood's first 15 s arriving at once
    assert burst.add(0.02, now=10.0) < 1.5  # ... decays once it stops


def test_low_priority_follows_the_rate_and_can_be_switched_off() -> None:
    low = LowPriority(1.5)
    low.update("a", 3.0)
    low.update("b", 1.0)
    assert "a" in low and "b" not in low and low.marked_total == 1
    low.update("a", 3.0)  # still low: counted once
    low.update("a", 1.2)
    assert "a" not in low and low.marked_total == 1
    low.update("a", 4.0)
    low.forget("a")
    assert "a" not in low
    off = LowPriority(0)
    off.update("a", 50.0)
    assert "a" not in off


async def test_a_low_priority_turn_waits_for_a_real_time_turn() -> None:
    low = LowPriority(1.5)
    low.update("fast", 5.0)
    gate = ReplyGate(low, max_wait_s=5.0)
    order: list[str] = []
    caller_in, caller_done = asyncio.Event(), asyncio.Event()

    async def caller() -> None:
        async with gate.turn("caller"):
            caller_in.set()
            await caller_done.wait()
            order.append("caller")

    async def fast() -> None:
        await caller_in.wait()
        async with gate.turn("fast"):
            order.append("fast")

    tasks = [asyncio.create_task(caller()), asyncio.create_task(fast())]
    await caller_in.wait()
    await asyncio.sleep(0.05)
    assert order == [] and gate.busy == 1  # the fast call is held at the gate
    caller_done.set()
    await asyncio.gather(*tasks)
    assert order == ["caller", "fast"] and gate.waits == 1 and gate.busy == 0


async def test_the_wait_is_bounded_and_real_time_calls_never_wait() -> None:
    low = LowPriority(1.5)
    low.update("fast", 5.0)
    gate = ReplyGate(low, max_wait_s=0.1)
    async with gate.turn("caller"):
        async with gate.turn("other"):  # real-time calls do not wait for each other
            assert gate.busy == 2
        # served late, never starved: the fast call gets in after max_wait_s
        await asyncio.wait_for(_enter(gate, "fast"), 2.0)
    assert gate.waits == 1


async def _enter(gate: ReplyGate, call_id: str) -> None:
    async with gate.turn(call_id):
        pass


async def test_a_cancelled_turn_releases_the_gate() -> None:
    gate = ReplyGate(LowPriority(1.5))

    async def hold() -> None:
        async with gate.turn("caller"):
            await asyncio.sleep(10)

    task = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    assert gate.busy == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.busy == 0


async def test_the_server_puts_a_fast_call_behind_a_real_time_one(server) -> None:
    """On the real server: a call sending audio at full speed is marked low
    priority (and counted in /metrics); one at the pace of speech is not;
    a hung-up call is forgotten."""
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{server.port}/v1/call"
    low = server.runtime.low_priority
    marked = low.marked_total
    counted = server.runtime.metrics.registry.get_sample_value("firstline_low_priority_total") or 0.0
    start = json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}})
    async with connect(url) as fast, connect(url) as paced:
        await fast.send(start)
        await paced.send(start)
        fast_id = json.loads(await fast.recv())["call_id"]
        paced_id = json.loads(await paced.recv())["call_id"]
        for _ in range(500):  # 10 s of silence, all at once (a 3 s burst would not count)
            await fast.send(bytes(640))
        for _ in range(10):  # 0.3 s of audio every 0.3 s
            await paced.send(bytes(640 * 15))
            await asyncio.sleep(0.3)
        async with asyncio.timeout(5):
            while fast_id not in low:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert paced_id not in low
        assert low.marked_total == marked + 1
        metrics = await asyncio.to_thread(_scrape, server.port)
        assert f"firstline_low_priority_total {counted + 1}" in metrics, metrics
    async with asyncio.timeout(5):
        while fast_id in low:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


async def test_no_incremental_prefill_while_another_turn_is_under_way(server, jfk) -> None:
    """A prefill only helps when the engine is free: while another call's
    turn is under way, each partial the caller gets skips its prefill
    (counted in /metrics), and the call is still answered."""
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    def skipped() -> float:
        return server.runtime.metrics.registry.get_sample_value("firstline_prefills_skipped_total") or 0.0

    before = skipped()
    url = f"ws://127.0.0.1:{server.port}/v1/call"
    async with server.runtime.reply_gate.turn("another-call"):  # a real-time call's turn, held
        async with NativeCaller(url) as caller:
            await caller.start("mulaw", 8000)
            await caller.play(with_silence(jfk.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=2.0)
            # The reply to the whole clip: JFK's pause after "my fellow
            # Americans" may end a turn the caller then talks over (cancelled).
            done = await caller.wait_for("response.done", timeout=60, cancelled=False)
            partials = caller.result.of("transcript.partial")
    assert partials, "no partial transcript while the caller spoke"
    # Every partial would have prefilled (none did): skipped, unless the
    # call's own speculation budget was spent at a pause just then.
    assert 1 <= skipped() - before <= len(partials)
    assert done["text"] and not done["cancelled"]


async def test_partials_warm_an_idle_engine_and_the_work_is_counted(server, jfk) -> None:
    """The other side of the test above: with the engine free, the caller's
    partials prefill the prompt, and /metrics counts those prefills and the
    prompt tokens they computed apart from the answer's."""
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    registry = server.runtime.metrics.registry

    def prefill(sample: str, **labels: str) -> float:
        return registry.get_sample_value(sample, {"purpose": "prefill", **labels}) or 0.0

    async with asyncio.timeout(30):  # the engine free: no other call's turn (a test before) under way
        while server.runtime.reply_gate.busy:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    requests_before = prefill("firstline_llm_requests_total")
    computed_before = prefill("firstline_llm_tokens_total", kind="prompt_computed")
    url = f"ws://127.0.0.1:{server.port}/v1/call"
    async with NativeCaller(url) as caller:
        await caller.start("mulaw", 8000)
        # In real time: at twice it, a busy machine's catch-up bursts took the
        # intake past 1.5x, and a fast feeder's partials prefill nothing.
        await caller.play(with_silence(jfk.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=1.0)
        # (Not a turn ended at JFK's mid-sentence pause and talked over.)
        done = await caller.wait_for("response.done", timeout=60, cancelled=False)
    assert done["text"] and not done["cancelled"]
    assert prefill("firstline_llm_requests_total") > requests_before
    # Each prefill computes at least the partial's new words.
    assert prefill("firstline_llm_tokens_total", kind="prompt_computed") > computed_before


async def test_a_cancel_that_lands_as_a_wait_ends_is_not_lost() -> None:
    """A reply stepping aside for another call's first sentence, and a
    low-priority turn waiting for the gate: the other call's sentence goes
    out (or the gate frees) and, in the same instant, this caller barges
    in. Python 3.11's wait_for returned normally then, losing the cancel:
    the aborted reply went on generating, and a preemptive turn lived on
    past its call holding the gate for every call."""
    from streaming.fair_share import FirstSentences

    async def cancelled_after(wait, release) -> bool:
        went_on: list[str] = []

        async def reply() -> None:
            await wait()
            went_on.append("past the wait")
            await asyncio.sleep(5)  # generating on
            went_on.append("generated past the barge-in")

        task = asyncio.ensure_future(reply())
        await asyncio.sleep(0.01)
        release()
        await asyncio.sleep(0)  # one loop step: the wait's end is under way
        task.cancel()
        await asyncio.wait({task}, timeout=1)
        lost = not task.done()
        task.cancel()  # a lost cancel: end it now, the test has its answer
        await asyncio.wait({task})
        return not lost and task.cancelled() and "generated past the barge-in" not in went_on

    first = FirstSentences()
    other = object()
    first.waiting(other)
    assert await cancelled_after(lambda: first.step_aside(5.0), lambda: first.done(other))

    low = LowPriority(1.5)
    low.update("slow", 5.0)
    gate = ReplyGate(low, max_wait_s=5.0)
    holder = gate.turn("real-time")
    await holder.__aenter__()

    async def low_turn() -> None:
        async with gate.turn("slow"):
            pass

    def free() -> None:
        # The real-time turn ends (its exit is synchronous up to the event).
        gate._busy -= 1
        gate._idle.set()

    assert await cancelled_after(low_turn, free)
    assert gate.busy == 0


async def test_a_turn_talked_over_while_it_waits_at_the_gate_keeps_its_words(server) -> None:
    """A fast call's turn waits at the reply gate while a real-time call's
    turn runs; the caller talks again before it has even been decoded. Its
    words are not lost: they lead the caller's next turn."""
    from asr.wer import word_error_rate
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence
    from tests.transport_checks import by_name

    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
    url = f"ws://127.0.0.1:{server.port}/v1/call"
    low = server.runtime.low_priority
    async with NativeCaller(url) as caller:
        ready = await caller.start("mulaw", 8000, options={"partials": False})
        await caller.play(np.zeros(80000, np.float32), 8000, "mulaw", realtime=False)  # 10 s at once
        async with asyncio.timeout(5):
            while ready["call_id"] not in low:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        async with server.runtime.reply_gate.turn("another-call"):  # a real-time call's turn, held
            audio = np.concatenate(
                [with_silence(first.load(8000), 8000, 1.5), with_silence(second.load(8000), 8000, 1.5)]
            )
            await caller.play(audio, 8000, "mulaw", realtime=False)
            final = await caller.wait_for("transcript.final", timeout=60)
        done = await caller.wait_for("response.done", timeout=60, turn=final["turn"])
    both = f"{first.reference} {second.reference}"
    assert word_error_rate(both, final["text"]) <= 0.35, (both, final["text"])
    assert done["text"] and not done["cancelled"]
    # Two turns ended (the first one talked over, with no transcript of its
    # own), not one turn holding both clips.
    assert final["turn"] >= 2, "the clips made one turn: nothing was talked over"
    assert [e["turn"] for e in caller.result.of("transcript.final")] == [final["turn"]]
