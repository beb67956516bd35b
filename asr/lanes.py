"""Where Whisper decodes run: a thread of the server, or a process of their own.

:class:`asr.worker.ASRWorker` decides what to decode and when; a lane is
where it happens, one decode (or batch) at a time.

- :class:`ThreadLane`: a thread of the server process (on a GPU by default).
- :class:`ProcessLane` (``ASRConfig.decoder_process``, on a CPU by default): a child process
  holding its own copy of the model. The decode never waits for the server's
  GIL between its native calls (the event loop, the TTS and the LLM clients'
  callbacks all take it), and a decoder that crashes (a CUDA fault, a
  segfault in native code, the OOM killer) takes only the decodes it was
  running with it: the lane starts a new child and the calls go on (and
  the worker decodes a final caught in the crash once more on the new
  child, so the caller's turn is not lost to a one-off fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

import numpy as np

from asr.config import ASRConfig
from asr.whisper import Decoded, WhisperDecoder
from streaming.threads import lower_os_thread_priority, name_os_thread, one_blas_thread

log = logging.getLogger(__name__)


class DecoderCrashed(RuntimeError):
    """The decoder's process died, hung or is not running: this decode failed
    (the lane starts a new child)."""


class DecoderDied(DecoderCrashed):
    """The decoder's process died while this decode ran or waited for it
    (killed, crashed): the audio may not be the cause, so the decode may be
    tried once more on the new child. A hung decode (killed for running over
    its limit) is not this: its audio may hang the next child too."""


class DecoderLane(Protocol):
    async def start(self) -> None: ...
    # ``final``: a turn's final decode, done again in 30 s if it stopped early
    # (asr/whisper.py cut_short); partials are not.
    # ``marks``: read Whisper's sentence-end share too (Decoded.sentence_end_p).
    async def decode(self, audio: np.ndarray, final: bool = True, marks: bool = False) -> Decoded: ...
    # A final that stopped early inside a batch comes back retry_alone: the
    # worker hands the batch's words out, then calls decode_long for it.
    async def decode_batch(
        self, audios: Sequence[np.ndarray], finals: Sequence[bool] | None = None, marks: Sequence[bool] | None = None
    ) -> list[Decoded]: ...
    async def decode_long(self, audio: np.ndarray) -> Decoded: ...
    def close(self) -> None: ...


def decoder_thread_setup(name: str, nice: int) -> None:
    # Before the model loads: CTranslate2's threads start from this one and
    # inherit its name (per-stage CPU in benchmarks/bench.py) and rank.
    name_os_thread(name)
    lower_os_thread_priority(nice)


class ThreadLane:
    """Decodes on one thread of the server process."""

    def __init__(self, config: ASRConfig, name: str, nice: int) -> None:
        self.config = config
        self.decoder: WhisperDecoder | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=decoder_thread_setup, initargs=(name, nice)
        )

    async def start(self) -> None:
        self.decoder = await asyncio.get_running_loop().run_in_executor(self._executor, WhisperDecoder, self.config)

    async def decode(self, audio: np.ndarray, final: bool = True, marks: bool = False) -> Decoded:
        assert self.decoder is not None, "start() first"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.decoder.decode, audio, final, marks)

    async def decode_batch(
        self, audios: Sequence[np.ndarray], finals: Sequence[bool] | None = None, marks: Sequence[bool] | None = None
    ) -> list[Decoded]:
        assert self.decoder is not None, "start() first"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.decoder.decode_batch, audios, finals, marks)

    async def decode_long(self, audio: np.ndarray) -> Decoded:
        assert self.decoder is not None, "start() first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.decoder.decode_long, audio)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---- the child process's side ------------------------------------------------

_CHILD_DECODER: WhisperDecoder | None = None


# How often the child looks for its server (see _exit_with_parent).
PARENT_POLL_S = 1.0


def _exit_with_parent(parent: int) -> None:
    """Runs in the child: a server killed outright (SIGKILL, the OOM killer)
    never shuts its pool down, and an idle child waiting on the pool's pipe
    would stay, holding its model (~200 MB), for every restart of the
    server. Once the server is gone the child is reparented: it exits."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child_load(config: ASRConfig, name: str, nice: int, parent: int | None = None) -> int:
    """Runs in the child: load the model there; returns the child's pid."""
    global _CHILD_DECODER
    if parent is not None:
        _exit_with_parent(parent)
    decoder_thread_setup(name, nice)
    one_blas_thread()  # as in the server (streaming/threads.py): no spinning BLAS pool beside the decoder
    _CHILD_DECODER = WhisperDecoder(config)
    return os.getpid()


def _child_decode(audio: np.ndarray, final: bool, marks: bool) -> Decoded:
    assert _CHILD_DECODER is not None
    return _CHILD_DECODER.decode(audio, final, marks)


