"""One ASR worker shared by every call on the server.

Whisper decodes run one at a time (CTranslate2 already uses all the cores
it is given), on a thread of the server or in a process of their own
(``asr/lanes.py``), so calls queue for it. The queue is ordered by
deadline class: a *final* decode (a caller is waiting for a reply) always
goes before a *partial* one, and each call has at most one partial waiting;
a newer partial replaces the older one instead of queueing behind it. That
keeps ASR work per call bounded however fast audio arrives.

Decodes from different calls are batched: when the worker is free it takes
the decodes that are due, finals first (in arrival order), then partials
(longest-waiting caller first), up to ``ASRConfig.batch_size`` of them, and
runs them as one CTranslate2 call. Work that queued while the worker was busy
goes at once; a batch that is not full waits at most ``batch_wait_ms`` from
its oldest job's submission for company, so a lone call loses no more than
that. A batch shares one padded window: with ``batch_windows="same"`` only
decodes of the same window go together. If a batched call raises, its items
are decoded one at a time, so one bad item fails only its own job.

Fair share: a call's place in line is pushed back by the decoder time its
decodes took recently (seconds, halving every ``USAGE_HALF_LIFE_S``), so a
caller who feeds audio as fast as the budget allows, or flaps between
speech and silence, waits behind callers who used little; a normal caller's
final still goes first against anyone's partial. A call that used more than
a quarter of the decoder lately gets no partials at all while another call
is being decoded too: a decode in progress cannot be pre-empted, and an
endless talker's partials re-decode up to 28 s of audio each. A call that
feeds audio faster than real time (``streaming/fair_share.py``) is held back
the same way from its first burst, before it has used anything, and its
finals queue behind every real-time call's.

Under load, partials go first: a partial is shed at submission while a final
is waiting (unless ``partials_behind_finals``) or when the backlog is
``shed_partials_above`` batches deep, and a
queued partial older than its call's queued final is dropped (the final
covers the same audio). Finals are never shed or reordered behind partials.
All partials together also get a decoder-time budget
(``ASRConfig.partial_budget`` seconds of decoding per second): on a CPU the
decoder shares its cores with the LLM, so partials the queue could still
take would slow every reply; past the budget they come less often, for
every call alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from asr.config import ASRConfig
from asr.lanes import DecoderCrashed, DecoderDied, DecoderLane, make_lane
from asr.whisper import MAX_WINDOW_S, SAMPLE_RATE, Decoded, WhisperDecoder, keep_longer, window_for
from streaming.fair_share import LowPriority
from streaming.rate import TokenBucket

log = logging.getLogger(__name__)

FINAL = 0
PARTIAL = 1
# Recent decoder time per call decays with this half-life (fair share).
USAGE_HALF_LIFE_S = 10.0
USAGE_MAX_CALLS = 1024
# How long a call that ended is remembered as ended (longer than any decode).
ENDED_KEPT_S = 60.0
# The decayed usage of a call that kept the decoder busy all the time.
USAGE_FULL_S = USAGE_HALF_LIFE_S / math.log(2)
# A call that used more than this share of the decoder lately gets no
# partials while another call is using it too (its finals still go).
PARTIAL_SHARE = 0.25
# A low-priority call's jobs (streaming/fair_share.py) sort as if submitted
# this much later: behind every real-time call's, in order among themselves.
LOW_PRIORITY_DELAY_S = 60.0


@dataclass(eq=False)
class _Job:
    priority: int  # FINAL or PARTIAL
    seq: int  # arrival order
    call_id: str
    audio: np.ndarray = field(repr=False)
    future: asyncio.Future[Decoded] = field(repr=False)
    window: int  # padded window (s) this decode needs
    submitted: float  # time.monotonic() at submit
    # For a partial: when its call's oldest unserved partial was submitted. A
    # newer partial replacing an older one keeps the older one's place, so a
    # caller who speaks continuously is not sent to the back each time.
    waiting_since: float
    marks: bool = False  # read Whisper's sentence-end share too (Decoded.sentence_end_p)

    @property
    def live(self) -> bool:
        return not self.future.done()


class ASRWorker:
    def __init__(self, config: ASRConfig, low: LowPriority | None = None) -> None:
        self.config = config
        # Calls feeding audio faster than real time: served after the others.
        self.low = low if low is not None else LowPriority(0)
        # Named for the OS too: the decoder's own threads start from it and
        # carry the name (per-stage CPU in benchmarks/bench.py). A thread of
        # this process, or a process of its own (asr/lanes.py).
        self.lane = make_lane(config, "asr", config.nice, self._decoder_restarted)
        # Finals on a decoder of their own (ASRConfig.finals_nice, at that
        # rank, even the same one): a second model copy on its own threads,
        # so a final never waits for a partial's decode to end. None: finals
        # use the decoder above.
        self.finals_lane = (
            make_lane(config, "asr-final", config.finals_nice, self._decoder_restarted)
            if config.finals_nice is not None
            else None
        )
        # Jobs not yet handed to a decode, by seq (so in arrival order). A job
        # whose future is cancelled (superseded, forgotten, or cancelled by its
        # awaiting task) leaves at once: it is never decoded or counted.
        self._waiting: dict[int, _Job] = {}
        self._pending_partial: dict[str, _Job] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.decodes = {FINAL: 0, PARTIAL: 0}
        # Of those, decoded again in the 30 s window (asr/whisper.py cut_short).
        self.redecodes = {FINAL: 0, PARTIAL: 0}
        # Observer for a decoder process that died and was started again (asr/lanes.py): the server's metrics.
        self.on_decoder_restart: Callable[[], None] | None = None
        # Observer for decode durations (final?, seconds): the server's metrics.
        self.on_decode: Callable[[bool, float], None] | None = None
        self.on_redecode: Callable[[bool], None] | None = None  # (final?) a decode done again
        self.shed_partials = 0
        self._finals_waiting = 0  # queued or being decoded
        # Batches run, items in them, and the items now being decoded.
        self.batches = 0
        self.batched_items = 0
        self.in_flight = 0
        self.batch_fallbacks = 0
        # Finals decoded once more after their decoder process died under them.
        self.crash_retries = 0
        # call -> (decoder seconds used, when), decayed on read: fair share.
        self._used: dict[str, tuple[float, float]] = {}
        # Calls that ended (forget(ended=True)): a decode of theirs still
        # running then is not charged, or their use came back for a minute.
        self._ended: dict[str, float] = {}
        # Decoder seconds all partials may still use (None: no limit).
        self._partial_budget = (
            TokenBucket(config.partial_budget_burst_s, config.partial_budget) if config.partial_budget else None
        )
        self.over_budget_partials = 0
        self.on_over_budget: Callable[[], None] | None = None  # the server's metrics

    def _decoder_restarted(self) -> None:
        if self.on_decoder_restart is not None:
            self.on_decoder_restart()

    @property
    def decoder(self) -> WhisperDecoder | None:
        """The model, where it is in this process (None in a decoder process)."""
        return self.lane.decoder

    @property
    def finals_decoder(self) -> WhisperDecoder | None:
        return self.finals_lane.decoder if self.finals_lane is not None else None

    async def start(self) -> None:
        lanes = [self.lane] if self.finals_lane is None else [self.lane, self.finals_lane]
        for lane in lanes:
            await lane.start()
        # Warm-up decode: the first CTranslate2 call allocates its buffers; a
        # full batch too, so the first busy moment does not pay for it.
        silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
        for lane in lanes:
            await lane.decode(silence)
            if self.config.batch_size > 1:
                await lane.decode_batch([silence] * self.config.batch_size)
        self._task = asyncio.create_task(self._run(), name="asr-worker")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.lane.close()
        if self.finals_lane is not None:
            self.finals_lane.close()

    def _lane(self, batch: list[_Job]) -> DecoderLane:
        """Where a batch decodes: a batch holding a final goes to the finals'
        decoder when they have their own rank."""
        if self.finals_lane is not None and any(job.priority == FINAL for job in batch):
            return self.finals_lane
        return self.lane

    @property
    def queue_depth(self) -> int:
        """Decodes waiting for the worker: live jobs only, not the ones being
        decoded now, nor superseded or forgotten ones (admission reads this)."""
        return sum(1 for job in self._waiting.values() if job.live)

    def submit(self, call_id: str, audio: np.ndarray, final: bool, marks: bool = False) -> asyncio.Future[Decoded]:
        """Queue a decode; the future resolves to its text. A superseded partial
        resolves with CancelledError. ``marks``: the decode reads Whisper's
        sentence-end share too (an end-of-turn input)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decoded] = loop.create_future()
        now = time.monotonic()
        priority = FINAL if final else PARTIAL
        # No pop of _ended here: a call's id is never reused (a re-attached
        # call is a new session with its own), and an ended call's last
        # finals, handed on by its session after the end, cleared it and
        # charged the dead call's use back for a minute.
        if self.config.scheduler == "fifo":
            # Arrival order for everything (_due ignores the priority here).
            self._enqueue(_Job(priority, next(self._seq), call_id, audio, future, self._window(audio), now, now, marks))
            return future
        old = self._pending_partial.get(call_id)
        old_live = old is not None and old.live
        shed_at = self.config.shed_partials_above * max(1, self.config.batch_size)
        finals_block = self._finals_waiting > 0 and not self.config.partials_behind_finals
        # The call's queued partial is replaced only by a decode that is
        # taken: shed after it was cancelled, the call had neither (its
        # caption, or the pause decode that chooses its endpoint window).
        if not final and (finals_block or self.queue_depth - old_live >= shed_at or self._over_share(call_id, now)):
            # Under load, partials are the first thing to go: a caller waiting
            # for a reply matters more than a live caption.
            self.shed_partials += 1
            future.cancel()
            return future
        if not final and self._partial_budget is not None and not self._partial_budget.has_credit(now):
            # Partials have had their share of the cores lately: this one is
            # skipped, the call's next one (after its interval) may go.
            self.shed_partials += 1
            self.over_budget_partials += 1
            if self.on_over_budget is not None:
                self.on_over_budget()
            future.cancel()
            return future
        replaced = self._drop_partial(call_id)
        since = now if replaced is None else replaced.waiting_since
        job = _Job(priority, next(self._seq), call_id, audio, future, self._window(audio), now, since, marks)
        if final:
            self._finals_waiting += 1
            future.add_done_callback(self._final_done)
        else:
            self._pending_partial[call_id] = job
        self._enqueue(job)
        return future

    def forget(self, call_id: str, ended: bool = False) -> None:
        """Drop the call's waiting partial; ``ended``: the call is over, and
        its use of the decoder too (a call that hung up after seconds of
        decodes made the only call left look like it shared the decoder, and
        its partials were shed for a minute while the decoder idled)."""
        if ended:
            self._used.pop(call_id, None)
            now = time.monotonic()
            self._ended[call_id] = now
            if len(self._ended) > USAGE_MAX_CALLS:  # bounded: only the last minute's are read
                self._ended = {c: at for c, at in self._ended.items() if now - at < ENDED_KEPT_S}
        self._drop_partial(call_id)

    def _drop_partial(self, call_id: str) -> _Job | None:
        """Cancel the call's queued partial; the one cancelled, if it was live."""
        job = self._pending_partial.pop(call_id, None)
        if job is None or not job.live:
            return None
        job.future.cancel()
        self._waiting.pop(job.seq, None)
        return job

    def _window(self, audio: np.ndarray) -> int:
        seconds = min(len(audio), MAX_WINDOW_S * SAMPLE_RATE) / SAMPLE_RATE  # the decoder keeps the last 30 s
        return window_for(seconds, self.config.pad_windows_s)

    def _enqueue(self, job: _Job) -> None:
        self._waiting[job.seq] = job
        # Whoever cancels it (a task awaiting it, forget, a newer partial), a
        # cancelled job leaves the queue; a no-op once the worker took it.
        job.future.add_done_callback(lambda _f: self._discard(job))
        self._wake.set()

    def _discard(self, job: _Job) -> None:
        self._waiting.pop(job.seq, None)
        if self._pending_partial.get(job.call_id) is job:
            del self._pending_partial[job.call_id]

    def _final_done(self, _future: asyncio.Future[Decoded]) -> None:
        self._finals_waiting -= 1

    # ---- batching --------------------------------------------------------

    def _due(self) -> list[_Job]:
        """Live waiting jobs in serving order."""
        live = [job for job in self._waiting.values() if job.live]
        if self.config.scheduler == "fifo":
            return live
        finals = [job for job in live if job.priority == FINAL]
        # A partial submitted before its call's queued final is moot: the final
        # decodes the same turn's audio, and the caller wants that.
        last_final = {job.call_id: job.seq for job in finals}
        partials = []
        for job in live:
            if job.priority != PARTIAL:
                continue
            if job.seq < last_final.get(job.call_id, -1):
                job.future.cancel()
                self._discard(job)
                continue
            partials.append(job)
        now = time.monotonic()
        finals.sort(key=lambda job: (job.submitted + self._penalty(job.call_id, now), job.seq))
        partials.sort(key=lambda job: (job.waiting_since + self._penalty(job.call_id, now), job.seq))
        if finals and not self.config.batch_partials_with_finals:
            return finals
        return finals + partials

    def _next_batch(self) -> list[_Job]:
        due = self._due()
        if not due:
            return []
        limit = max(1, self.config.batch_size)
        if self.config.batch_windows == "same":
            head = due[0].window
            return [job for job in due if job.window == head][:limit]
        return due[:limit]

    async def _gather(self) -> list[_Job]:
        """Wait for due work; give a batch that is not full until its oldest
        job has waited ``batch_wait_ms`` for more to join."""
        budget = self.config.batch_wait_ms / 1000.0
        while True:
            self._wake.clear()
            batch = self._next_batch()
            if not batch:
                await self._wake.wait()
                continue
            if len(batch) >= self.config.batch_size or budget <= 0:
                return batch
            remaining = min(job.submitted for job in batch) + budget - time.monotonic()
            if remaining <= 0:
                return batch
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            for job in batch:
                self._discard(job)
            self.in_flight = len(batch)
            try:
                await self._decode(batch)
            except Exception as exc:
                # Past the per-item handling (a bug in delivery or in a
                # metrics hook): those calls' turns fail, the worker goes on.
                # Uncaught, it ended the worker task and every later decode,
                # of every call, waited for good.
                log.exception("ASR worker: a batch of %d failed outside its decodes", len(batch))
                # Wrapped: a future refuses some exceptions (StopIteration),
                # and raising here would end the worker after all.
                failed = RuntimeError(f"ASR batch failed: {type(exc).__name__}")
                failed.__cause__ = exc
                for job in batch:
                    if job.live:
                        job.future.set_exception(failed)
            finally:
                self.in_flight = 0

    async def _decode(self, batch: list[_Job]) -> None:
        started = time.monotonic()
        if len(batch) == 1:
            await self._decode_one(batch[0], started)
            return
        try:
            results = await self._lane(batch).decode_batch(
                [job.audio for job in batch], [job.priority == FINAL for job in batch], [job.marks for job in batch]
            )
        except Exception as exc:
            # One malformed item or an out-of-memory on the batch: decode each
            # item alone (in serving order), so only a bad item fails its job.
            log.warning("batched ASR decode of %d failed; decoding one by one", len(batch), exc_info=True)
            self.batch_fallbacks += 1
            # A hung batch (killed at its limit): one item may hang each child
            # it meets, so only the finals, which a caller waits on, are tried
            # again; a partial is superseded by its turn's final anyway.
            hung = isinstance(exc, DecoderCrashed) and not isinstance(exc, DecoderDied)
            for job in batch:
                if not job.live:
                    continue
                if hung and job.priority != FINAL:
                    job.future.set_exception(exc)
                    continue
                await self._decode_one(job, time.monotonic())
            return
        self.batches += 1
        self.batched_items += len(batch)
        # The batch's time is shared; a decode done again (asr/whisper.py
        # cut_short) is charged to the call whose audio needed it, and done
        # after the batch's other items have their words.
        share = max(0.0, time.monotonic() - started) / len(batch)
        for job, result in zip(batch, results, strict=True):
            if not result.retry_alone:
                self._charge(job.call_id, share, job.priority)
                self._deliver(job, result, started)
        for job, result in zip(batch, results, strict=True):
            if result.retry_alone:
                await self._decode_again(job, result, share, started)

    async def _decode_again(self, job: _Job, first: Decoded, share: float, started: float) -> None:
        """A batch item that stopped early, decoded again alone in 30 s."""
        redo_started = time.monotonic()
        if job.live:
            try:
                first = keep_longer(first, await self._lane([job]).decode_long(job.audio), 0.0)
            except Exception:  # its first decode stands: the turn keeps what was heard
                log.warning("ASR decode again of call %s failed; keeping the first", job.call_id, exc_info=True)
        first = dataclasses.replace(first, redecode_s=time.monotonic() - redo_started, retry_alone=False)
        self._charge(job.call_id, share + first.redecode_s, job.priority)
        self._deliver(job, first, started)

    async def _decode_one(self, job: _Job, started: float) -> None:
        try:
            try:
                result = await self._lane([job]).decode(job.audio, job.priority == FINAL, job.marks)
            except DecoderDied:
                if job.priority != FINAL or not job.live:
                    raise  # a partial is superseded by the next one anyway
                # A caller waits on this final: once more on the new child (the
                # lane waits for it). If the audio is what kills the decoder, the
                # second death fails the turn and the child restarts again.
                log.warning("the ASR decoder died under call %s's final; decoding it again", job.call_id)
                self.crash_retries += 1
                result = await self._lane([job]).decode(job.audio, True, job.marks)
        except Exception as exc:  # one bad decode fails one turn, not the server
            log.exception("ASR decode failed for call %s", job.call_id)
            if job.live:
                job.future.set_exception(exc)
            return
        self.batches += 1
        self.batched_items += 1
        self._charge(job.call_id, time.monotonic() - started, job.priority)
        self._deliver(job, result, started)

    def usage(self, call_id: str, now: float | None = None) -> float:
        """Decoder seconds ``call_id`` used recently (decayed)."""
        entry = self._used.get(call_id)
        if entry is None:
            return 0.0
        used, at = entry
        now = time.monotonic() if now is None else now
        return used * 0.5 ** (max(0.0, now - at) / USAGE_HALF_LIFE_S)

    def _penalty(self, call_id: str, now: float) -> float:
        """How much later than its submission a job of ``call_id`` sorts."""
        return self.usage(call_id, now) + (LOW_PRIORITY_DELAY_S if call_id in self.low else 0.0)

    def _over_share(self, call_id: str, now: float) -> bool:
        """``call_id`` has had more than its share of the decoder lately (or
        feeds audio faster than real time) and another call is using it too:
        its partials (live captions, a prefill) would slow the other call's
        turns. A lone call is never held back."""
        if call_id not in self.low and self.usage(call_id, now) <= PARTIAL_SHARE * USAGE_FULL_S:
            return False
        return any(c != call_id and self.usage(c, now) > 0.05 for c in self._used)

    def _charge(self, call_id: str, seconds: float, priority: int) -> None:
        now = time.monotonic()
        if priority == PARTIAL and self._partial_budget is not None:
            self._partial_budget.charge(seconds, now)
        ended = self._ended.get(call_id)
        if ended is not None and now - ended < ENDED_KEPT_S:
            return  # its last decode, done after it hung up: no share left to keep
        self._used[call_id] = (self.usage(call_id, now) + seconds, now)
        if len(self._used) > USAGE_MAX_CALLS:  # ended calls' entries decay to nothing: drop them
            self._used = {c: e for c, e in self._used.items() if self.usage(c, now) > 0.01}

    def _deliver(self, job: _Job, result: Decoded, started: float) -> None:
        result.queue_s = started - job.submitted
        self.decodes[job.priority] += 1
        if self.on_decode is not None:
            self.on_decode(job.priority == FINAL, result.decode_s)
        if result.redecoded:
            self.redecodes[job.priority] += 1
            if self.on_redecode is not None:
                self.on_redecode(job.priority == FINAL)
        if job.live:
            job.future.set_result(result)
