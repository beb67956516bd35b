"""samples/sip: SIPp places real SIP calls on loopback to the pjsua2 bridge,
which streams them to this session's firstline server (Twilio route).

Checked from both ends: the server's call events (transcript, DTMF, reply),
the RTP the bridge sends back (captured on ``lo``), SIPp's exit status (every
SIP message of the scenario arrived), and that hang-ups release the call.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.server import serve

from asr.wer import word_error_rate
from benchmarks.corpus import Utterance
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher
from tests.transport_checks import STORY, by_name, prompt_clip

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "sip"
LOOPBACK = "127.0.0.1"
DTMF_MARK = re.compile(r"\[caller pressed (.)\]\s*")

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("pjsua2") is None,
        reason="SIP stack missing: pip install -r samples/sip/requirements.txt (pjsua2-python)",
    ),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp missing: apt-get install sip-tester"),
    pytest.mark.skipif(
        not Path("/usr/share/sip-tester/dtmf_2833_5.pcap").exists(),
        reason="sip-tester's RFC 4733 pcaps missing (/usr/share/sip-tester)",
    ),
]

sys.path.insert(0, str(SAMPLE))
import sipp  # noqa: E402  (samples/sip/sipp.py)

# The bridges' RTP ports sit below Linux's ephemeral range (32768-60999), so a
# free port picked for SIPp's media can never be one a bridge call is given:
# a caller sending from a bridge port reads as a second reply stream.
BRIDGE_RTP_BASE = 20000


def bridge_rtp_port() -> int:
    return BRIDGE_RTP_BASE + (os.getpid() % 500) * 20


def free_udp_port(even: bool = False) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if BRIDGE_RTP_BASE <= port < BRIDGE_RTP_BASE + 500 * 20 + 400:
            continue
        if not even or port % 2 == 0:
            return port
    raise RuntimeError("no free UDP port")


# ---- RTP capture on lo (root only) ---------------------------------------------


@dataclass
class RtpCapture:
    """Every RTP packet sent from the bridge's RTP ports, seen on ``lo`` with an
    AF_PACKET socket (needs root; otherwise ``available`` is False)."""

    ports: range
    packets: list[tuple[float, int, int, int, bytes]] = field(default_factory=list)  # t, sport, pt, ts, payload
    available: bool = False

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        try:
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self._sock.bind(("lo", 0))
            self._sock.settimeout(0.1)
            self.available = True
        except (OSError, AttributeError):
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 14 + 20 + 8 + 12:
                continue
            ip = data[14:]
            if ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            ihl = (ip[0] & 0x0F) * 4
            sport, _dport = struct.unpack("!HH", ip[ihl : ihl + 4])
            if sport not in self.ports:
                continue
            rtp = ip[ihl + 8 :]
            if rtp[0] >> 6 != 2:
                continue
            pt = rtp[1] & 0x7F
            ts = struct.unpack("!I", rtp[4:8])[0]
            self.packets.append((time.monotonic(), sport, pt, ts, bytes(rtp[12:])))

    def voiced(self, sport: int | None = None) -> list[tuple[float, int, int, int, bytes]]:
        from bridge import ulaw_decode

        out = []
        for p in list(self.packets):
            if p[2] != 0 or (sport is not None and p[1] != sport):
                continue
            pcm = np.frombuffer(ulaw_decode(p[4]), dtype="<i2")
            if np.abs(pcm.astype(np.int32)).max() > 200:
                out.append(p)
        return out

    def close(self) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=2)
            self._sock.close()


# ---- the bridge, as a subprocess ----------------------------------------------


@dataclass
class BridgeProc:
    proc: subprocess.Popen[str]
    sip_port: int
    rtp_ports: range
    stats: Path
    log: Path

    def read_stats(self) -> dict:
        return json.loads(self.stats.read_text()) if self.stats.exists() else {}


@pytest.fixture(scope="module")
def bridge(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("sipbridge")
    sip_port, rtp_port = free_udp_port(), bridge_rtp_port()
    log_path = work / "bridge.log"
    cmd = [
        sys.executable,
        str(SAMPLE / "bridge.py"),
        "--ws-url",
        f"ws://{LOOPBACK}:{server.port}/twilio",
        "--sip-port",
        str(sip_port),
        "--rtp-port",
        str(rtp_port),
        "--max-calls",
        "4",
        "--ring-ms",
        "300",
        "--system-prompt",
        STORY,  # long replies: the hang-up test needs one still playing
        "--stats",
        str(work / "stats.json"),
    ]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=work)
    deadline = time.monotonic() + 20
    while "READY" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"bridge did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    b = BridgeProc(proc, sip_port, range(rtp_port, rtp_port + 20), work / "stats.json", log_path)
    yield b
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    print(f"bridge exit code {proc.returncode}\n{log_path.read_text()[-2000:]}")


@pytest.fixture(autouse=True)
def bridge_still_running(bridge):
    """A bridge that died takes every later test in this file with it: say so
    (with its exit code and log) where it happened, not as their timeouts."""
    yield
    if bridge.proc.poll() is not None:
        pytest.fail(f"the SIP bridge exited ({bridge.proc.returncode}):\n{bridge.log.read_text()[-4000:]}")


async def run_sipp(scenario: Path, bridge: BridgeProc, timeout: float = 90) -> tuple[int, str]:
    cmd = sipp.sipp_command(scenario, bridge.sip_port, free_udp_port(), free_udp_port(even=True))
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=scenario.parent
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")[-3000:]


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def caller_audio(clip: Utterance, seconds_after: float) -> np.ndarray:
    audio = with_silence(clip.load(8000), 8000, seconds_after)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2")


# ---- the tests -------------------------------------------------------------------


def reply_rtp_checks(capture: RtpCapture, calls: int) -> None:
    """The spoken reply came back over RTP: voiced μ-law, 160-byte packets,
    20 ms apart, timestamps stepping by 160."""
    by_port: dict[int, list] = {}
    for p in capture.voiced():
        by_port.setdefault(p[1], []).append(p)
    assert len(by_port) == calls, {k: len(v) for k, v in by_port.items()}
    for port, voiced in by_port.items():
        assert len(voiced) >= 50, "under a second of reply audio came back over RTP"
        packets = [p for p in capture.packets if p[1] == port and p[2] == 0]
        gaps = np.diff([p[0] for p in packets[-200:]]) * 1000
        assert 17 <= float(np.median(gaps)) <= 23, np.median(gaps)  # 20 ms pacing
        assert all(len(p[4]) == 160 for p in packets)
        steps = np.diff([p[3] for p in packets]) % (1 << 32)
        assert float(np.median(steps)) == 160


async def test_sip_call_transcript_dtmf_and_reply_over_rtp(server, bridge, tmp_path):
    """One SIP call: real speech over RTP, a key press as RFC 4733 events, the
    transcript and reply on the server, the spoken reply back over RTP."""
    clip = prompt_clip(3)
    capture = RtpCapture(bridge.rtp_ports)
    try:
        with CallWatcher() as watcher:
            scenario = sipp.prepare_call(tmp_path, caller_audio(clip, 1.0), hold_ms=14000, digit="5")
            run = asyncio.create_task(run_sipp(scenario, bridge))
            call = await watcher.one(timeout=15)
            final = await watcher.wait_event(call, "transcript.final", turn=1, timeout=40)
            assert DTMF_MARK.findall(final["text"]) == ["5"], final  # the RFC 4733 key press reached the turn
            words = DTMF_MARK.sub("", final["text"])
            assert word_error_rate(clip.reference, words) <= 0.35, (clip.reference, words)
            first = await watcher.wait_event(call, "response.sentence", first=True, timeout=40)
            assert first["text"]
            rc, out = await run
            assert rc == 0, out  # SIPp: 180, 200 OK, ACK, ... BYE, 200 for the BYE
            await wait_for(lambda: server.runtime.active_calls == 0, 10, "active_calls back to 0")
            assert call.finished
            meta = call.session._start.metadata
            assert meta["codec"] == "PCMU" and meta["sipCallId"]
            assert meta["callSid"].startswith("CA") and meta["callSid"] != meta["sipCallId"]
            assert call.playout is not None and call.playout.segments
        if capture.available:
            reply_rtp_checks(capture, 1)
    finally:
        capture.close()
    stats = bridge.read_stats()
    assert stats.get("latency", {}).get("rtp_to_ws", {}).get("n", 0) > 0, stats
    # The key press is caller data: the bridge's INFO log never has it.
    assert "DTMF" not in bridge.log.read_text()
    if not capture.available:
        pytest.skip("reply RTP not checked: capturing on lo needs root (AF_PACKET)")


async def test_sip_alaw_caller(server, bridge, tmp_path):
    """A caller that offers only PCMA: A-law RTP in, transcript on the server."""
    clip = prompt_clip(7)
    with CallWatcher() as watcher:
        scenario = sipp.prepare_call(tmp_path, caller_audio(clip, 1.0), hold_ms=6000, digit=None, codec="PCMA")
        run = asyncio.create_task(run_sipp(scenario, bridge))
        call = await watcher.one(timeout=15)
        final = await watcher.wait_event(call, "transcript.final", turn=1, timeout=40)
        assert word_error_rate(clip.reference, final["text"]) <= 0.35, (clip.reference, final["text"])
        assert call.session._start.metadata["codec"] == "PCMA"
        rc, out = await run
        assert rc == 0, out
    await wait_for(lambda: server.runtime.active_calls == 0, 10, "active_calls back to 0")


def popen_logged(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "w") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


class CallerSide:
    """The far end of a second bridge that places the calls (``--call``): a
    stand-in websocket server that feeds each call the caller's recording
    (Twilio ``media``, which that bridge plays into RTP at 20 ms) and collects
    what comes back over RTP, i.e. firstline's spoken reply. Closing a
    connection makes that bridge hang up: a BYE in the middle of the reply,
    at a moment the test chooses."""

    def __init__(self, audio: list[bytes]) -> None:
        self.audio = audio  # μ-law per call, in order of arrival
        self.conns: list = []
        self.voiced_at: list[list[float]] = []

    async def handler(self, ws) -> None:
        from bridge import ulaw_decode

        index = len(self.conns)
        self.conns.append(ws)
        self.voiced_at.append([])
        async for frame in ws:
            msg = json.loads(frame)
            if msg.get("event") == "start":
                payload = self.audio[index % len(self.audio)]
                for i in range(0, len(payload), 8000):  # 1 s per message; the bridge paces it
                    chunk = base64.b64encode(payload[i : i + 8000]).decode()
                    await ws.send(json.dumps({"event": "media", "media": {"payload": chunk}}))
            elif msg.get("event") == "media":
                pcm = np.frombuffer(ulaw_decode(base64.b64decode(msg["media"]["payload"])), dtype="<i2")
                if np.abs(pcm.astype(np.int32)).max() > 200:
                    self.voiced_at[index].append(time.monotonic())

    async def say(self, index: int, payload: bytes) -> None:
        for i in range(0, len(payload), 8000):
            chunk = base64.b64encode(payload[i : i + 8000]).decode()
            await self.conns[index].send(json.dumps({"event": "media", "media": {"payload": chunk}}))

    def voiced(self, index: int) -> int:
        """Voiced reply frames call ``index`` has heard (0 before it connects)."""
        return len(self.voiced_at[index]) if index < len(self.voiced_at) else 0

    def speaking(self, index: int, within_s: float = 0.3) -> bool:
        return self.voiced(index) > 0 and time.monotonic() - self.voiced_at[index][-1] < within_s


async def test_sip_concurrent_calls_outbound_and_hang_up_mid_reply(server, bridge, tmp_path):
    """A second bridge dials two concurrent calls into the first (outbound
    calls, PJSIP on both ends); each caller hears firstline's reply over RTP
    and hangs up (BYE) while it is still talking: firstline releases both."""
    from bridge import ulaw_encode

    clips = [by_name("all-circuits-busy-now")] * 2  # long stories (as in test_*barge_in)
    audio = [ulaw_encode(caller_audio(c, 1.0).tobytes()) for c in clips]
    caller = CallerSide(audio)
    async with serve(caller.handler, LOOPBACK, 0, compression=None) as ws_server:
        ws_port = ws_server.sockets[0].getsockname()[1]
        log_path = tmp_path / "caller-bridge.log"
        cmd = [sys.executable, str(SAMPLE / "bridge.py"), "--ws-url", f"ws://{LOOPBACK}:{ws_port}/twilio"]
        cmd += ["--sip-port", str(free_udp_port()), "--rtp-port", str(bridge.rtp_ports.start + 200)]
        cmd += ["--call", f"sip:firstline@{LOOPBACK}:{bridge.sip_port}"] * 2
        with CallWatcher() as watcher:
            proc = popen_logged(cmd, log_path)
            try:
                await wait_for(lambda: len(watcher.calls) == 2, 20, "both calls reach firstline")
                await wait_for(lambda: all(c.session.started for c in watcher.calls), 10, "both calls started")
                for call in watcher.calls:  # a long story, so there is a reply to interrupt
                    call.session.history.system_prompt = STORY
                    call.session.max_tokens = 400
                for call in watcher.calls:
                    final = await watcher.wait_event(call, "transcript.final", turn=1, timeout=40)
                    best = min(word_error_rate(c.reference, final["text"]) for c in clips)
                    assert best <= 0.35, (final["text"], [c.reference for c in clips])
                # Hang up each call once the reply is coming back over RTP, while it still talks.
                hung = set()
                deadline = time.monotonic() + 40
                while len(hung) < 2 and time.monotonic() < deadline:
                    for i in range(len(caller.conns)):
                        if i not in hung and caller.voiced(i) >= 15 and caller.speaking(i):
                            await caller.conns[i].close()
                            hung.add(i)
                    await asyncio.sleep(0.02)
                if len(hung) < 2:
                    events = [[(e["type"], e.get("text")) for e in c.events] for c in watcher.calls]
                    pytest.fail(json.dumps({"voiced": [len(v) for v in caller.voiced_at], "events": events}))
                await wait_for(lambda: server.runtime.active_calls == 0, 10, "active_calls back to 0")
                for call in watcher.calls:
                    assert call.finished and call.session._start.metadata["codec"] == "PCMU"
                    assert call.playout is not None and call.playout.segments
                    assert not call.playout.segments[-1].played, [s.text for s in call.playout.segments]
                await wait_for(lambda: log_path.read_text().count("DISCONNECTED") >= 2, 10, "caller saw both ends")
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def test_sip_barge_in_clears_the_bridge_buffer(server, bridge, tmp_path):
    """The caller talks over the reply: firstline sends clear, the bridge drops
    the reply audio it still held (RTP goes quiet at once) and echoes the
    marks, so firstline's history keeps only the sentences that played."""
    from bridge import ulaw_encode

    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
    caller = CallerSide([ulaw_encode(caller_audio(first, 0.7).tobytes())])
    async with serve(caller.handler, LOOPBACK, 0, compression=None) as ws_server:
        ws_port = ws_server.sockets[0].getsockname()[1]
        cmd = [sys.executable, str(SAMPLE / "bridge.py"), "--ws-url", f"ws://{LOOPBACK}:{ws_port}/twilio"]
        cmd += ["--sip-port", str(free_udp_port()), "--rtp-port", str(bridge.rtp_ports.start + 300)]
        cmd += ["--call", f"sip:firstline@{LOOPBACK}:{bridge.sip_port}"]
        with CallWatcher() as watcher:
            proc = popen_logged(cmd, tmp_path / "caller-bridge.log")
            try:
                call = await watcher.one(timeout=20)
                await wait_for(lambda: call.session.started, 10, "call started")
                call.session.history.system_prompt = STORY
                call.session.max_tokens = 400
                # Talk while the reply plays: after its first sentence has played out
                # (its mark came back) when the story has a second one, else at once.
                await wait_for(lambda: caller.voiced(0) >= 15 and caller.speaking(0), 40, "reply over RTP")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and len(call.playout.segments) > 1:
                    if call.playout.segments[0].played and caller.speaking(0):
                        break
                    await asyncio.sleep(0.02)
                first_played = call.playout.segments[0].played
                await caller.say(0, ulaw_encode(caller_audio(second, 0.7).tobytes()))
                await wait_for(lambda: call.barge_ins >= 1, 10, "barge-in (clear sent)")
                cleared_at = time.monotonic()
                await asyncio.sleep(1.0)
                late = [t for t in caller.voiced_at[0] if cleared_at + 0.3 < t < cleared_at + 1.0]
                assert not late, f"{len(late)} voiced frames still came over RTP after the clear"
                await watcher.wait_event(call, "response.done", turn=1, timeout=30)
                sentences = [e["text"] for e in sentences_of(call, 1)]
                reply = call.session.history.replies.get(1)
                heard = reply["content"] if reply is not None else ""
                if first_played:
                    assert heard, "the first sentence's mark came back, so it was heard"
                assert heard != " ".join(sentences) and " ".join(sentences).startswith(heard)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    await wait_for(lambda: server.runtime.active_calls == 0, 10, "active_calls back to 0")