def _child_decode_batch(
    audios: Sequence[np.ndarray], finals: Sequence[bool] | None, marks: Sequence[bool] | None
) -> list[Decoded]:
    assert _CHILD_DECODER is not None
    return _CHILD_DECODER.decode_batch(audios, finals, marks)


def _child_decode_long(audio: np.ndarray) -> Decoded:
    assert _CHILD_DECODER is not None
    return _CHILD_DECODER.decode_long(audio)


class ProcessLane:
    """Decodes in a child process of their own, started again if it dies."""

    def __init__(self, config: ASRConfig, name: str, nice: int, on_restart: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_restart = on_restart  # the server's metrics
        self.name = name
        self.nice = nice
        self.decoder = None  # the model lives in the child
        self.pid: int | None = None
        self.restarts = 0
        self.timeout_s = config.decode_timeout_s  # ASRConfig.decode_timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        self._restarting: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float | None = None) -> None:
        """Start the child and load its model; ``timeout_s``: a load past it
        kills the child and raises TimeoutError."""
        # "spawn", not fork: the server has threads (the event loop's helpers,
        # ONNX Runtime's, the LLM clients'), and a forked child would inherit
        # their locks in whatever state they were.
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            async with asyncio.timeout(timeout_s):
                pid = await asyncio.get_running_loop().run_in_executor(
                    pool, _child_load, self.config, self.name, self.nice, os.getpid()
                )
        except BaseException:
            for child in list(getattr(pool, "_processes", {}).values()):  # a hung load ends with its child
                with contextlib.suppress(ProcessLookupError, OSError):
                    child.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        self._pool, self.pid = pool, pid

    async def decode(self, audio: np.ndarray, final: bool = True, marks: bool = False) -> Decoded:
        return await self._run(_child_decode, audio, final, marks)

    async def decode_batch(
        self, audios: Sequence[np.ndarray], finals: Sequence[bool] | None = None, marks: Sequence[bool] | None = None
    ) -> list[Decoded]:
        finals_list = None if finals is None else list(finals)
        return await self._run(_child_decode_batch, list(audios), finals_list, None if marks is None else list(marks))

    async def decode_long(self, audio: np.ndarray) -> Decoded:
        return await self._run(_child_decode_long, audio)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._pool is None and self._restarting is None and not self._closed and self.pid is not None:
            # A restart failed earlier: each decode tries again.
            self._restarting = asyncio.create_task(self._restart(None), name=f"{self.name}-restart")
        if self._restarting is not None:
            await asyncio.shield(self._restarting)
        pool = self._pool
        if pool is None:
            why = "the ASR worker is closed" if self._closed else "it could not be started again"
            raise DecoderCrashed(f"the Whisper decoder process is not running ({why})")
        pid = self.pid
        try:
            running = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
            if self.timeout_s > 0:
                async with asyncio.timeout(self.timeout_s):  # not wait_for: it can lose a cancel on 3.11
                    return await running
            return await running
        except BrokenProcessPool as exc:
            self._restart_once(pool)
            raise DecoderDied(f"the Whisper decoder process (pid {pid}) died during this decode") from exc
        except TimeoutError as exc:
            log.error("a decode in the Whisper decoder process %s ran over %.0f s: killing it", pid, self.timeout_s)
            if pid is not None and pool is self._pool:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._restart_once(pool)
            raise DecoderCrashed(
                f"the Whisper decoder process (pid {pid}) took longer than {self.timeout_s:g} s; it was killed"
            ) from exc

    def _restart_once(self, broken: ProcessPoolExecutor) -> None:
        """Start a new child unless one is already starting for this pool."""
        if self._restarting is None and broken is self._pool and not self._closed:
            self._restarting = asyncio.create_task(self._restart(broken), name=f"{self.name}-restart")

    async def _restart(self, broken: ProcessPoolExecutor | None) -> None:
        self.restarts += 1
        if broken is not None:
            log.error("the Whisper decoder process %s died; starting a new one (restart %d)", self.pid, self.restarts)
            broken.shutdown(wait=False, cancel_futures=True)
            if self.on_restart is not None:
                self.on_restart()
        self._pool = None
        try:
            await self.start(self.config.decoder_restart_timeout_s or None)
            if self._closed:  # closed while the new child was loading
                self.close()
        except Exception:
            # The next decode fails with a clear error and tries again.
            log.exception("the Whisper decoder process could not be started again")
        finally:
            self._restarting = None

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def make_lane(
    config: ASRConfig, name: str, nice: int, on_restart: Callable[[], None] | None = None
) -> ThreadLane | ProcessLane:
    if config.decoder_process:
        return ProcessLane(config, name, nice, on_restart)
    return ThreadLane(config, name, nice)
