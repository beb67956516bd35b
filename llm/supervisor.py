"""Run the LLM engine out of process, so its death does not take calls down.

:class:`SupervisedEngine` starts the configured local engine (llama.cpp or
vLLM) in a child process, ``python -m llm.openai_server`` on a loopback port,
and streams from it through a :class:`~llm.remote_engine.RemoteEngine`. It
watches the child: when the child dies (a segfault in llama.cpp, the OOM
killer, SIGKILL), every stream in flight ends at once with an
:class:`~llm.base.EngineError` (the turn sends the caller an ``error`` event,
the call stays up), and the child is restarted with exponential backoff.
Each restart is counted (``restarts``; ``on_restart`` listeners feed
``firstline_engine_restarts_total``).

While the child is down, requests go to the optional *secondary* engine (a
remote server or pool, e.g. a ``vllm serve`` elsewhere); a request whose
primary fails before any text came back is retried there too. Without a
secondary they fail fast with :class:`~llm.base.EngineUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable

from llm.base import EngineError, EngineUnavailable, GenerationRequest, LLMEngine, SentenceEndUnsupported, Usage
from llm.config import LLMConfig
from llm.llamacpp_engine import check_speculation
from llm.openai_server import ENGINE_KEY_ENV
from llm.remote_engine import RemoteEngine
from llm.sampling import SamplingError, SamplingParams

log = logging.getLogger(__name__)

# A child that stays up this long is healthy again: the next crash restarts
# it after the initial delay rather than the last, doubled one.
BACKOFF_RESET_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_config_json(config: LLMConfig) -> str:
    """The LLMConfig the child runs (its own engine, in its own process)."""
    child = dataclasses.replace(config, isolation="inprocess", remote_urls=[], secondary_urls=[])
    return json.dumps(dataclasses.asdict(child))


def _end_process_group(proc: asyncio.subprocess.Process) -> None:
    """Kill what an exited child left running. It leads a session and process
    group of its own (start_new_session), and the processes it started are in
    that group: vLLM's engine core and workers outlive a SIGKILLed or crashed
    child and keep their GPU memory, so every restart after failed for want
    of it. Called once the child is reaped; the group's id stays taken (no
    new process gets it) while any member lives."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class SupervisedEngine(LLMEngine):
    def __init__(self, config: LLMConfig, secondary: LLMEngine | None = None, host: str = "127.0.0.1") -> None:
        self.config = config
        self.secondary = secondary
        self.host = host
        self.name = config.engine
        # Sampling or speculation the child's engine cannot honour fails here,
        # in the parent, with the reason (not as a child that exits while starting).
        self.check_sampling(config.sampling)
        if config.engine == "llamacpp":
            check_speculation(config)
        self.restarts = 0  # children started after the first one died
        self.crashes = 0  # children that died while they were meant to run
        self.secondary_requests = 0  # requests served by the secondary
        self.on_restart: list[Callable[[], None]] = []
        # Backoff: doubles with each restart up to restart_backoff_max_s, back
        # to restart_backoff_s once a child has stayed up BACKOFF_RESET_S.
        self.next_restart_delay_s = config.restart_backoff_s
        self.startup_s: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._remote: RemoteEngine | None = None
        self._up = False
        self._up_since = 0.0
        self._port: int | None = None
        self._closing = False
        self._watcher: asyncio.Task[None] | None = None
        self._exit_waiters: dict[asyncio.subprocess.Process, asyncio.Future[int]] = {}
        self._changed = asyncio.Event()  # set on every up/down transition
        self._wake = asyncio.Event()  # cuts a restart backoff short
        # Random per-process key the child requires on every /v1 request: its
        # loopback port is reachable by anything on the host, the key is not.
        self._key = secrets.token_urlsafe(32)

    # ---- state ---------------------------------------------------------

    @property
    def primary_up(self) -> bool:
        return self._up and self._proc is not None and self._proc.returncode is None

    @property
    def available(self) -> bool:
        """Whether a request now has an engine to go to."""
        if self.primary_up:
            return True
        return self.secondary is not None and bool(getattr(self.secondary, "available", True))

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def base_url(self) -> str | None:
        return None if self._remote is None else self._remote.base_url

    async def wait_up(self, timeout: float) -> None:
        """Until the primary child is up again (tests, readiness probes)."""
        async with asyncio.timeout(timeout):
            while not self.primary_up:
                self._changed.clear()
                await self._changed.wait()

    def _set_up(self, up: bool) -> None:
        self._up = up
        if up:
            self._up_since = time.monotonic()
        self._changed.set()

    # ---- child process -------------------------------------------------

    def command(self, port: int, listen_fd: int | None = None) -> list[str]:
        handed = [] if listen_fd is None else ["--listen-fd", str(listen_fd)]
        return [*self._command(port), *handed]

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "llm.openai_server",
            "--host",
            self.host,
            "--port",
            str(port),
            "--config-json",
            child_config_json(self.config),
            "--log-level",
            "WARNING",
            # Its one client is this server, whose calls admission bounds: a
            # replica with a hundred calls up must not get 429s from its own engine.
            "--max-requests",
            "0",
            # Nor a per-address connection cap: everything here comes from
            # 127.0.0.1, the voice server's pool has no limit, and a call
            # holds a reply, a prefill and a probe at once, so near 256 calls
            # its own connections met the default cap (twice 256) and its
            # turns failed as overloaded. The key and the handed-over socket
            # keep others out.
            "--max-connections-per-peer",
            "0",
        ]

    def _listener(self) -> socket.socket:
        """The child's listening socket, bound here and handed to it. Bound by
        the child itself, the port was free for anything on the host to take
        between a child's death and its successor's bind (late: after its
        imports), and what took it got the health checks, which carry the
        engine key, and then the calls' turns. The last port again if it is
        free, else another."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for port in dict.fromkeys([self._port or 0, 0]):
            sock = socket.socket(family, socket.SOCK_STREAM)
            # Past the last child's connections in TIME_WAIT; not past a
            # socket listening there (Linux refuses that bind).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
                sock.listen(512)
                return sock
            except OSError:
                sock.close()
                if port == 0:
                    raise
        raise AssertionError("unreachable")

    async def _spawn(self) -> None:
        """Start a child and wait until its /health answers 200."""
        env = {**os.environ, "FIRSTLINE_PARENT_PID": str(os.getpid()), ENGINE_KEY_ENV: self._key}
        listener = self._listener()
        try:
            self._port = listener.getsockname()[1]
            command = self.command(self._port, listener.fileno())
            # A session of its own: Ctrl-C or a signal to the server's process
            # group must not stop the engine under the calls a drain is letting
            # finish (the child still ends with the server: FIRSTLINE_PARENT_PID).
            proc = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(listener.fileno(),),
            )
        finally:
            listener.close()  # the child holds its own copy
        self._proc = proc
        remote = RemoteEngine(
            f"http://{self.host}:{self._port}/v1",
            connect_timeout_s=self.config.connect_timeout_s,
            first_token_timeout_s=self.config.first_token_timeout_s,
            stall_timeout_s=self.config.stall_timeout_s,
            system_prompt=None,  # the child warmed itself with the system prompt
            api_key=self._key,
            full_sampling=True,  # the child's defaults are the server's: a call's "off" must reach it
        )
        deadline = time.monotonic() + self.config.child_start_timeout_s
        try:
            while True:
                if proc.returncode is not None:
                    raise EngineError(f"LLM engine process {_describe_exit(proc.returncode)} while starting")
                if await remote.check_health():
                    break
                if time.monotonic() > deadline:
                    raise EngineError(f"LLM engine process not ready after {self.config.child_start_timeout_s} s")
                await self._exit_of(proc, 0.1)
            await remote.start()
        except BaseException:
            await remote.close()
            await self._stop_child(proc)
            raise
        old, self._remote = self._remote, remote
        if old is not None:
            await old.close()
        self._set_up(True)
        log.info("LLM engine process %d up on %s", proc.pid, remote.base_url)

    async def _exit_of(self, proc: asyncio.subprocess.Process, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the child to exit; True if it has.
        One waiter per child, kept: a shielded ``proc.wait()`` per check
        left a task pending until the child exited (one every 2 s of its
        life from the health checks, tens of thousands a day)."""
        if proc.returncode is not None:
            return True
        waiter = self._exit_waiters.get(proc)
        if waiter is None:
            waiter = self._exit_waiters[proc] = asyncio.ensure_future(proc.wait())
            waiter.add_done_callback(lambda _: self._exit_waiters.pop(proc, None))
        await asyncio.wait({waiter}, timeout=timeout_s)
        return proc.returncode is not None

    async def _stop_child(self, proc: asyncio.subprocess.Process, grace_s: float = 5.0) -> None:
        if proc.returncode is not None:
            _end_process_group(proc)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(grace_s):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        _end_process_group(proc)

    async def _until_exit_or_hung(self, proc: asyncio.subprocess.Process) -> str | None:
        """Wait for the child to exit; a child that stops answering /health
        (child_health_misses in a row) is killed. Why it was killed, or None."""
        misses = 0
        while True:
            if await self._exit_of(proc, max(0.1, self.config.child_health_interval_s)) or self._closing:
                return None
            remote = self._remote
            if remote is None or await remote.check_health():
                misses = 0
                continue
            if proc.returncode is not None or self._closing:
                return None  # it died while asked: that is the exit, not a hang
            misses += 1
            log.warning("LLM engine process %d did not answer /health (%d in a row)", proc.pid, misses)
            if misses >= self.config.child_health_misses:
                self._set_up(False)  # no request waits out a first-token timeout on it meanwhile
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                return f"not answering /health ({misses} checks in a row): killed"

    async def _watch(self) -> None:
        while not self._closing:
            proc = self._proc
            assert proc is not None
            hung = await self._until_exit_or_hung(proc)
            if self._closing:
                return
            _end_process_group(proc)
            self.crashes += 1
            self._set_up(False)
            reason = f"LLM engine process {proc.pid} {hung or _describe_exit(proc.returncode)}"
            if self._remote is not None:
                self._remote.abort_all(reason)  # in-flight turns fail now, not at a timeout
            if time.monotonic() - self._up_since >= BACKOFF_RESET_S:
                self.next_restart_delay_s = self.config.restart_backoff_s
            log.error("%s; restarting in %.1f s", reason, self.next_restart_delay_s)
            while not self._closing:
                delay = self.next_restart_delay_s
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                self._wake.clear()
                self.next_restart_delay_s = min(delay * 2, self.config.restart_backoff_max_s)
                self.restarts += 1
                try:
                    for listener in self.on_restart:
                        listener()
                    await self._spawn()
                    break
                except Exception as exc:
                    # Not only EngineError: an OSError from the fork or the
                    # port (ENOMEM, EAGAIN right after an OOM kill) ended this
                    # task, and with it every restart: the LLM down for good.
                    log.error("LLM engine restart failed (%r); next try in %.1f s", exc, self.next_restart_delay_s)

    async def _check_child(self, wait_s: float = 0.25) -> None:
        """A stream just broke: if the child is dying, mark it down now, so
        the next request does not race the watcher to a dead port."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        await self._exit_of(proc, wait_s)
        if proc.returncode is not None and self._up:
            self._set_up(False)

    # ---- LLMEngine -----------------------------------------------------

    async def start(self) -> None:
        started = time.perf_counter()
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name="llm-supervisor")
        if self.secondary is not None:
            try:
                await self.secondary.start()
            except EngineError as exc:
                # A secondary is a fallback; the primary is up, so serve anyway.
                # It is watched until it answers, as a primary that was not up
                # at start is (voice/server/runtime.py): left alone, it counted
                # as down until one of its own requests got through, and none
                # was sent to a server counted as down.
                log.warning("secondary LLM engine not available at start: %s", exc)
                await_server = getattr(self.secondary, "await_server", None)
                if await_server is not None and not exc.refused:
                    await_server()
        self.startup_s = time.perf_counter() - started
        log.info("supervised %s engine warm in %.2f s (pid %s)", self.config.engine, self.startup_s, self.pid)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """What the child's engine would refuse (it answers such a request
        with HTTP 400 too); the secondary, if any, is a remote server."""
        if self.config.engine == "vllm":
            try:
                sampling.check_vllm(speculation=self.config.speculation.method != "none")
            except SamplingError as exc:
                raise EngineError(str(exc)) from exc

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        remote = self._remote
        if self.primary_up and remote is not None:
            started = False
            try:
                # aclosing: a barge-in closes the stream (and the child's
                # generation) now, not when the generator is finalized.
                async with contextlib.aclosing(remote.stream(request)) as stream:
                    async for delta in stream:
                        started = True
                        yield delta
                return
            except EngineError as exc:
                if exc.refused:
                    raise  # the request's fault (a prompt past the context): the call rebuilds it
                await self._check_child()
                if started or self.secondary is None:
                    raise
                log.warning("primary LLM failed before replying (%s); using the secondary", exc)
                request.usage = Usage()
        elif self.secondary is None:
            raise EngineUnavailable(f"the {self.config.engine} engine process is restarting (no secondary configured)")
        assert self.secondary is not None
        self.secondary_requests += 1
        async with contextlib.aclosing(self.secondary.stream(request)) as stream:
            async for delta in stream:
                yield delta

    async def sentence_end_probability(self, messages: list[dict[str, str]], session_key: str | None = None) -> float:
        remote = self._remote
        if self.primary_up and remote is not None:
            return await remote.sentence_end_probability(messages, session_key)
        if self.secondary is None:
            raise EngineUnavailable(f"the {self.config.engine} engine process is restarting (no secondary configured)")
        try:
            return await self.secondary.sentence_end_probability(messages, session_key)
        except SentenceEndUnsupported as exc:
            # The secondary cannot (a plain vLLM server); the primary can once
            # it is back. Said as unsupported, every call stopped asking for good.
            raise EngineUnavailable(f"while the primary restarts: {exc}") from None

    def end_session(self, session_key: str) -> None:
        # The child is one llm.openai_server (no sessions); a secondary may be a router.
        if self.secondary is not None:
            self.secondary.end_session(session_key)

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._remote is not None:
            await self._remote.close()
        if self._proc is not None:
            await self._stop_child(self._proc)
        for waiter in list(self._exit_waiters.values()):
            waiter.cancel()
        if self.secondary is not None:
            await self.secondary.close()
        self._set_up(False)

    def restart_now(self) -> None:
        """Skip the rest of the current restart backoff (operators, tests)."""
        self._wake.set()

    def kill_child(self, sig: int = signal.SIGKILL) -> int:
        """Send the child a signal (tests and chaos drills); returns its pid."""
        assert self._proc is not None
        os.kill(self._proc.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._set_up(False)  # don't wait for the watcher to notice
        return self._proc.pid

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "engine": self.config.engine,
            "isolation": "process",
            "pid": self.pid,
            "url": self.base_url,
            "up": self.primary_up,
            "restarts": self.restarts,
        }
        if self.secondary is not None:
            out["secondary"] = self.secondary.describe()
        return out
