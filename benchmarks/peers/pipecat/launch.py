"""Start and stop the pipecat peer (``bot.py`` in its own venv) for the benchmark.

Runs in the orchestrator's interpreter (firstline's venv); uses only the
standard library plus ``websockets`` when present.

    from benchmarks.peers.pipecat.launch import PipecatPeer, PeerUnavailable

    reason = PipecatPeer.unavailable_reason()          # None when it can run
    async with PipecatPeer(8790, "http://127.0.0.1:8080/v1") as peer:
        peer.url   # ws://127.0.0.1:8790/twilio  (Twilio Media Streams)

``__aenter__`` raises ``PeerUnavailable("unavailable: <reason>")`` when the
venv is not set up (or ``setup.sh`` fails with ``ensure_setup=True``), the LLM
endpoint does not answer, or the bot exits / does not accept a websocket in
time. Sentences come back as Twilio marks; see README.md in this folder.

Standalone: ``python -m benchmarks.peers.pipecat.launch --port 8790 --llm-base-url URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PIPECAT_VENV", HERE / ".venv"))
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".pipecat-peer-installed"
SETUP = HERE / "setup.sh"
BOT = HERE / "bot.py"


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; str() starts with 'unavailable: '."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"unavailable: {reason}")
        self.reason = reason


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


class PipecatPeer:
    name = "pipecat"
    path = "/twilio"

    def __init__(
        self,
        port: int,
        llm_base_url: str,
        whisper_model: str | None = None,
        *,
        host: str = "127.0.0.1",
        system_prompt: str | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        startup_timeout_s: float = 120.0,
        ensure_setup: bool = False,
        check_llm: bool = True,
        log_path: str | Path | None = None,
    ) -> None:
        self.port = port
        self.host = host
        self.llm_base_url = llm_base_url.rstrip("/")
        self.whisper_model = whisper_model
        self.system_prompt = system_prompt
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.ensure_setup = ensure_setup
        self.check_llm = check_llm
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"pipecat-peer-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{self.path}"

    # ---- availability --------------------------------------------------------

    @staticmethod
    def unavailable_reason(run_setup: bool = False) -> str | None:
        """None when the peer's venv is installed; otherwise why not.
        With ``run_setup`` a missing install is attempted first (minutes)."""
        if not STAMP.exists() and run_setup:
            try:
                done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=1800)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"setup.sh failed: {exc}"
            if done.returncode != 0:
                return f"setup.sh failed (rc {done.returncode}): {_tail(done.stderr or done.stdout)}"
        if not STAMP.exists():
            return f"pipecat venv not installed (run: bash {SETUP.relative_to(HERE.parents[2])})"
        if not PYTHON.exists():
            return f"{PYTHON} missing"
        return None

    def _llm_reason(self) -> str | None:
        url = self.llm_base_url + "/models"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:  # it answers; /models may just be absent
            if exc.code >= 500:
                return f"LLM endpoint {url} answered {exc.code}"
        except (OSError, ValueError) as exc:
            return f"LLM endpoint {self.llm_base_url} not reachable ({exc})"
        return None

    # ---- lifecycle -------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            str(PYTHON),
            str(BOT),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--llm-base-url",
            self.llm_base_url,
        ]
        if self.whisper_model:
            cmd += ["--whisper-model", str(self.whisper_model)]
        if self.system_prompt is not None:
            cmd += ["--system-prompt", self.system_prompt]
        return cmd + self.extra_args

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reason = await loop.run_in_executor(None, self.unavailable_reason, self.ensure_setup)
        if reason is None and self.check_llm:
            reason = await loop.run_in_executor(None, self._llm_reason)
        if reason is not None:
            raise PeerUnavailable(reason)
        started = time.monotonic()
        self._spawn()
        assert self.proc is not None
        deadline = started + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                await self.stop()
                raise PeerUnavailable(f"bot exited with rc {rc} during start-up: {_tail(self.log_text())}")
            if await self._accepts_websocket():
                break
            if time.monotonic() > deadline:
                await self.stop()
                raise PeerUnavailable(
                    f"bot did not accept a websocket within {self.startup_timeout_s:.0f} s: {_tail(self.log_text())}"
                )
            await asyncio.sleep(0.2)
        self.startup_s = time.monotonic() - started

    def _spawn(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)  # firstline's path must not leak into pipecat's venv
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(HERE),
            start_new_session=True,
        )

    def _healthz(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    async def _accepts_websocket(self) -> bool:
        try:
            from websockets.asyncio.client import connect
        except ImportError:  # no websockets here: fall back to the HTTP health route
            return await asyncio.get_running_loop().run_in_executor(None, self._healthz)
        try:
            async with asyncio.timeout(2):
                async with connect(f"ws://{self.host}:{self.port}/probe", open_timeout=2):
                    return True
        except Exception:
            return False

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the bot and nothing else
            for _ in range(50):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log = self._log
        if log is not None:
            log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def __aenter__(self) -> PipecatPeer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _serve(args: argparse.Namespace) -> None:
    async with PipecatPeer(args.port, args.llm_base_url, args.whisper_model, ensure_setup=args.setup) as peer:
        print(f"pipecat peer ready at {peer.url} in {peer.startup_s:.1f} s (log {peer.log_path})", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description="run the pipecat peer until interrupted")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--llm-base-url", required=True)
    p.add_argument("--whisper-model", default=None)
    p.add_argument("--setup", action="store_true", help="run setup.sh first if needed")
    args = p.parse_args()
    try:
        asyncio.run(_serve(args))
    except PeerUnavailable as exc:
        sys.exit(str(exc))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
