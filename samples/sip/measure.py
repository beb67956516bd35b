"""What the SIP bridge adds to a call's latency, measured from outside it.

One real SIP call on loopback: SIPp does the signalling, this script is both
ends of the media. Its UDP socket (named in SIPp's SDP) sends the caller's
RTP, 20 ms μ-law packets of silence with a loud 20 ms click every
``--every-ms``; a stand-in for firstline's Twilio route (a websocket server in
this process) times the click's arrival in a ``media`` frame. The other way,
the stand-in sends a click as a ``media`` frame and the socket times the RTP
packet that carries it. Both clocks are this process's ``perf_counter``.

    rtp_to_ws: RTP packet sent to the bridge  -> its audio in a websocket frame
    ws_to_rtp: websocket frame sent to the bridge -> its audio in an RTP packet

Both include PJSIP's jitter buffer and conference clock (a frame waits up to
one 20 ms tick), JSON/base64 and loopback transit; nothing of the models.
The bridge's own view (frame callback -> websocket write, and websocket read
-> frame handed to PJSIP) comes from its ``--stats`` file.

    .venv/bin/python samples/sip/measure.py --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from websockets.asyncio.server import serve

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bridge import ulaw_decode, ulaw_encode  # noqa: E402
from sipp import sipp_binary  # noqa: E402

LOOPBACK = "127.0.0.1"
SILENCE = b"\xff" * 160
CLICK = ulaw_encode((np.sin(np.arange(160) * 2 * np.pi * 1000 / 8000) * 20000).astype("<i2").tobytes())


def loud(payload: bytes) -> bool:
    return bool(np.abs(np.frombuffer(ulaw_decode(payload), dtype="<i2").astype(np.int32)).max() > 8000)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def pct(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "min_ms": round(float(a.min()), 2),
        "max_ms": round(float(a.max()), 2),
    }


class Probe:
    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.rtp_sent: dict[int, float] = {}  # click number -> send time
        self.ws_seen: list[float] = []
        self.ws_sent: list[float] = []
        self.rtp_seen: list[float] = []
        self.ws_connected = asyncio.Event()
        self.ws_prev_loud = False
        self.rtp_prev_loud = False
        self.rtp_packets = 0
        self.gaps: list[float] = []
        self._last_rtp: float | None = None

    # the stand-in for firstline's /twilio route
    async def handler(self, ws) -> None:
        sid = None
        clicks = None
        try:
            async for frame in ws:
                now = time.perf_counter()
                msg = json.loads(frame)
                if msg.get("event") == "start":
                    sid = msg["start"]["streamSid"]
                    self.ws_connected.set()
                    clicks = asyncio.create_task(self.send_clicks(ws, sid))
                elif msg.get("event") == "media":
                    is_loud = loud(base64.b64decode(msg["media"]["payload"]))
                    if is_loud and not self.ws_prev_loud:
                        self.ws_seen.append(now)
                    self.ws_prev_loud = is_loud
                elif msg.get("event") == "stop":
                    break
        finally:
            if clicks is not None:
                clicks.cancel()

    async def send_clicks(self, ws, sid: str) -> None:
        await asyncio.sleep(self.every_s / 2)  # between the inbound clicks
        while True:
            payload = base64.b64encode(CLICK).decode()
            self.ws_sent.append(time.perf_counter())
            await ws.send(json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}}))
            await asyncio.sleep(self.every_s)

    # the caller's RTP
    async def rtp(self, sock: socket.socket, bridge_rtp: tuple[str, int], seconds: float) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._on_rtp, sock)
        seq, ts, ssrc = 1, 0, 0x1234ABCD
        start = time.perf_counter()
        frames_per_click = max(1, round(self.every_s / 0.02))
        n = 0
        try:
            while time.perf_counter() - start < seconds:
                click = n % frames_per_click == frames_per_click - 1
                header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
                if click:
                    self.rtp_sent[n // frames_per_click] = time.perf_counter()
                sock.sendto(header + (CLICK if click else SILENCE), bridge_rtp)
                n += 1
                seq += 1
                ts += 160
                # absolute schedule: no drift
                await asyncio.sleep(max(0.0, start + n * 0.02 - time.perf_counter()))
        finally:
            loop.remove_reader(sock.fileno())

    def _on_rtp(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            now = time.perf_counter()
            if len(data) < 12 or data[1] & 0x7F != 0:
                continue
            self.rtp_packets += 1
            if self._last_rtp is not None:
                self.gaps.append((now - self._last_rtp) * 1000)
            self._last_rtp = now
            is_loud = loud(data[12:])
            if is_loud and not self.rtp_prev_loud:
                self.rtp_seen.append(now)
            self.rtp_prev_loud = is_loud


def start_bridge(ws_port: int, sip_port: int, rtp_port: int, stats: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(HERE / "bridge.py"), "--ws-url", f"ws://{LOOPBACK}:{ws_port}/twilio"]
    cmd += ["--sip-port", str(sip_port), "--rtp-port", str(rtp_port), "--stats", str(stats)]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)


def pair(sent: list[float], seen: list[float], window_s: float) -> list[float]:
    """Match each send to the first arrival after it within ``window_s``."""
    out, j = [], 0
    for t in sent:
        while j < len(seen) and seen[j] < t:
            j += 1
        if j < len(seen) and seen[j] - t < window_s:
            out.append((seen[j] - t) * 1000)
            j += 1
    return out


async def measure(args: argparse.Namespace) -> dict:
    if sipp_binary() is None:
        raise SystemExit("sipp missing: apt-get install sip-tester")
    probe = Probe(args.every_ms / 1000)
    work = Path(tempfile.mkdtemp(prefix="sip-measure-"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    media_port = sock.getsockname()[1]
    sip_port, rtp_port = free_port(), 42000 + (os.getpid() % 400) * 20
    async with serve(probe.handler, LOOPBACK, 0, compression=None) as server:
        ws_port = server.sockets[0].getsockname()[1]
        stats_path = work / "bridge-stats.json"
        bridge = start_bridge(ws_port, sip_port, rtp_port, stats_path, work / "bridge.log")
        try:
            deadline = time.monotonic() + 20
            while "READY" not in (work / "bridge.log").read_text():
                if bridge.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bridge did not start:\n" + (work / "bridge.log").read_text()[-2000:])
                await asyncio.sleep(0.05)
            scenario = (HERE / "scenarios" / "uac_signal_only.xml").read_text()
            hold_ms = int((args.seconds + 2) * 1000)
            scenario = scenario.replace("@MEDIA_PORT@", str(media_port)).replace("@HOLD_MS@", str(hold_ms))
            (work / "uac.xml").write_text(scenario)
            cmd = [sipp_binary(), f"{LOOPBACK}:{sip_port}", "-sf", str(work / "uac.xml"), "-i", LOOPBACK]
            cmd += ["-p", str(free_port()), "-m", "1", "-nostdin", "-timeout", f"{int(args.seconds) + 30}s"]
            sipp = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=work
            )
            await asyncio.wait_for(probe.ws_connected.wait(), 15)
            await asyncio.sleep(0.5)
            # The bridge's first call takes the first port of its RTP range.
            await probe.rtp(sock, (LOOPBACK, rtp_port), args.seconds)
            await asyncio.wait_for(sipp.wait(), 30)
            await asyncio.sleep(2.5)  # the bridge writes its stats every 2 s
        finally:
            bridge.terminate()
            try:
                bridge.wait(10)
            except subprocess.TimeoutExpired:
                bridge.kill()
    window = args.every_ms / 1000 * 0.9
    inbound = pair(sorted(probe.rtp_sent.values()), probe.ws_seen, window)
    outbound = pair(probe.ws_sent, probe.rtp_seen, window)
    internal = json.loads(stats_path.read_text())["latency"] if stats_path.exists() else {}
    return {
        "what": "SIP bridge (pjsua2) latency on loopback, 1 call, 20 ms G.711 frames",
        "command": "python samples/sip/measure.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "rtp_to_ws": pct(inbound),
        "ws_to_rtp": pct(outbound),
        "rtp_out_gap_ms": pct(probe.gaps),
        "rtp_out_packets": probe.rtp_packets,
        "bridge_internal": internal,
        "notes": "end-to-end from outside the bridge; bridge_internal: callback->ws write, ws read->frame to PJSIP "
        "(frames that found the reply queue empty)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--every-ms", type=int, default=200, help="one click per direction this often")
    ap.add_argument("--out", default=str(HERE / "results" / "latency.json"))
    args = ap.parse_args()
    result = asyncio.run(measure(args))
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