def sentences_of(call, turn: int) -> list[dict]:
    return [e for e in CallWatcher.of(call, "response.sentence") if e["turn"] == turn]


async def test_sip_cancel_before_answer_never_reaches_firstline(server, bridge, tmp_path):
    """A caller who gives up while it rings: CANCEL -> 200, 487, ACK."""
    with CallWatcher() as watcher:
        scenario = sipp.prepare_call(
            tmp_path, caller_audio(by_name("conf-now-recording"), 0.1), 0, template="uac_cancel.xml"
        )
        rc, out = await run_sipp(scenario, bridge, timeout=20)
        assert rc == 0, out
        await asyncio.sleep(0.5)
        assert watcher.calls == []
    assert server.runtime.active_calls == 0


async def test_sip_firstline_ends_call_and_bridge_sends_bye(server, bridge, tmp_path):
    """The other way round: the firstline side closes, the bridge hangs up
    the SIP call (SIPp's scenario expects the BYE and answers 200)."""
    with CallWatcher() as watcher:
        pcm = caller_audio(by_name("conf-now-recording"), 0.5)
        scenario = sipp.prepare_call(tmp_path, pcm, 0, template="uac_remote_bye.xml")
        task = asyncio.create_task(run_sipp(scenario, bridge, timeout=40))
        call = await watcher.one(timeout=15)
        await watcher.wait_event(call, "speech.started", timeout=20)
        await call.close()  # what firstline does at shutdown, limits or errors
        rc, out = await asyncio.wait_for(task, 40)
        assert rc == 0, out
    await wait_for(lambda: server.runtime.active_calls == 0, 10, "active_calls back to 0")
    await wait_for(lambda: "hanging up" in bridge.log.read_text(), 10, "the bridge logged its hang-up")
