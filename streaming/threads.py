"""OS-level names for the server's worker threads, so per-thread CPU can be
told apart from outside the process (``/proc/<pid>/task/*/comm``; top -H;
``benchmarks/bench.py`` splits CPU by stage with it). CPython 3.11 does not
name OS threads itself, and the threads a native library starts from a named
thread (CTranslate2's, ONNX Runtime's) inherit its name."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Name the calling OS thread (Linux; elsewhere a no-op). At most 15 bytes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass  # a name is a convenience, never worth failing over


def lower_os_thread_priority(increment: int) -> bool:
    """Add ``increment`` to the calling OS thread's nice value (Linux keeps it
    per thread; threads it starts inherit it). Lowering a priority needs no
    privilege. Returns whether it took effect."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:
        return False
    return True


def llm_share_of_cores(cores: int) -> int:
    """The LLM's threads when the server splits ``cores`` between the LLM
    and the Whisper decoder (llm.config.threads_for, asr.config.
    decoder_threads_for): half, at least 1, at most 4."""
    return max(1, min(4, cores // 2))


def one_blas_thread() -> None:
    """Run numpy's BLAS (OpenBLAS) on the calling thread only.

    The server's numpy work is small (Whisper's mel filter product, a few
    vectors per frame), but numpy's OpenBLAS keeps a pool of one thread per
    core that busy-waits for the next call after every product. Beside each
    Whisper decode that pool thread spun about as long as the decode itself,
    on a core the LLM's copies and the other calls needed (the bench's CPU
    by stage, README). threadpoolctl sets it at run time, whatever was
    imported first."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
