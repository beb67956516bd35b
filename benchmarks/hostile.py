"""Hostile callers beside well-behaved ones: does any attack slow the others?

One `firstline serve` process with auth on (``--auth-token``), an
AudioSocket listener, and the per-address cap applied to 127.0.0.2 (the
attackers' source address; the well-behaved calls come from 127.0.0.1,
which stays exempt as a local proxy would be). In each round, three
well-behaved calls (native protocol, reply audio, real time, three turns
each, authenticated) are placed once alone ("quiet") and once beside each
attack, one attack at a time, the phases interleaved round by round:

- ``flood``: an authenticated call sending speech at 20x real time,
  reconnecting whenever it is closed;
- ``endless_turns``: an authenticated call speaking turn after turn with
  short gaps at 0.9x the burst audio budget (2.7x real time under the 3x
  default, over the 1.5x sustained one), never waiting for a reply,
  reconnecting when closed;
- ``slow_reader``: a call that asks for reply audio, speaks, sends a stream
  of bad messages (each answered with an error event) and never reads its
  socket (4 KiB receive buffer);
- ``many_connections``: 50 connections at once from one address, each
  holding its call with real-time silence; refused ones retry every second;
- ``garbage``: an authenticated call sending random binary and text frames
  (~1000 a second);
- ``unauthenticated``: AudioSocket connections from an address outside the
  allow-list, and websocket upgrades without a token, back to back;
- ``realtime_events``: an authenticated Realtime client sending valid events
  (8 KB text items, new instructions, buffer clears) ~1000 a second and
  reading every answer.

Per phase: the well-behaved calls' TTFS (caller's last voiced frame -> first
reply sentence), turns lost, and what the attack got back (HTTP refusals,
error codes, close codes, the server's own counters from ``/metrics``).
After every phase: whether the server is still up (``/healthz``).

The attackers run on the same machine as the server (2 cores here), so
their own CPU is part of what the well-behaved calls compete with.

    python -m benchmarks.hostile                 # 3 rounds, ~11 min on 2 cores
    python -m benchmarks.hostile --rounds 1

Results: benchmarks/results/hostile.json (with the commit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from benchmarks.bench import machine, run_and_save, run_on_uvloop, versions
from benchmarks.corpus import asterisk_prompts
from benchmarks.loadgen import CallOptions, calls_for, run_calls
from benchmarks.server_proc import firstline_server, free_port
from streaming.codecs import float_to_int16
from voice.server.limits import CallLimits
from voice.transports.audiosocket import AUDIO_KINDS, KIND_DTMF, KIND_ERROR, KIND_HANGUP, KIND_UUID, message

OUT = Path(__file__).resolve().parent / "results" / "hostile.json"
TOKEN = "hostile-bench-secret"
# The attacker's source address, set per attack (attacker_address): each
# attack comes from its own, so one attack's cool-down (a flooder's address
# is refused for a minute) does not spill into the next phase. Linux has all
# of 127/8 on loopback; none of these is exempt from the per-address limits.
ATTACKER = "127.0.0.2"


def attacker_address(name: str) -> str:
    return f"127.0.0.{2 + ATTACKS.index(name)}"


RATE = 16000
FRAME = 320  # 20 ms of pcm16 at 16 kHz, in samples
KIND_SLIN = next(k for k, rate in AUDIO_KINDS.items() if rate == 8000)
KIND_NAMES = {KIND_HANGUP: "hangup", KIND_UUID: "uuid", KIND_DTMF: "dtmf", KIND_ERROR: "error", KIND_SLIN: "audio"}
START = {"type": "start", "audio": {"encoding": "pcm16", "sample_rate": RATE}}


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


# ---- what an attack got back ----------------------------------------------------------


@dataclass
class Tally:
    """What the attacker's side saw, over one phase."""

    connections: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # HTTP status of refused upgrades
    errors: Counter[str] = field(default_factory=Counter)  # error event codes
    closes: Counter[str] = field(default_factory=Counter)  # "code reason" of closed calls
    ended: Counter[str] = field(default_factory=Counter)  # call.ended reasons
    replies: int = 0
    finals: int = 0
    frames_sent: int = 0
    audiosocket: Counter[str] = field(default_factory=Counter)  # what AudioSocket sent back

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"connections": self.connections, "frames_sent": self.frames_sent}
        for name in ("refused", "errors", "closes", "ended", "audiosocket"):
            if getattr(self, name):
                out[name] = dict(getattr(self, name))
        if self.replies or self.finals:
            out["replies"], out["finals"] = self.replies, self.finals
        return out


