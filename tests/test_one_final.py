"""At most one queued final per call (voice/call/finals.py): a call's next
final reaches the shared ASR worker only once its previous one is done, and
of those waiting only the newest is kept. The first test runs it on the real
worker and Whisper; the others hand it a recording worker whose decodes the
test settles, because the orders they check (a final dropped between its
decode and its owner's look at it) cannot be made to happen on cue with real
decodes."""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import numpy as np
import pytest

from asr.config import ASRConfig
from asr.wer import word_error_rate
from asr.worker import ASRWorker
from benchmarks.corpus import through_phone_line
from voice.call.finals import OneFinalPerCall


async def test_on_the_real_worker_one_final_waits_and_the_newest_hears_both(jfk, phone_prompts) -> None:
    """The worker is busy with another call's decode; one call ends three
    turns. Only its first final is queued on the worker, the second is
    superseded by the third, and the third's decode hears the second's words
    in front of its own."""
    worker = ASRWorker(ASRConfig(batch_size=1, decoder_process=False, partial_budget=0.0))
    await worker.start()
    try:
        busy = worker.submit("other call", jfk.load(16000), final=False)
        async with asyncio.timeout(10):
            while worker.in_flight != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
        asr = OneFinalPerCall(worker)
        first_clip, second_clip, third_clip = phone_prompts[:3]
        first, second, third = (
            asr.submit("c", through_phone_line(u.load(8000)), final=True) for u in (first_clip, second_clip, third_clip)
        )
        assert worker.queue_depth == 1  # this call's first final; the other two wait in the call
        assert second.cancelled() and asr.superseded == 1
        await busy
        heard_first, heard_last = await first, await third
        assert word_error_rate(first_clip.reference, heard_first.text) <= 0.3, heard_first.text
        both = f"{second_clip.reference} {third_clip.reference}"
        assert word_error_rate(both, heard_last.text) <= 0.3, (both, heard_last.text)
    finally:
        await worker.close()


