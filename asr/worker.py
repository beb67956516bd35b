"""One ASR worker shared by every call on the server.

Whisper decodes run on a single thread (CTranslate2 already uses all the
cores it is given), so calls queue for it. The queue is ordered by
deadline class: a *final* decode (a caller is waiting for a reply) always
goes before a *partial* one, and each call has at most one partial waiting;
a newer partial replaces the older one instead of queueing behind it. That
keeps ASR work per call bounded however fast audio arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from asr.config import ASRConfig
from asr.whisper import Decoded, WhisperDecoder

log = logging.getLogger(__name__)

FINAL = 0
PARTIAL = 1


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    call_id: str = field(compare=False)
    audio: np.ndarray = field(compare=False, repr=False)
    future: asyncio.Future[Decoded] = field(compare=False, repr=False)


class ASRWorker:
    def __init__(self, config: ASRConfig) -> None:
        self.config = config
        self.decoder: WhisperDecoder | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr")
        self._queue: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._pending_partial: dict[str, _Job] = {}
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.decodes = {FINAL: 0, PARTIAL: 0}
        # Observer for decode durations (final?, seconds): the server's metrics.
        self.on_decode: Callable[[bool, float], None] | None = None
        self.shed_partials = 0
        self._finals_waiting = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.decoder = await loop.run_in_executor(self._executor, WhisperDecoder, self.config)
        # Warm-up decode: the first CTranslate2 call allocates its buffers.
        silence = np.zeros(16000, dtype=np.float32)
        await loop.run_in_executor(self._executor, self.decoder.decode, silence)
        self._task = asyncio.create_task(self._run(), name="asr-worker")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, call_id: str, audio: np.ndarray, final: bool) -> asyncio.Future[Decoded]:
        """Queue a decode; the future resolves to its text. A superseded partial
        resolves with CancelledError."""
        loop = asyncio.get_running_loop()
        if self.config.scheduler == "fifo":
            job = _Job(0, next(self._seq), call_id, audio, loop.create_future())
            self._queue.put_nowait(job)
            return job.future
        old = self._pending_partial.pop(call_id, None)
        if old is not None and not old.future.done():
            old.future.cancel()  # stays in the heap; skipped when popped
        future: asyncio.Future[Decoded] = loop.create_future()
        if not final and (self._finals_waiting or self._live_jobs() >= self.config.shed_partials_above):
            # Under load, partials are the first thing to go: a caller waiting
            # for a reply matters more than a live caption.
            self.shed_partials += 1
            future.cancel()
            return future
        job = _Job(FINAL if final else PARTIAL, next(self._seq), call_id, audio, future)
        if final:
            self._finals_waiting += 1
            future.add_done_callback(self._final_done)
        else:
            self._pending_partial[call_id] = job
        self._queue.put_nowait(job)
        return job.future

    def _final_done(self, _future: asyncio.Future[Decoded]) -> None:
        self._finals_waiting -= 1

    def _live_jobs(self) -> int:
        return sum(1 for job in self._queue._queue if not job.future.done())  # type: ignore[attr-defined]

    def forget(self, call_id: str) -> None:
        """The call ended: drop its waiting partial."""
        job = self._pending_partial.pop(call_id, None)
        if job is not None and not job.future.done():
            job.future.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.decoder is not None
        while True:
            job = await self._queue.get()
            if job.future.done():  # cancelled: superseded, or its call ended
                continue
            if self._pending_partial.get(job.call_id) is job:
                del self._pending_partial[job.call_id]
            started = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._executor, self.decoder.decode, job.audio)
            except Exception as exc:  # one bad decode fails one turn, not the server
                log.exception("ASR decode failed for call %s", job.call_id)
                if not job.future.done():
                    job.future.set_exception(exc)
                continue
            self.decodes[job.priority] += 1
            if self.on_decode is not None:
                self.on_decode(job.priority == FINAL, time.perf_counter() - started)
            if not job.future.done():
                job.future.set_result(result)