async def attacker_call(url: str, tally: Tally, token: str | None = TOKEN, **kw: Any) -> ClientConnection | None:
    """A websocket from the attacker's address; None (and counted) if refused."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    tally.connections += 1
    try:
        return await connect(url, additional_headers=headers, compression=None, max_size=1 << 22, open_timeout=10, **kw)
    except InvalidStatus as exc:
        tally.refused[str(exc.response.status_code)] += 1
    except (OSError, TimeoutError) as exc:
        tally.refused[type(exc).__name__] += 1
    return None


async def read_events(ws: ClientConnection, tally: Tally) -> None:
    """Count what the server sends this call until it closes."""
    try:
        async for msg in ws:
            if isinstance(msg, bytes):
                continue
            ev = json.loads(msg)
            kind = ev.get("type")
            if kind == "error":
                tally.errors[str(ev.get("code"))] += 1
            elif kind == "call.ended":
                tally.ended[str(ev.get("reason"))] += 1
            elif kind == "response.done":
                tally.replies += 1
            elif kind == "transcript.final":
                tally.finals += 1
    except ConnectionClosed:
        pass
    tally.closes[f"{ws.close_code} {ws.close_reason or ''}".strip()] += 1


async def until_ready(ws: ClientConnection, timeout: float = 30.0) -> bool:
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.recv()
                if isinstance(msg, str) and json.loads(msg).get("type") == "ready":
                    return True
    return False


def speech_frames(seed: int, seconds: float, gap_s: float = 0.0) -> list[bytes]:
    """Real phone prompts (16 kHz pcm16, 20 ms frames), ``gap_s`` of silence after each."""
    rng = random.Random(seed)
    prompts = asterisk_prompts()
    parts: list[np.ndarray] = []
    total = 0.0
    while total < seconds:
        audio = rng.choice(prompts).load(RATE)
        parts += [audio, np.zeros(int(gap_s * RATE), np.float32)]
        total += len(audio) / RATE + gap_s
    pcm = float_to_int16(np.concatenate(parts))
    return [pcm[i : i + FRAME].tobytes() for i in range(0, len(pcm) - FRAME + 1, FRAME)]


async def send_paced(ws: ClientConnection, frames: list[bytes], speed: float, tally: Tally) -> None:
    """Send 20 ms frames at ``speed`` x real time, in 10 ms ticks, round and
    round until the server closes the call."""
    t0 = time.monotonic()
    for i, frame in enumerate(itertools.cycle(frames)):
        due = t0 + i * 0.02 / speed
        if due - time.monotonic() > 0.01:
            await asyncio.sleep(due - time.monotonic())
        await ws.send(frame)
        tally.frames_sent += 1


async def a_call_that(url: str, tally: Tally, behave: Callable[[ClientConnection], Awaitable[None]]) -> None:
    """Connect, start, ``behave`` until closed; then reconnect (persistent attacker)."""
    while True:
        ws = await attacker_call(url, tally, local_addr=(ATTACKER, 0))
        if ws is None:
            await asyncio.sleep(1.0)
            continue
        try:
            await ws.send(json.dumps(START))
            if not await until_ready(ws):
                await asyncio.sleep(0.5)
                continue
            reader = asyncio.create_task(read_events(ws, tally))
            with contextlib.suppress(ConnectionClosed):
                await behave(ws)
            await reader
        finally:
            await ws.close()
        await asyncio.sleep(0.5)


# ---- the attacks --------------------------------------------------------------------


async def flood(url: str, tally: Tally, seed: int) -> None:
    frames = speech_frames(seed, 60.0)

    async def behave(ws: ClientConnection) -> None:
        await send_paced(ws, frames, 20.0, tally)

    await a_call_that(url, tally, behave)


async def endless_turns(url: str, tally: Tally, seed: int, speed: float) -> None:
    frames = speech_frames(seed, 60.0, gap_s=0.8)

    async def behave(ws: ClientConnection) -> None:
        await send_paced(ws, frames, speed, tally)

    await a_call_that(url, tally, behave)


async def garbage(url: str, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)

    def frame() -> str | bytes:
        r = rng.random()
        if r < 0.4:
            return rng.randbytes(rng.choice([1, 3, 641, 4097]))
        if r < 0.7:
            return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(80)))
        return json.dumps({"type": rng.choice(["start", "nope", 7, None, "input.commit"]), "audio": rng.random()})

    async def behave(ws: ClientConnection) -> None:
        while True:
            for _ in range(10):
                await ws.send(frame())
                tally.frames_sent += 1
            await asyncio.sleep(0.01)

    await a_call_that(url, tally, behave)


async def realtime_events(port: int, tally: Tally, seed: int) -> None:
    """A Realtime client sending valid events as fast as it can (~1000 a
    second): text items of 8 KB (each answered, and each a change of the
    conversation the server keeps), new instructions, buffer clears; it
    reads every answer, so it is not a slow reader."""
    rng = random.Random(seed)
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=hostile"
    note = "The caller says: " + "lorem ipsum dolor sit amet " * 300

    def event() -> str:
        r = rng.random()
        if r < 0.6:
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": note[:8000]}]}
            return json.dumps({"type": "conversation.item.create", "item": item})
        if r < 0.8:
            session = {"type": "realtime", "instructions": f"Be brief. {rng.random()}"}
            return json.dumps({"type": "session.update", "session": session})
        return json.dumps({"type": "input_audio_buffer.clear"})

    while True:
        ws = await attacker_call(url, tally, local_addr=(ATTACKER, 0))
        if ws is None:
            await asyncio.sleep(1.0)
            continue
        reader = asyncio.create_task(read_realtime_events(ws, tally))
        with contextlib.suppress(ConnectionClosed):
            while True:
                for _ in range(10):
                    await ws.send(event())
                    tally.frames_sent += 1
                await asyncio.sleep(0.01)
        await reader
        await ws.close()
        await asyncio.sleep(0.5)


async def read_realtime_events(ws: ClientConnection, tally: Tally) -> None:
    try:
        async for msg in ws:
            ev = json.loads(msg)
            if ev.get("type") == "error":
                tally.errors[str((ev.get("error") or {}).get("code"))] += 1
    except ConnectionClosed:
        pass
    tally.closes[f"{ws.close_code} {ws.close_reason or ''}".strip()] += 1


async def slow_reader(url: str, port: int, tally: Tally, seed: int) -> None:
    frames = speech_frames(seed, 60.0, gap_s=0.8)
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a tiny window
        sock.bind((ATTACKER, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # max_queue=1: the client library stops reading once one message waits.
        ws = await attacker_call(url, tally, sock=sock, max_queue=1)
        if ws is None:
            await asyncio.sleep(1.0)
            continue
        t0 = time.monotonic()
        start = {**START, "options": {"reply_audio": True}}
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await ws.send(json.dumps(start))
            for i, chunk in enumerate(frames):
                await asyncio.wait_for(ws.send(chunk), 10)
                tally.frames_sent += 1
                if i % 2 == 0:  # one error event back for each, never read
                    await asyncio.wait_for(ws.send('{"type": "' + "x" * 60 + '"}'), 10)
                await asyncio.sleep(0.02)
        # The server has dropped it (or the frames ran out): how long it took.
        tally.closes[f"dropped after {round(time.monotonic() - t0)} s"] += 1
        ws.transport.abort()
        await asyncio.sleep(0.5)


async def many_connections(url: str, tally: Tally, n: int = 50) -> None:
    silence = bytes(FRAME * 2)

    async def hold(ws: ClientConnection) -> None:
        while True:  # real-time silence: the call stays up past the idle timeout
            await ws.send(silence)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(a_call_that(url, tally, hold) for _ in range(n)))


async def unauthenticated(url: str, audiosocket_port: int, tally: Tally) -> None:
    audio = message(KIND_SLIN, bytes(320))
    while True:
        # AudioSocket from outside the allow-list: Asterisk's own framing.
        tally.connections += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", audiosocket_port, local_addr=(ATTACKER, 0))
            writer.write(message(KIND_UUID, uuid.uuid4().bytes) + audio * 5)
            got = await asyncio.wait_for(reader.read(), 10)
            kinds = "+".join(KIND_NAMES.get(b, hex(b)) for b in _kinds(got))
            tally.audiosocket[kinds or "closed, nothing sent"] += 1
            writer.close()
        except (OSError, TimeoutError) as exc:
            tally.audiosocket[type(exc).__name__] += 1
        # And a websocket upgrade with no token, then a wrong one.
        for token in (None, "wrong-token"):
            ws = await attacker_call(url, tally, token=token, local_addr=(ATTACKER, 0))
            if ws is not None:
                tally.closes["admitted without a valid token"] += 1
                await ws.close()
        await asyncio.sleep(0.05)


def _kinds(data: bytes) -> list[int]:
    """The message kinds in an AudioSocket byte stream (kind, 2-byte length, payload)."""
    kinds, i = [], 0
    while i + 3 <= len(data):
        kinds.append(data[i])
        i += 3 + int.from_bytes(data[i + 1 : i + 3], "big")
    return kinds


# ---- the run --------------------------------------------------------------------------

ATTACKS = ["flood", "endless_turns", "slow_reader", "many_connections", "garbage", "unauthenticated", "realtime_events"]


def attack(name: str, port: int, audiosocket_port: int, tally: Tally, seed: int, budget: float) -> Awaitable[None]:
    """``budget``: the server's audio budget (x real time), which the endless
    talker stays just under."""
    url = f"ws://127.0.0.1:{port}/v1/call"
    return {
        "flood": lambda: flood(url, tally, seed),
        "endless_turns": lambda: endless_turns(url, tally, seed, 0.9 * budget if budget > 0 else 20.0),
        "slow_reader": lambda: slow_reader(url, port, tally, seed),
        "many_connections": lambda: many_connections(url, tally),
        "garbage": lambda: garbage(url, tally, seed),
        "unauthenticated": lambda: unauthenticated(url, audiosocket_port, tally),
        "realtime_events": lambda: realtime_events(port, tally, seed),
    }[name]()


_SAMPLE = re.compile(
    r"^(firstline_(?:errors_total|calls_refused_total|calls_ended_total|asr_decode_seconds_sum"
    r"|asr_decode_seconds_count|low_priority_total|reply_gate_waits_total))"
    r'(?:\{\w+="([^"]*)"\})? ([0-9.e+]+)$'
)


def server_counters(port: int) -> Counter[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            value = float(m[3])
            name = m[1].removeprefix("firstline_").removesuffix("_total")
            out[f"{name}:{m[2]}" if m[2] is not None else name] = (
                round(value, 2) if m[1].endswith("_sum") else int(value)
            )
    return out


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def start_attacker(name: str, port: int, audiosocket_port: int, seed: int, budget: float) -> subprocess.Popen[bytes]:
    """The attack in its own process at the lowest CPU priority: it stands in
    for a client on another machine, so what the well-behaved calls feel is
    the server's cost of handling it, not the cost of generating it here."""
    cmd = [sys.executable, "-m", "benchmarks.hostile", "--attack", name, "--port", str(port),
           "--audiosocket-port", str(audiosocket_port), "--seed", str(seed),
           "--audio-rate-multiple", str(budget)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(19))


