"""A `firstline serve` process for a benchmark: a free port, started, ready
(``/readyz``), and stopped with its exit code kept, its log kept apart."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    port: int
    proc: subprocess.Popen[bytes]
    startup_s: float = 0.0
    exit_code: int | None = None


@contextlib.contextmanager
def firstline_server(args: list[str], timeout: float = 600.0) -> Iterator[ServerProc]:
    """``firstline serve --port P ARGS``; a server that exits or never gets
    ready raises with the tail of its log."""
    port = free_port()
    cmd = [sys.executable, "-m", "voice.server.cli", "serve", "--port", str(port), *args]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty server never blocks on it
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ})
        server = ServerProc(port, proc)
        try:
            while not _ready(port):
                if proc.poll() is not None or time.monotonic() - t0 > timeout:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    state = "exited" if proc.poll() is not None else "not ready"
                    raise RuntimeError(f"firstline serve {state}: {tail}")
                time.sleep(0.25)
            server.startup_s = time.monotonic() - t0
            yield server
        finally:
            proc.terminate()
            try:
                server.exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                server.exit_code = proc.wait()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False
