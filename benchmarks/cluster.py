"""The scale-out topology of docs/scaling.md on one box, as real processes:
N x ``llm.openai_server`` (the LLM replicas; ``vllm serve`` on a GPU) behind
``vllm-router --policy sticky_least_loaded``, M x ``firstline serve
--engine remote --remote-url <router> --state-url redis://…`` behind HAProxy
(deploy/haproxy.cfg), and one redis-server holding every call's conversation
so a call re-attaches on any replica.

    python -m benchmarks.cluster                 # 2 + 2 replicas; prints the URL to call
    python -m benchmarks.cluster --voice 3 --llm 1 --max-calls 4

Used by tests/test_cluster.py and the cluster benchmark, which kill, drain
and add replicas through the same methods an operator's script would use:
HAProxy's admin socket (``set server ... state drain``) and the router's
``/add_worker`` / ``/remove_worker``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.server_proc import free_port
from voice.server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
BACKEND = "firstline"
SLOTS = 16  # server-template voice 1-16 in deploy/haproxy.cfg


def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _post(url: str, timeout: float = 30.0) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def router_command(port: int, workers: list[str], policy: str = "sticky_least_loaded") -> list[str]:
    """vllm-router on loopback in front of ``workers`` (also tests/openai_servers.py)."""
    exe = shutil.which("vllm-router", path=os.path.dirname(sys.executable)) or shutil.which("vllm-router")
    if exe is None:
        raise RuntimeError("vllm-router is not installed (pip install -e '.[scale]')")
    return [exe, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
            "--worker-urls", *workers, "--prometheus-port", str(free_port()),
            # The default is a 60 s health interval: a dead replica would keep its sessions for a minute.
            "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
            "--log-level", "warning"]  # fmt: skip


def redis_command(port: int, folder: Path) -> list[str]:
    """A throwaway redis-server on loopback: nothing written to disk. Bounded
    (every key firstline writes has a TTL, so the nearest to expiry go first):
    a client that opens calls, fills their context and drops them would
    otherwise grow it by megabytes a second for the hour each state lives."""
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxmemory", "256mb", "--maxmemory-policy", "volatile-ttl", "--dir", str(folder)]  # fmt: skip


@dataclass
class Proc:
    """One child process of the topology, its log in a temp file."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    started_at: float = field(default_factory=time.monotonic)
    ready_s: float | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, path: str, timeout: float) -> Proc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            if _get(self.root + path)[0] == 200:
                self.ready_s = time.monotonic() - self.started_at
                return self
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s: {self.tail()}")

    def tail(self, chars: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    """Start with :meth:`start`, stop with :meth:`stop` (or ``with``)."""

    def __init__(
        self,
        voice: int = 2,
        llm: int = 2,
        max_calls: int = 8,
        lb_port: int | None = None,
        voice_args: list[str] | None = None,
        llm_args: list[str] | None = None,
        per_source: int = ServerConfig.max_calls_per_address,
        lb_exempt: list[str] | None = None,
    ) -> None:
        for tool in ("haproxy", "redis-server"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (apt-get install {tool}; make test-deps does)")
        self.n_voice, self.n_llm = voice, llm
        self.max_calls = max_calls
        self.lb_port = lb_port or free_port()
        self.voice_args = voice_args or []
        # HAProxy's cap on one source's calls across the tier, and the sources
        # it does not count: the replicas' own defaults (--max-calls-per-address,
        # --per-address-exempt), so the tier and each replica agree.
        self.per_source = per_source
        self.lb_exempt = ServerConfig().per_address_exempt if lb_exempt is None else lb_exempt
        # One thread per engine: two engines and two voice replicas share the cores.
        self.llm_args = llm_args or ["--threads", "1", "--parallel", str(max(2, max_calls))]
        self.dir = Path(tempfile.mkdtemp(prefix="firstline-cluster-"))
        self.socket = self.dir / "haproxy.sock"
        self.llm: list[Proc] = []
        self.voice: list[Proc] = []
        self.router: Proc | None = None
        self.lb: Proc | None = None
        self.redis: Proc | None = None
        self._slot = 0

    # -- processes -------------------------------------------------------

    def _spawn(self, name: str, port: int, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        return Proc(name, port, proc, log)

    def add_llm(self, timeout: float = 120.0) -> Proc:
        """A new engine replica; once healthy, registered with the router
        (``/add_worker``), which sends it new sessions from then on."""
        port = free_port()
        cmd = [sys.executable, "-m", "llm.openai_server", "--port", str(port), "--log-level", "WARNING"]
        replica = self._spawn(f"llm{len(self.llm) + 1}", port, [*cmd, *self.llm_args])
        self.llm.append(replica)
        replica.wait_ready("/health", timeout)
        if self.router is not None:
            status = _post(f"{self.router.root}/add_worker?url={replica.root}")
            if status != 200:
                raise RuntimeError(f"vllm-router refused /add_worker for {replica.root}: HTTP {status}")
        return replica

    def _start_router(self) -> Proc:
        port = free_port()
        self.router = self._spawn("router", port, router_command(port, [r.root for r in self.llm]))
        return self.router.wait_ready("/health", 60.0)

    def _start_redis(self) -> Proc:
        port = free_port()
        self.redis = self._spawn("redis", port, redis_command(port, self.dir))
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return self.redis
            if not self.redis.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {self.redis.tail()}")
            time.sleep(0.05)

    @property
    def state_url(self) -> str:
        assert self.redis is not None
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def add_voice(
        self, timeout: float = 300.0, extra: list[str] | None = None, register: bool = True, llm_url: str | None = None
    ) -> Proc:
        """A new firstline replica; once /readyz is 200, put in a free slot
        of HAProxy's backend, where it takes new calls at the next check.
        ``register=False``: left out of HAProxy (a benchmark's direct path);
        ``llm_url``: its LLM there instead of the router."""
        assert self.router is not None, "start the LLM tier first"
        port = free_port()
        cmd = [sys.executable, "-m", "voice.server.cli", "serve", "--port", str(port),
               "--engine", "remote", "--remote-url", llm_url or self.router.root + "/v1",
               "--max-calls", str(self.max_calls), "--trusted-proxy", "127.0.0.1/32",
               "--state-url", self.state_url,
               "--log-level", "WARNING", *self.voice_args, *(extra or [])]  # fmt: skip
        self._slot += 1
        if self._slot > SLOTS:
            raise RuntimeError(f"deploy/haproxy.cfg has {SLOTS} replica slots")
        replica = self._spawn(f"voice{self._slot}", port, cmd)
        self.voice.append(replica)
        replica.wait_ready("/readyz", timeout)
        if self.lb is not None and register:
            self.admin(f"set server {BACKEND}/{replica.name} addr 127.0.0.1 port {port}")
            self.admin(f"set server {BACKEND}/{replica.name} state ready")
        return replica

    def _start_lb(self) -> Proc:
        env = {
            "FIRSTLINE_LB_BIND": f"127.0.0.1:{self.lb_port}",
            "FIRSTLINE_LB_SOCKET": str(self.socket),
            "FIRSTLINE_MAX_CALLS": str(self.max_calls),
            "FIRSTLINE_LB_PER_SOURCE": str(self.per_source),
            "FIRSTLINE_LB_EXEMPT": str(self.dir / "exempt.lst"),
        }
        (self.dir / "exempt.lst").write_text("".join(f"{cidr}\n" for cidr in self.lb_exempt))
        self.lb = self._spawn("haproxy", self.lb_port, ["haproxy", "-db", "-f", str(HAPROXY_CFG)], env)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if not self.lb.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {self.lb.tail()}")
            time.sleep(0.05)
        return self.lb

    def start(self) -> Cluster:
        try:
            # One at a time: two llama.cpp warm-ups at once on two cores take
            # far longer than two in a row (tests/openai_servers.py).
            for _ in range(self.n_llm):
                self.add_llm()
            self._start_router()
            self._start_redis()
            self._start_lb()
            for _ in range(self.n_voice):
                self.add_voice()
            self.wait_up([r.name for r in self.voice])
        except BaseException:
            self.stop()
            raise
        return self

    # -- HAProxy ---------------------------------------------------------

    def admin(self, command: str) -> str:
        """One command on HAProxy's admin socket; its answer. A ``set``
        answers nothing (or, for an address, what changed) when it worked,
        its error otherwise (raised)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace").strip()
        if command.startswith("set ") and answer and "changed" not in answer:
            raise RuntimeError(f"haproxy: {command!r}: {answer}")
        return answer

    def states(self) -> dict[str, str]:
        """Replica name -> HAProxy's status (UP, DOWN, DRAIN, MAINT, …)."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == BACKEND and row.get("svname", "").startswith("voice"):
                out[row["svname"]] = row.get("status", "")
        return out

    def wait_up(self, names: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states()
            if all(states.get(n, "").startswith("UP") for n in names):
                return
            time.sleep(0.1)
        raise TimeoutError(f"replicas {names} not UP in HAProxy after {timeout} s: {self.states()}")

    def drain(self, replica: Proc) -> None:
        """What SIGTERM does from the replica's side, done from the LB's."""
        self.admin(f"set server {BACKEND}/{replica.name} state drain")

    # -- the rest --------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.lb_port}"

    def admitted(self) -> dict[str, float]:
        """Calls each live voice replica has admitted so far."""
        return {r.name: self.metric(r, "firstline_calls_admitted_total") for r in self.voice if r.alive()}

    def took_call(self, before: dict[str, float]) -> Proc:
        """The one live replica that admitted a call since ``before`` (an :meth:`admitted`)."""
        now = self.admitted()
        (name,) = [n for n in now if now[n] > before.get(n, 0)]
        return next(r for r in self.voice if r.name == name)

    def metric(self, replica: Proc, name: str) -> float:
        """One unlabelled sample of a replica's /metrics (0 if absent)."""
        status, body = _get(replica.root + "/metrics", timeout=5)
        if status != 200:
            return float("nan")
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        others = [p for p in (self.lb, self.router, self.redis) if p is not None]
        for proc in [*self.voice, *others, *self.llm]:
            proc.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voice", type=int, default=2, help="firstline replicas behind HAProxy")
    p.add_argument("--llm", type=int, default=2, help="llm.openai_server replicas behind vllm-router")
    p.add_argument("--max-calls", type=int, default=8, help="per voice replica (and HAProxy's maxconn for it)")
    p.add_argument("--port", type=int, default=8700, help="HAProxy's port (where calls go)")
    ns = p.parse_args()
    cluster = Cluster(voice=ns.voice, llm=ns.llm, max_calls=ns.max_calls, lb_port=ns.port)
    t0 = time.monotonic()
    with cluster:
        print(f"up in {time.monotonic() - t0:.1f} s; logs in {cluster.dir}")
        print(f"  LLM replicas:   {', '.join(r.root for r in cluster.llm)} behind vllm-router {cluster.router.root}")  # type: ignore[union-attr]
        print(f"  voice replicas: {', '.join(r.root for r in cluster.voice)} behind HAProxy")
        print(f"  call state:     {cluster.state_url}")
        print(f"  HAProxy admin:  socat - UNIX-CONNECT:{cluster.socket}  (show stat; set server …)")
        print(f"call it: python -m benchmarks.call AUDIO.wav --url {cluster.url}/v1/call")
        print(f"or in a browser: http://127.0.0.1:{cluster.lb_port}/  (Ctrl-C stops everything)")
        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