def stop_attacker(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """SIGTERM; the attacker prints its tally and exits."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return {"error": "attacker did not stop"}
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"attacker exited {proc.returncode} without a tally"}


async def run_attack(ns: argparse.Namespace) -> None:
    """Child process: attack until SIGTERM, then print the tally (one JSON line)."""
    global ATTACKER
    ATTACKER = attacker_address(ns.attack)
    tally = Tally()
    task = asyncio.create_task(attack(ns.attack, ns.port, ns.audiosocket_port, tally, ns.seed, ns.audio_rate_multiple))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(json.dumps(tally.as_dict()), flush=True)


def turn_stages(r: dict[str, Any]) -> dict[str, Any]:
    """One well-behaved turn, by stage (ms after the caller's last voiced frame)."""
    keep = ("ttfs_ms", "asr_final_ms", "first_token_ms", "wer", "server_turns")
    return {k: r.get(k) for k in keep} | {"server": r.get("server") or {}}


async def phase(ns: argparse.Namespace, name: str, port: int, audiosocket_port: int, rnd: int) -> dict[str, Any]:
    before = server_counters(port)
    attacker = None if name == "quiet" else start_attacker(name, port, audiosocket_port, rnd, ns.audio_rate_multiple)
    if attacker is not None:
        await asyncio.sleep(3.0)  # the attack is under way before the first call
    opts = CallOptions(protocol="native", token=TOKEN, seed=100 * rnd)
    calls = calls_for(3, turns=ns.turns)
    records = await run_calls(f"ws://127.0.0.1:{port}", calls, 3, opts)
    # Against the plan, not the records: a call cut mid-way stops adding
    # records and a call that failed leaves one error record, and the turns
    # an attack cost would otherwise drop out of both counts.
    planned = sum(len(call.turns) for call in calls)
    answered = sum(1 for r in records if r.get("ttfs_ms") is not None)
    tally = {} if attacker is None else stop_attacker(attacker)
    await asyncio.sleep(1.0)  # the attacker's calls are released before the next phase
    after = server_counters(port)
    ttfs = [r["ttfs_ms"] for r in records if r.get("ttfs_ms") is not None]
    return {
        "phase": name,
        "round": rnd,
        "ttfs_ms": ttfs,
        "turns": planned,
        "lost": planned - answered,
        "refused": sum(1 for r in records if r.get("refused")),
        "records": [turn_stages(r) for r in records],
        "attacker": tally,
        "server": {k: round(v - before.get(k, 0), 2) for k, v in after.items() if v != before.get(k, 0)},
        "server_up": healthy(port),
    }


def summarise(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    quiet = [t for p in phases if p["phase"] == "quiet" for t in p["ttfs_ms"]]
    q95 = pct(quiet, 95)
    for name in ["quiet", *ATTACKS]:
        mine = [p for p in phases if p["phase"] == name]
        if not mine:
            continue
        ttfs = [t for p in mine for t in p["ttfs_ms"]]
        p95 = pct(ttfs, 95)
        rows.append(
            {
                "phase": name,
                "turns": sum(p["turns"] for p in mine),
                "lost": sum(p["lost"] for p in mine),
                "ttfs_p50_ms": pct(ttfs, 50),
                "ttfs_p95_ms": p95,
                "p95_vs_quiet": None if not (p95 and q95) else round(p95 / q95 - 1, 3),
                "server_up": all(p["server_up"] for p in mine),
                "attacker": _merge([p["attacker"] for p in mine]),
                "server": dict(sum((Counter(p["server"]) for p in mine), Counter())),
            }
        )
    return rows


def _merge(tallies: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tallies:
        for k, v in t.items():
            if isinstance(v, dict):
                out[k] = dict(Counter(out.get(k, {})) + Counter(v))
            else:
                out[k] = out.get(k, 0) + v
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'phase':<18}{'turns':>6}{'lost':>6}{'p50 ms':>9}{'p95 ms':>9}{'p95 vs quiet':>14}  up")
    for r in rows:
        vs = "" if r["p95_vs_quiet"] is None or r["phase"] == "quiet" else f"{r['p95_vs_quiet'] * 100:+.1f} %"
        print(
            f"{r['phase']:<18}{r['turns']:>6}{r['lost']:>6}{r['ttfs_p50_ms'] or '-':>9}{r['ttfs_p95_ms'] or '-':>9}"
            f"{vs:>14}  {'yes' if r['server_up'] else 'NO'}"
        )
    for r in rows[1:]:
        print(f"\n{r['phase']}: attacker saw {json.dumps(r['attacker'])}\n  server counted {json.dumps(r['server'])}")


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    audiosocket_port = free_port()
    args = [
        "--auth-token", TOKEN,
        "--audiosocket-port", str(audiosocket_port),
        # The well-behaved calls (127.0.0.1) stay exempt, the attackers' address is capped.
        "--per-address-exempt", "127.0.0.1/32",
        "--max-calls", str(ns.max_calls),
        "--audio-rate-multiple", str(ns.audio_rate_multiple),
        *shlex.split(ns.server_args),
    ]  # fmt: skip
    phases: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with firstline_server(args) as server:
        # Untimed: the first calls after start pay for warm-up.
        await run_calls(f"ws://127.0.0.1:{server.port}", calls_for(3, turns=1), 3, CallOptions("native", token=TOKEN))
        for rnd in range(ns.rounds):
            order = ["quiet", *ns.attacks]
            random.Random(rnd).shuffle(order)  # no attack always follows the same one
            for name in order:
                p = await phase(ns, name, server.port, audiosocket_port, rnd)
                phases.append(p)
                print(f"round {rnd} {name:<17} ttfs {p['ttfs_ms']} lost {p['lost']} up {p['server_up']}", flush=True)
        exit_ok = server.proc.poll() is None
    rows = summarise(phases)
    print_table(rows)
    return {
        "benchmark": "hostile",
        "machine": machine(),
        "versions": versions(),
        "options": vars(ns),
        "server_args": args,
        "server_stayed_up": exit_ok and all(p["server_up"] for p in phases),
        "server_exit_code": server.exit_code,
        "wall_s": round(time.monotonic() - t0, 1),
        "summary": rows,
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3, help="turns per well-behaved call")
    parser.add_argument("--max-calls", type=int, default=16)
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=ATTACKS)
    parser.add_argument(
        "--audio-rate-multiple", type=float, default=CallLimits.audio_rate_multiple,
        help="the server's audio budget (x real time); the endless talker keeps just under it",
    )  # fmt: skip
    parser.add_argument("--server-args", default="", help="more `firstline serve` flags, e.g. '--no-preemptive'")
    parser.add_argument("--out", default=str(OUT))
    # The attacker's own process (started by the run, not by hand).
    parser.add_argument("--attack", choices=ATTACKS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--audiosocket-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.attack:
        run_on_uvloop(run_attack(ns))
        return
    run_and_save(run(ns), ns.out)


if __name__ == "__main__":
    main()
