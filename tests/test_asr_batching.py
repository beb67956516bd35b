"""Batched ASR across calls (asr/worker.py): real Whisper tiny.en on real
speech through a phone line, each worker with its own decoder so its
configuration is the one under test."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from asr.config import CPU_PARTIAL_BUDGET, ASRConfig, on_gpu
from asr.wer import corpus_wer, word_error_rate
from asr.whisper import Decoded
from asr.worker import FINAL, PARTIAL, USAGE_FULL_S, ASRWorker
from benchmarks.corpus import Utterance, asterisk_prompts, shared_clip, shared_clips, through_phone_line
from streaming.fair_share import LowPriority
from voice.server.cli import build_parser, config_from_args

BUDGET_MS = 30.0


async def _worker(**overrides: Any) -> ASRWorker:
    # The ordering tests decode partials back to back, faster than any call
    # would: without the partials' decoder budget (tested on its own below).
    overrides.setdefault("partial_budget", 0.0)
    # In a thread of this process: these test the scheduler, and some read
    # the decoder threads' CPU from /proc (tests/test_asr_lanes.py tests the
    # decoder process).
    overrides.setdefault("decoder_process", False)
    worker = ASRWorker(ASRConfig(**overrides))
    await worker.start()
    return worker


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def batched() -> AsyncIterator[ASRWorker]:
    worker = await _worker(batch_size=4, batch_wait_ms=BUDGET_MS)
    yield worker
    await worker.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def unbatched() -> AsyncIterator[ASRWorker]:
    worker = await _worker(batch_size=1)
    yield worker
    await worker.close()


@pytest.fixture(scope="module")
def speech() -> list[tuple[Utterance, np.ndarray]]:
    """Shared clips and (where installed) a spread of Asterisk prompts: 10 s
    and 20 s windows, so batches form within and across windows."""
    utts = shared_clips() + asterisk_prompts(min_words=5)[::20][:6]
    return [(u, through_phone_line(u.load(8000))) for u in utts]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def alone(speech, unbatched) -> list[Decoded]:
    """The reference: every utterance decoded one at a time."""
    return await asyncio.gather(*(unbatched.submit(f"u{i}", a, final=True) for i, (_, a) in enumerate(speech)))


@pytest.fixture(scope="module")
def quilter() -> np.ndarray:
    return through_phone_line(shared_clip("librispeech_quilter.wav").load(8000))


@pytest.fixture(scope="module")
def jfk_audio() -> np.ndarray:
    return through_phone_line(shared_clip("jfk.wav").load(8000))


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.002)


_busy_calls = itertools.count()


async def _busy(worker: ASRWorker, audio: np.ndarray) -> asyncio.Future[Decoded]:
    """Occupy the worker with one partial decode, so what follows queues. A
    fresh call each time: one name charged for every test's decode could
    pass its fair share, and its next partial was shed, not decoded."""
    fut = worker.submit(f"busy-{next(_busy_calls)}", audio, final=False)
    await _until(lambda: worker.in_flight == 1)
    return fut


@pytest.mark.parametrize("windows", ["same", "pad"])
async def test_batched_transcripts_match_unbatched(speech, alone, windows):
    """All utterances at once: batched, they share CTranslate2 calls; the text
    is the same as one at a time (padding to a larger window may move a word,
    so "pad" is held to the same WER, not the same strings)."""
    worker = await _worker(batch_size=4, batch_wait_ms=BUDGET_MS, batch_windows=windows)
    try:
        together = await asyncio.gather(*(worker.submit(f"b{i}", a, final=True) for i, (_, a) in enumerate(speech)))
    finally:
        await worker.close()
    assert max(r.batch_size for r in together) > 1, "nothing was batched"
    assert all(r.batch_size == 1 for r in alone)
    refs = [u.reference for u, _ in speech]
    wer_alone = corpus_wer(list(zip(refs, [r.text for r in alone], strict=True)))
    wer_together = corpus_wer(list(zip(refs, [r.text for r in together], strict=True)))
    assert wer_together <= wer_alone + 0.02, (wer_alone, wer_together)
    if windows == "same":
        # Same window, same features: only int8 GEMM shapes differ.
        same = sum(a.text == b.text for a, b in zip(alone, together, strict=True))
        assert same >= len(speech) - 1, [(a.text, b.text) for a, b in zip(alone, together, strict=True)]
        assert all(r.window_s == a.window_s for r, a in zip(together, alone, strict=True))


async def test_finals_go_before_partials_and_batch_among_themselves(batched, quilter, jfk_audio):
    busy = await _busy(batched, jfk_audio)
    order: list[str] = []
    futs = {f"partial-{c}": batched.submit(f"prio-{c}", quilter, final=False) for c in "abc"}
    # Call a's final makes its own queued partial moot (same turn's audio).
    futs["final-a"] = batched.submit("prio-a", quilter, final=True)
    futs["final-d"] = batched.submit("prio-d", quilter, final=True)
    for name, fut in futs.items():
        fut.add_done_callback(lambda f, name=name: order.append(name if not f.cancelled() else f"{name}:dropped"))
    results = await asyncio.gather(*futs.values(), return_exceptions=True)
    await busy
    by_name = dict(zip(futs, results, strict=True))
    assert futs["partial-a"].cancelled(), order
    served = [n for n in order if ":" not in n]
    assert served[:2] == ["final-a", "final-d"], order
    # The two finals shared one decode, and no partial rode along with them.
    assert by_name["final-a"].batch_size == by_name["final-d"].batch_size == 2
    assert by_name["partial-b"].batch_size == by_name["partial-c"].batch_size == 2
    assert word_error_rate(shared_clip("librispeech_quilter.wav").reference, by_name["final-d"].text) <= 0.2


async def test_partials_served_longest_waiting_caller_first(unbatched, quilter, jfk_audio):
    """A newer partial replaces an older one but keeps its place in line."""
    busy = await _busy(unbatched, jfk_audio)
    order: list[str] = []
    first_a = unbatched.submit("wait-a", quilter, final=False)
    b = unbatched.submit("wait-b", quilter, final=False)
    a = unbatched.submit("wait-a", quilter, final=False)  # replaces first_a, keeps a's place
    a.add_done_callback(lambda _f: order.append("a"))
    b.add_done_callback(lambda _f: order.append("b"))
    await asyncio.gather(a, b, busy)
    assert first_a.cancelled()
    assert order == ["a", "b"]


async def test_a_call_that_used_the_decoder_lately_waits_behind_one_that_did_not(unbatched, quilter, jfk_audio):
    """Fair share: a caller whose decodes just took the worker (an endless
    talker) has its next final served after a quieter caller's, though it
    asked first."""
    await unbatched.submit("fair-heavy", jfk_audio, final=True)  # real decoder time, charged to it
    assert unbatched.usage("fair-heavy") > 0.05 and unbatched.usage("fair-light") == 0.0
    busy = await _busy(unbatched, jfk_audio)
    order: list[str] = []
    heavy = unbatched.submit("fair-heavy", quilter, final=True)
    light = unbatched.submit("fair-light", quilter, final=True)
    heavy.add_done_callback(lambda _f: order.append("heavy"))
    light.add_done_callback(lambda _f: order.append("light"))
    await asyncio.gather(heavy, light, busy)
    assert order == ["light", "heavy"]


async def test_a_call_feeding_audio_faster_than_real_time_waits_behind_a_real_time_one(quilter, jfk_audio):
    """A low-priority call (streaming/fair_share.py) has used nothing yet (a
    flood's first burst) and asked first, yet its final is served after a
    real-time caller's; it gets no partials while another call decodes."""
    low = LowPriority(1.5)
    worker = await _worker(batch_size=1)  # its own: no other call's recent decodes
    worker.low = low
    try:
        low.update("burst", 20.0)
        busy = await _busy(worker, jfk_audio)
        order: list[str] = []
        burst = worker.submit("burst", quilter, final=True)
        caller = worker.submit("caller", quilter, final=True)
        burst.add_done_callback(lambda _f: order.append("burst"))
        caller.add_done_callback(lambda _f: order.append("caller"))
        await asyncio.gather(burst, caller, busy)
        assert order == ["caller", "burst"]
        assert worker.submit("burst", quilter, final=False).cancelled()  # another call is decoding too
        low.update("burst", 1.0)  # back to real time: served in turn again
        assert not worker.submit("burst", quilter, final=False).cancelled()
    finally:
        await worker.close()


async def test_a_call_over_its_share_gets_no_partials_while_another_call_decodes(quilter):
    """Partials of a call that kept the decoder busy (over PARTIAL_SHARE of
    it lately) are shed while another call is using the decoder too; alone,
    it gets them; its finals always go."""
    unbatched = await _worker(batch_size=1)  # its own: no other call's recent decodes
    try:
        await _share_checks(unbatched, quilter)
    finally:
        await unbatched.close()


async def _share_checks(unbatched: ASRWorker, quilter: np.ndarray) -> None:
    unbatched._charge("share-hog", 0.5 * USAGE_FULL_S, FINAL)  # half the decoder, lately
    alone = unbatched.submit("share-hog", quilter, final=False)
    assert not alone.cancelled()  # nobody else is using the decoder: no one to slow
    await alone
    await unbatched.submit("share-other", quilter, final=True)  # another call now decodes too
    shed_before = unbatched.shed_partials
    assert unbatched.submit("share-hog", quilter, final=False).cancelled()
    assert unbatched.shed_partials == shed_before + 1
    assert not unbatched.submit("share-other", quilter, final=False).cancelled()
    final = await unbatched.submit("share-hog", quilter, final=True)
    assert final.text
    # The other call hangs up: its decodes no longer count, and the call
    # left alone gets its partials again (they were shed for a minute).
    unbatched.forget("share-other", ended=True)
    assert not unbatched.submit("share-hog", quilter, final=False).cancelled()
    # A call that hangs up while its final decodes: that decode is not
    # charged (it put the call's use back for a minute after its end).
    late = unbatched.submit("share-late", quilter, final=True)
    unbatched.forget("share-late", ended=True)
    await late
    assert "share-late" not in unbatched._used
    # Nor one its session hands on after the end (a talked-over turn's final
    # taken back, a waiting final let through): submitted after forget, it
    # cleared the end and the dead call's use came back.
    await unbatched.submit("share-late", quilter, final=True)
    assert "share-late" not in unbatched._used


async def test_partials_past_their_decoder_budget_are_shed_until_it_refills_finals_never(quilter):
    """All partials together may use partial_budget decoder-seconds per
    second: a partial decode that overdraws the bucket closes it to every
    call's partials until it has refilled; finals always go."""
    worker = await _worker(batch_size=1, partial_budget=1.0, partial_budget_burst_s=0.01)
    try:
        first = await worker.submit("budget-a", quilter, final=False)  # the bucket had credit
        assert first.text
        # That decode took far more than the 0.01 s the bucket held.
        assert worker.submit("budget-b", quilter, final=False).cancelled()
        assert worker.over_budget_partials == 1
        final = await worker.submit("budget-b", quilter, final=True)
        assert final.text
        # Refilled at 1 s a second after the decode time it overdrew (the final
        # is not charged to it): partials go again.
        await asyncio.sleep(first.decode_s + 0.05)
        again = await worker.submit("budget-b", quilter, final=False)
        assert again.text and worker.over_budget_partials == 1
    finally:
        await worker.close()


async def test_lone_call_waits_at_most_the_budget_and_company_joins(batched, quilter):
    lone = await batched.submit("lone", quilter, final=True)
    assert lone.batch_size == 1
    # It waited for company about the budget, not until some came: the slack
    # is for a loaded machine's scheduling (the wait itself is benchmarked
    # in benchmarks/asr_batching.py).
    assert lone.queue_s <= (BUDGET_MS + 250) / 1000, lone.queue_s
    first = batched.submit("pair-1", quilter, final=True)
    await asyncio.sleep(0.005)  # a second call's final, well within the budget
    second = batched.submit("pair-2", quilter, final=True)
    one, two = await asyncio.gather(first, second)
    assert one.batch_size == two.batch_size == 2
    assert one.text == two.text == lone.text


async def test_forget_and_queue_depth_count_only_live_jobs(batched, quilter, jfk_audio):
    busy = await _busy(batched, jfk_audio)
    assert batched.queue_depth == 0  # the decode in flight is not waiting
    futs = [batched.submit(f"depth-{i}", quilter, final=False) for i in range(3)]
    assert batched.queue_depth == 3
    batched.submit("depth-0", quilter, final=False)  # supersedes depth-0's partial
    assert futs[0].cancelled() and batched.queue_depth == 3
    batched.forget("depth-1")
    assert futs[1].cancelled() and batched.queue_depth == 2
    futs[2].cancel()  # its awaiting task went away
    assert batched.queue_depth == 1
    final = batched.submit("depth-final", quilter, final=True)
    assert batched.queue_depth == 2
    batched.forget("depth-final")  # forget drops partials only: the turn's final stands
    assert batched.queue_depth == 2
    await asyncio.gather(busy, final)
    await _until(lambda: batched.queue_depth == 0 and batched.in_flight == 0, timeout=30)
    assert not batched._waiting and not batched._pending_partial  # nothing left behind


async def test_partials_can_queue_behind_finals_in_batches_of_their_own(quilter, jfk_audio):
    """With partials behind finals (off by default), a partial submitted
    while finals wait is queued, not shed, and decodes after them, in a
    batch of partials only."""
    worker = await _worker(batch_size=4, batch_wait_ms=BUDGET_MS, partials_behind_finals=True)
    try:
        busy = await _busy(worker, jfk_audio)
        order: list[str] = []
        futs = {f"final-{i}": worker.submit(f"behind-f{i}", quilter, final=True) for i in range(3)}
        futs |= {f"partial-{i}": worker.submit(f"behind-p{i}", quilter, final=False) for i in range(3)}
        assert not any(f.cancelled() for f in futs.values())
        for name, fut in futs.items():
            fut.add_done_callback(lambda _f, name=name: order.append(name))
        results = dict(zip(futs, await asyncio.gather(*futs.values()), strict=True))
        await busy
        assert order[:3] == ["final-0", "final-1", "final-2"], order
        assert {results[f"final-{i}"].batch_size for i in range(3)} == {3}
        # The three partials shared one decode of their own, after the finals.
        assert {results[f"partial-{i}"].batch_size for i in range(3)} == {3}
        assert sorted(order[3:]) == ["partial-0", "partial-1", "partial-2"], order
    finally:
        await worker.close()


async def test_deep_backlog_sheds_partials_never_finals(batched, quilter, jfk_audio):
    busy = await _busy(batched, jfk_audio)
    # The backlog is counted in batches: shed_partials_above batches deep.
    shed_at = batched.config.shed_partials_above * batched.config.batch_size
    queued = [batched.submit(f"deep-{i}", quilter, final=False) for i in range(shed_at)]
    shed_before = batched.shed_partials
    extra = batched.submit("deep-extra", quilter, final=False)
    assert extra.cancelled() and batched.shed_partials == shed_before + 1
    final = batched.submit("deep-final", quilter, final=True)
    assert not final.done()
    result = await final
    assert result.text
    for fut in queued:
        fut.cancel()
    await busy
    await _until(lambda: batched.queue_depth == 0 and batched.in_flight == 0, timeout=30)


async def test_a_shed_partial_leaves_the_calls_queued_one_in_place(unbatched, quilter, jfk_audio):
    """A call's newer partial replaced its queued one before the shedding
    rules looked at it: shed (another call's final waits), the call had
    neither its caption nor the pause decode that picks its endpoint window.
    Now the queued one stays and is decoded."""
    assert not unbatched.config.partials_behind_finals
    busy = await _busy(unbatched, jfk_audio)
    queued = unbatched.submit("keep-a", quilter, final=False)
    final = unbatched.submit("keep-b", quilter, final=True)
    shed_before = unbatched.shed_partials
    newer = unbatched.submit("keep-a", quilter, final=False, marks=True)  # finals wait: shed
    assert newer.cancelled() and unbatched.shed_partials == shed_before + 1
    assert not queued.done()
    results = await asyncio.gather(queued, final, busy)
    assert results[0].text and results[1].text


async def test_one_bad_item_fails_alone_its_batch_mates_succeed(batched, quilter, jfk_audio):
    """A malformed item (stereo samples x channels) makes the batched call
    raise; the worker decodes the batch one by one and only that job fails."""
    busy = await _busy(batched, jfk_audio)
    fallbacks = batched.batch_fallbacks
    good1 = batched.submit("bad-1", quilter, final=True)
    bad = batched.submit("bad-2", np.stack([quilter, quilter], axis=1), final=True)
    good2 = batched.submit("bad-3", quilter, final=True)
    results = await asyncio.gather(good1, bad, good2, return_exceptions=True)
    await busy
    assert isinstance(results[1], ValueError), results[1]
    assert batched.batch_fallbacks == fallbacks + 1
    reference = shared_clip("librispeech_quilter.wav").reference
    for result in (results[0], results[2]):
        assert not isinstance(result, BaseException), result
        assert word_error_rate(reference, result.text) <= 0.2, result.text


async def test_a_hung_batch_tries_only_its_finals_again(batched, quilter, jfk_audio, monkeypatch):
    """A batch killed for running over its limit (a hung decoder child:
    injected here, no audio hangs tiny.en on demand) was decoded again item
    by item, the item that hung too: every call's finals waited out a
    second limit. Its partials fail now (their turn's final brings the
    words); its finals, which callers wait on, are decoded alone."""
    from asr.lanes import DecoderCrashed

    lane = batched.lane
    batches: list[int] = []

    async def hangs(audios, finals, marks):
        batches.append(len(audios))
        raise DecoderCrashed("the decoder ran over its 60 s limit and was killed")

    monkeypatch.setattr(lane, "decode_batch", hangs)
    reference = shared_clip("librispeech_quilter.wav").reference
    for final in (False, True):
        busy = await _busy(batched, jfk_audio)
        jobs = [batched.submit(f"hung-{final}-{i}", quilter, final=final) for i in range(2)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await busy
        assert batches[-1] == 2, (batches, results)  # the two shared a batch, which hung
        if final:  # decoded alone, on the lane's own decode
            for result in results:
                assert not isinstance(result, BaseException), result
                assert word_error_rate(reference, result.text) <= 0.2, result.text
        else:
            assert all(isinstance(result, DecoderCrashed) for result in results), results


async def test_batching_off_is_one_decode_at_a_time(unbatched, speech):
    results = await asyncio.gather(*(unbatched.submit(f"off{i}", a, final=True) for i, (_, a) in enumerate(speech[:4])))
    assert [r.batch_size for r in results] == [1, 1, 1, 1]


def test_cli_flags_set_batching():
    args = build_parser().parse_args(
        ["serve", "--asr-batch-size", "1", "--asr-batch-wait-ms", "7.5", "--asr-partial-budget", "0"]
    )
    cfg = config_from_args(args).asr
    assert (cfg.batch_size, cfg.batch_wait_ms, cfg.partial_budget) == (1, 7.5, 0.0)
    defaults = config_from_args(build_parser().parse_args(["serve"])).asr
    # By device: off on a CPU, 16 on a GPU, unless given.
    assert (defaults.batch_size, defaults.batch_wait_ms) == (1, ASRConfig.batch_wait_ms)
    gpu = config_from_args(build_parser().parse_args(["serve", "--asr-device", "cuda"])).asr
    assert gpu.batch_size == ASRConfig(device="cuda").batch_size == 16
    assert config_from_args(build_parser().parse_args(["serve", "--asr-batch-size", "4"])).asr.batch_size == 4
    # The partials' budget: on a CPU only, unless given (0 is "no limit" on either).
    assert defaults.partial_budget == ASRConfig().partial_budget == CPU_PARTIAL_BUDGET > 0
    assert gpu.partial_budget == 0.0
    # "auto" takes the GPU's defaults only where CTranslate2 sees a GPU (CI: none).
    auto = ASRConfig(device="auto")
    expected = (16, 0.0) if on_gpu("auto") else (1, CPU_PARTIAL_BUDGET)
    assert (auto.batch_size, auto.partial_budget) == expected
    # The compute type: int8 on a CPU, float16 on a GPU, unless given.
    assert (defaults.compute_type, gpu.compute_type) == ("int8", "float16")
    assert auto.compute_type == ("float16" if on_gpu("auto") else "int8")
    typed = ["serve", "--asr-device", "cuda", "--asr-compute-type", "int8_float16"]
    assert config_from_args(build_parser().parse_args(typed)).asr.compute_type == "int8_float16"
    given = ["serve", "--asr-device", "cuda", "--asr-partial-budget", "0.2"]
    assert config_from_args(build_parser().parse_args(given)).asr.partial_budget == 0.2
    # Partials behind finals: off on either device (H200: finals p95 66 ms against 100 at 256 calls), unless given.
    assert (defaults.partials_behind_finals, gpu.partials_behind_finals) == (False, False)
    flag = ["serve", "--asr-device", "cuda", "--asr-partials-behind-finals"]
    assert config_from_args(build_parser().parse_args(flag)).asr.partials_behind_finals is True


def _stats_of_threads(name: str) -> list[list[str]]:
    """/proc/<pid>/task/<tid>/stat fields after the command name, one list
    per thread of this process named ``name``: [11] + [12] are its CPU
    clock ticks (user + system), [16] its nice value."""
    stats = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                stats.append((task / "stat").read_text().rsplit(")", 1)[1].split())
        except OSError:
            continue  # the thread ended while we looked
    return stats


def _cpu_ticks_of_threads(name: str) -> int:
    return sum(int(fields[11]) + int(fields[12]) for fields in _stats_of_threads(name))


def _nice_of_threads(name: str) -> list[int]:
    return [int(fields[16]) for fields in _stats_of_threads(name)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
async def test_the_decoder_and_its_native_threads_can_rank_below_the_rest_of_the_server():
    """--asr-nice: every thread of the decoder (ours and the ones CTranslate2
    started from it) carries the configured nice value; the event loop's
    does not. By default the decoder keeps the server's rank."""
    assert ASRConfig.nice == 0
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    others = await asyncio.to_thread(_nice_of_threads, "asr")  # this module's other workers
    worker = await _worker(nice=10, threads=2, batch_size=1)
    try:
        ranks = await asyncio.to_thread(_nice_of_threads, "asr")
    finally:
        await worker.close()
    born = len(ranks) - len(others)
    assert born >= 2, ranks  # our decode thread and CTranslate2's
    # Every thread the new worker started, and only those, at +10.
    assert ranks.count(min(19, base + 10)) == born and set(others) <= {base}, ranks

    def asr(*flags: str) -> ASRConfig:
        return config_from_args(build_parser().parse_args(["serve", *flags])).asr

    assert asr("--asr-nice", "3").nice == 3
    assert asr("--asr-nice", "-5").nice == 0  # never above the rest of the server


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
async def test_finals_can_have_a_decoder_ranked_above_the_partials(quilter):
    """--asr-finals-nice: finals decode on their own threads at their own
    rank, partials on the lower-ranked ones; both give the same words."""
    worker = await _worker(nice=10, finals_nice=0, batch_size=1)
    try:
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert set(await asyncio.to_thread(_nice_of_threads, "asr-final")) == {base}

        async def ticks_now() -> dict[str, int]:
            # After OpenMP's threads have stopped spinning (Intel's block time is 200 ms).
            await asyncio.sleep(0.6)
            return {lane: await asyncio.to_thread(_cpu_ticks_of_threads, lane) for lane in ("asr", "asr-final")}

        ticks = await ticks_now()
        finals = [await worker.submit(f"a{i}", quilter, final=True) for i in range(3)]
        after_finals = await ticks_now()
        partial = await worker.submit("b", quilter, final=False)
        after_partial = await ticks_now()
        # Each lane's threads did the work routed to it (a decode of this
        # clip takes tens of clock ticks; the idle lane a tick at most).
        assert after_finals["asr-final"] - ticks["asr-final"] > 5 >= after_finals["asr"] - ticks["asr"]
        assert after_partial["asr"] - after_finals["asr"] > 1 >= after_partial["asr-final"] - after_finals["asr-final"]
        assert finals[0].text == partial.text and "apostle of the middle classes" in partial.text.lower()
        assert worker.decodes == {FINAL: 3, PARTIAL: 1}
        assert worker.finals_decoder is not None and worker.finals_decoder is not worker.decoder
    finally:
        await worker.close()
    # The same rank as the partials still gets finals a decoder of their own.
    same = await _worker(nice=0, finals_nice=0, batch_size=1)
    try:
        assert same.finals_decoder is not None and same.finals_decoder is not same.decoder
    finally:
        await same.close()
    assert config_from_args(build_parser().parse_args(["serve"])).asr.finals_nice is None  # one decoder by default
    assert config_from_args(build_parser().parse_args(["serve", "--asr-finals-nice", "0"])).asr.finals_nice == 0


def test_cli_pad_windows(capsys):
    """``--asr-pad-windows`` sets the Whisper windows (sorted, deduplicated);
    a window outside 1-30 s or a word is refused with the flag named."""
    args = build_parser().parse_args(["serve", "--asr-pad-windows", "20,5,10,30,5"])
    assert config_from_args(args).asr.pad_windows_s == (5, 10, 20, 30)
    assert config_from_args(build_parser().parse_args(["serve"])).asr.pad_windows_s == ASRConfig.pad_windows_s
    for bad in ("0,10", "10,45", "ten", ","):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["serve", "--asr-pad-windows", bad])
        assert exc.value.code == 2
        assert "--asr-pad-windows" in capsys.readouterr().err


async def test_short_turns_decode_in_a_5_s_window(speech, alone):
    """With 5 s windows, a turn of at most 5 s is decoded in one (not 10 s),
    and the transcripts lose nothing against the default windows."""
    worker = await _worker(batch_size=1, pad_windows_s=(5, 10, 20, 30))
    try:
        results = await asyncio.gather(*(worker.submit(f"w{i}", a, final=True) for i, (_, a) in enumerate(speech)))
    finally:
        await worker.close()
    short = [i for i, (_, a) in enumerate(speech) if len(a) / 16000 <= 5]
    assert short, "the speech fixture has no turn of 5 s or less"
    assert all(results[i].window_s == 5 for i in short)
    assert all(r.window_s == a.window_s for r, a, (_, audio) in zip(results, alone, speech, strict=True)
               if len(audio) / 16000 > 5)  # fmt: skip
    refs = [u.reference for u, _ in speech]
    wer_default = corpus_wer(list(zip(refs, [r.text for r in alone], strict=True)))
    wer_5s = corpus_wer(list(zip(refs, [r.text for r in results], strict=True)))
    assert wer_5s <= wer_default + 0.02, (wer_default, wer_5s)


async def test_a_final_that_stopped_early_is_done_again_through_the_decoder_process():
    """The decoder process hands back a re-decoded final (asr/whisper.py
    cut_short) as such, and the worker counts it for /metrics; the same
    audio as a partial is not decoded twice (its words come again with the
    final, and a caller playing music must not make every partial cost a
    30 s decode)."""
    from tests.conftest import menu_that_stops_early
    from voice.server.metrics import Metrics

    menu = menu_that_stops_early()
    worker = await _worker(batch_size=1, decoder_process=True)
    metrics = Metrics()
    worker.on_redecode = metrics.observe_asr_redecode
    try:
        result = await worker.submit("menu", menu, final=True)
        partial = await worker.submit("menu", menu, final=False)
    finally:
        await worker.close()
    assert result.redecoded and "eject the last user" in result.text.lower(), result.text
    assert not partial.redecoded and partial.window_s == 10
    assert worker.redecodes == {FINAL: 1, PARTIAL: 0}
    assert metrics.registry.get_sample_value("firstline_asr_redecodes_total", {"kind": "final"}) == 1


async def test_a_re_decode_in_a_batch_is_charged_to_its_own_call_and_holds_no_one_back(quilter, monkeypatch):
    """A final decoded again in the 30 s window (asr/whisper.py cut_short)
    inside a batch: its second decode is charged to its own call's share of
    the decoder, not split with the call it happened to be batched with, and
    is done after that call has its words (Decoded.retry_alone), through the
    decoder process."""
    import asr.worker
    from tests.conftest import menu_that_stops_early

    # The two calls are charged a re-decode apart, and usage halves every
    # 10 s: on a slow machine the decay alone passed the 10 % compared.
    monkeypatch.setattr(asr.worker, "USAGE_HALF_LIFE_S", 1e9)
    worker = await _worker(batch_size=2, batch_wait_ms=BUDGET_MS, batch_windows="pad", decoder_process=True)
    done_at: dict[str, float] = {}
    try:
        futures = [
            worker.submit("menu", menu_that_stops_early(), final=True),
            worker.submit("other", quilter, final=True),
        ]
        for name, future in zip(("menu", "other"), futures, strict=True):
            future.add_done_callback(lambda _, n=name: done_at.setdefault(n, time.monotonic()))
        menu, other = await asyncio.gather(*futures)
        used = worker.usage("menu"), worker.usage("other")
    finally:
        await worker.close()
    assert menu.batch_size == other.batch_size == 2, (menu.batch_size, other.batch_size)
    assert menu.redecoded and menu.redecode_s > 0 and other.redecode_s == 0
    assert not menu.retry_alone and not other.retry_alone
    assert used[0] - used[1] == pytest.approx(menu.redecode_s, rel=0.1), (used, menu.redecode_s)
    # The other call's words came before the re-decode began, not after it.
    assert done_at["menu"] - done_at["other"] >= 0.9 * menu.redecode_s, (done_at, menu.redecode_s)


async def test_a_failure_outside_the_decodes_fails_those_turns_and_the_worker_goes_on(unbatched, quilter):
    """A bug past the per-item handling (delivery raising; a stand-in for
    any such bug) ended the worker task, and every later decode of every
    call waited for good. Now those turns fail and the next is served."""
    real = unbatched._deliver
    broken: list[str] = []

    def deliver_once_broken(job, result, started):
        if not broken:
            broken.append(job.call_id)
            raise RuntimeError("delivery bug (stand-in)")
        return real(job, result, started)

    unbatched._deliver = deliver_once_broken
    try:
        with pytest.raises(RuntimeError, match="ASR batch failed") as failed:
            await asyncio.wait_for(unbatched.submit("guard-a", quilter, final=True), 20)
        assert "stand-in" in str(failed.value.__cause__)
        after = await asyncio.wait_for(unbatched.submit("guard-b", quilter, final=True), 60)
        assert broken == ["guard-a"] and after.text
    finally:
        unbatched._deliver = real