class FakeWorker:
    """A recording worker (a fake: see the module's note): it records
    submissions; the test settles the futures."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, bool, asyncio.Future[Any]]] = []
        self.audio: list[np.ndarray] = []  # of each final, in order
        self.queue_depth = 0
        self.marks: list[bool] = []  # of each submission, in order

    def submit(self, call_id: str, audio: np.ndarray, final: bool, marks: bool = False) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.jobs.append((call_id, final, future))
        self.marks.append(marks)
        if final:
            self.audio.append(audio)
        return future

    def finals(self) -> list[asyncio.Future[Any]]:
        return [f for _, final, f in self.jobs if final]


async def test_a_final_that_asks_for_marks_keeps_asking_when_it_waits() -> None:
    """Whisper's marks (an end-of-turn input) are asked per decode: a final
    queued behind its call's previous one still asks when it is handed on,
    and a partial passes the flag straight through."""
    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    audio = np.zeros(160, np.float32)
    first = asr.submit("c", audio, final=True, marks=False)
    second = asr.submit("c", audio, final=True, marks=True)
    asr.submit("c", audio, final=False, marks=True)
    assert worker.marks == [False, True]  # the first final, the partial; the second waits
    worker.finals()[0].set_result("one")
    await asyncio.sleep(0)
    assert worker.marks == [False, True, True]  # handed on, still asking
    worker.finals()[1].set_result("two")
    assert await first == "one" and await second == "two"


async def test_finals_of_one_call_reach_the_worker_one_at_a_time() -> None:
    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    audio = np.zeros(160, np.float32)
    first = asr.submit("c", audio, final=True)
    second = asr.submit("c", audio, final=True)
    third = asr.submit("c", audio, final=True)  # supersedes the second while both wait
    partial = asr.submit("c", audio, final=False)  # partials are not held
    assert len(worker.finals()) == 1 and not partial.done()
    assert second.cancelled() and asr.superseded == 1
    worker.finals()[0].set_result("one")
    await asyncio.sleep(0)
    assert await first == "one"
    assert len(worker.finals()) == 2  # now the newest waiting one is handed over
    worker.finals()[1].set_result("three")
    assert await third == "three"
    # With nothing queued, a final goes straight through.
    fourth = asr.submit("c", audio, final=True)
    assert len(worker.finals()) == 3 and fourth is worker.finals()[2]


async def test_finals_superseded_while_one_decodes_keep_one_copy_of_audio() -> None:
    """A client committing turn after turn while its final decodes: each
    superseding final used to add a callback to the decoding one holding its
    own audio (up to 15 s carried in front), all kept until that decode
    ended. 100 commits of 1 s each pinned about 100 MB; the waiting final's
    audio is held once now, and the newest final is still the one handed on."""
    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    asr.submit("c", np.zeros(16000, np.float32), final=True)  # decoding, never settled here
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        last = None
        for i in range(100):
            last = asr.submit("c", np.full(16000, i, np.float32), final=True)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 8 << 20, f"{held / 2**20:.0f} MiB held by 100 superseded finals"
    worker.finals()[0].set_result("first")
    await asyncio.sleep(0)
    assert len(worker.finals()) == 2 and worker.audio[1][-1] == 99  # the newest, carrying the others' 15 s
    assert len(worker.audio[1]) == 16 * 16000
    worker.finals()[1].set_result("newest")
    assert await last == "newest"


async def test_a_final_done_hands_over_only_if_it_is_still_the_calls_newest() -> None:
    """The waiting final is given up; the decoding one ends, and before its
    hand-over runs two finals come: the first goes straight to the worker,
    the second waits behind it. The old decode's hand-over must not send the
    second too (two finals of one call on the worker, and the same one
    decoded twice)."""
    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    first = asr.submit("c", np.full(10, 1.0, np.float32), final=True)
    asr.submit("c", np.full(10, 2.0, np.float32), final=True).cancel()  # given up by its owner
    await asyncio.sleep(0)
    first.set_result("one")  # its hand-over is scheduled, not yet run
    asr.submit("c", np.full(10, 3.0, np.float32), final=True)  # nothing waits: straight to the worker
    last = asr.submit("c", np.full(10, 4.0, np.float32), final=True)  # waits behind it
    await asyncio.sleep(0)
    assert [a[0] for a in worker.audio] == [1.0, 3.0]
    worker.finals()[1].set_result("three")
    await asyncio.sleep(0)
    assert [a[0] for a in worker.audio] == [1.0, 3.0, 4.0]
    worker.finals()[2].set_result("four")
    assert await last == "four"


async def test_a_waiting_final_given_up_is_never_decoded_and_errors_pass_through() -> None:
    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    audio = np.zeros(160, np.float32)
    asr.submit("c", audio, final=True)
    waiting = asr.submit("c", audio, final=True)
    waiting.cancel()
    worker.finals()[0].set_result("done")
    await asyncio.sleep(0)
    assert len(worker.finals()) == 1  # the cancelled one never reached the worker
    failing = asr.submit("c", audio, final=True)
    worker.finals()[1].set_exception(RuntimeError("decoder fault"))
    with pytest.raises(RuntimeError):
        await failing


async def test_a_talked_over_turns_audio_outlives_the_final_that_carried_it() -> None:
    """The worker is behind: turn 2's final (the caller talked over its
    reply, so its words must lead the next turn) waits; a preemptive turn's
    final merges turn 2's audio in front of its own, then the caller goes
    on and that turn is dropped. Turn 2's audio leads the next final; the
    dropped turn's own audio does not (it is in the next turn's audio)."""
    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    one, two, three, four = (np.full(n, v, np.float32) for n, v in ((100, 1), (160, 2), (200, 3), (240, 4)))
    asr.submit("c", one, final=True)
    talked_over = asr.submit("c", two, final=True)
    preemptive = asr.submit("c", three, final=True)
    assert talked_over.cancelled()  # merged: its audio rides in front of the preemptive turn's
    preemptive.cancel()
    await asyncio.sleep(0)
    worker.finals()[0].set_result("one")
    await asyncio.sleep(0)
    assert len(worker.finals()) == 1  # the dropped one never reached the worker
    asr.submit("c", four, final=True)
    assert np.array_equal(worker.audio[-1], np.concatenate([two, four]))
    # Used once: the final after it is its own.
    worker.finals()[-1].set_result("two four")
    await asyncio.sleep(0)
    asr.submit("c", one, final=True)
    assert np.array_equal(worker.audio[-1], one)
    # A hang-up keeps nothing for later.
    asr.submit("c", two, final=True)
    asr.submit("c", three, final=True)
    asr.close()
    await asyncio.sleep(0)
    assert not len(asr._orphaned)


def a_final_carrying_talked_over_audio() -> tuple[FakeWorker, OneFinalPerCall, tuple[np.ndarray, ...], asyncio.Future]:
    """The worker decodes turn 1's final; turn 2's waits (talked over); a
    preemptive turn's final then carries turn 2's audio in front of its own."""
    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    one, two, three, four = (np.full(n, v, np.float32) for n, v in ((100, 1), (160, 2), (200, 3), (240, 4)))
    asr.submit("c", one, final=True)
    asr.submit("c", two, final=True)  # talked over while it waits
    preemptive = asr.submit("c", three, final=True)  # carries turn 2's audio
    return worker, asr, (one, two, three, four), preemptive


async def test_a_talked_over_turns_audio_leads_a_final_submitted_as_its_carrier_is_cancelled() -> None:
    """As above, but the next final comes in the same step as the cancel (a
    forced end: the client's commit, or the length cap mid-speech, cancels
    the preemptive turn and submits the committed one at once), before the
    cancelled final's done-callback ran: turn 2's words went without it."""
    worker, asr, (one, two, _, four), preemptive = a_final_carrying_talked_over_audio()
    preemptive.cancel()
    asr.submit("c", four, final=True)  # no yield in between
    worker.finals()[0].set_result("one")
    await asyncio.sleep(0)
    assert np.array_equal(worker.audio[-1], np.concatenate([two, four]))
    await asyncio.sleep(0)  # the late done-callback adds nothing twice
    worker.finals()[-1].set_result("two four")
    await asyncio.sleep(0)
    asr.submit("c", one, final=True)
    assert np.array_equal(worker.audio[-1], one)


async def test_a_talked_over_turns_audio_outlives_a_final_dropped_after_its_decode() -> None:
    """As above, but the preemptive turn is dropped after its final was
    decoded (the caller went on while its reply was being generated): its
    owner gives it up, and turn 2's audio still leads the next final."""
    worker, asr, (one, two, three, four), preemptive = a_final_carrying_talked_over_audio()
    worker.finals()[0].set_result("one")
    await asyncio.sleep(0)
    assert np.array_equal(worker.audio[-1], np.concatenate([two, three]))
    worker.finals()[1].set_result("two three")
    assert await preemptive == "two three"
    asr.abandon(preemptive)
    asr.abandon(preemptive)  # once only
    asr.submit("c", four, final=True)
    assert np.array_equal(worker.audio[-1], np.concatenate([two, four]))
    # Used once: the final after it is its own.
    worker.finals()[-1].set_result("two four")
    await asyncio.sleep(0)
    asr.submit("c", one, final=True)
    assert np.array_equal(worker.audio[-1], one)


async def test_talked_over_audio_carried_in_front_is_bounded_to_the_newest() -> None:
    """A caller who talks over turn after turn while the first final waits
    (backchannels, a TV in the room): each newer final carries the older
    ones' audio in front of its own, which grew one final to a minute of
    audio, decoded whole while every other call's finals waited. Only the
    newest MAX_CARRIED_S of it rides along, its own turn whole."""
    from voice.call.finals import MAX_CARRIED_S

    worker = FakeWorker()
    asr = OneFinalPerCall(worker)
    asr.submit("c", np.zeros(16000, np.float32), final=True)  # on the worker
    for turn in range(60):  # one second each, talked over while the first decodes
        asr.submit("c", np.full(16000, turn, np.float32), final=True)
    worker.finals()[0].set_result("first")
    await asyncio.sleep(0)
    handed = worker.audio[-1]
    assert len(handed) == int(MAX_CARRIED_S * 16000) + 16000, len(handed) / 16000
    assert handed[-1] == 59 and handed[0] == 59 - MAX_CARRIED_S  # the newest seconds, in order
