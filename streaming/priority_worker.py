"""One worker thread that runs the job due soonest first.

Every call's speech goes through one TTS thread (streaming/tts.py). Each
playout keeps at most one sentence waiting there, and a sentence is due when
the audio ahead of it runs out: now for a reply's first sentence (the caller
waits in silence), later for one whose call still has audio playing. In
arrival order a first sentence queued behind up to N-1 other calls' later
ones; earliest due first, it waits only for the one running, and a later
sentence still goes first once its own audio is about to run out (a job
only gets more urgent as it waits: none waits for ever).

An :class:`concurrent.futures.Executor`, so ``loop.run_in_executor`` works
with it (due at once); a job cancelled while it waits (its future cancelled,
as ``asyncio.wrap_future`` does when the awaiting task is) is skipped.
"""

from __future__ import annotations

import atexit
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from streaming.threads import name_os_thread

# At exit the jobs waiting are cancelled and the one running is given this
# long to finish (a synthesis inside native code), not for ever: a voice
# still downloading held a stopped server up until the download ended.
EXIT_WAIT_S = 5.0

_Job = tuple[float, int, Future[Any] | None, Callable[..., Any] | None, tuple[Any, ...], dict[str, Any]]


class PriorityWorker(Executor):
    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self._jobs: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.submit_due(time.monotonic(), fn, *args, **kwargs)

    def submit_due(self, due: float, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` after the jobs due before ``due``
        (``time.monotonic()`` seconds) and those due at the same time that
        came before it."""
        future: Future[Any] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
                self._thread.start()
                atexit.register(self._at_exit)
            self._jobs.put((due, next(self._order), future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        name_os_thread(self.thread_name)
        try:
            while True:
                _, _, future, fn, args, kwargs = self._jobs.get()
                if future is None or fn is None:
                    return  # shutdown
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to whoever waits on it, as an executor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
        finally:
            self._cancel_waiting()  # nothing is left pending for good

    def _cancel_waiting(self) -> None:
        while True:
            try:
                future = self._jobs.get_nowait()[2]
            except queue.Empty:
                return
            if future is not None:
                future.cancel()

    def _at_exit(self) -> None:
        self.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(EXIT_WAIT_S)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As an executor's: the jobs waiting run first unless
        ``cancel_futures``; nothing may be submitted after it."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
            thread = self._thread
        if cancel_futures:
            self._cancel_waiting()
        # After every job still waiting (none may come after it).
        self._jobs.put((math.inf, next(self._order), None, None, (), {}))
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()
