"""One worker thread whose queue is ordered by priority, then by arrival.

Every call's speech goes through one TTS thread (streaming/tts.py). Each
playout keeps at most one sentence waiting there, so with N calls talking a
reply's first sentence, which the caller is waiting for in silence, queued
behind up to N-1 later sentences of other replies that had seconds of audio
still playing ahead of them. With priorities it waits only for the one
running.

An :class:`concurrent.futures.Executor`, so ``loop.run_in_executor`` works
with it (at :data:`LATER`); a job cancelled while it waits (its future
cancelled, as ``asyncio.wrap_future`` does when the awaiting task is) is
skipped, not run.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from streaming.threads import name_os_thread

FIRST = 0  # a reply's first sentence, the voice's load: someone is waiting in silence
LATER = 1  # every other sentence: audio ahead of it is still playing

_STOP = -1  # ahead of every job: the thread ends


class PriorityWorker(Executor):
    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self._jobs: queue.PriorityQueue[tuple[int, int, Future[Any] | None, Callable[..., Any] | None, tuple, dict]]
        self._jobs = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.submit_at(LATER, fn, *args, **kwargs)

    def submit_at(self, priority: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` after every job of a lower ``priority``
        number and every one of the same that came before it."""
        if priority < 0:
            raise ValueError("priorities are 0 or more")
        future: Future[Any] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
                self._thread.start()
            self._jobs.put((priority, next(self._order), future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        name_os_thread(self.thread_name)
        while True:
            priority, _, future, fn, args, kwargs = self._jobs.get()
            if priority == _STOP or future is None or fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to whoever waits on it, as an executor does
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
            thread = self._thread
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job[2] is not None:
                    job[2].cancel()
        self._jobs.put((_STOP, next(self._order), None, None, (), {}))
        if wait and thread is not None:
            thread.join()
