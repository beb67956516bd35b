"""SIP ⇄ firstline bridge: a pjsua2 (PJSIP) user agent that answers calls and
streams each one to firstline's Twilio Media Streams route.

Threads: the main thread polls PJSIP (every SIP callback runs there; PJSIP
owns SIP, SDP, RTP, the jitter buffer and 20 ms RTP pacing); PJSIP's conference
clock thread hands us one 20 ms PCM frame per call per tick through an
``AudioMediaPort``; one asyncio thread runs the websockets. They meet only in
thread-safe deques and ``call_soon_threadsafe``; pj calls made on behalf of
asyncio (hang up, place a call) are queued back to the main thread.

    python samples/sip/bridge.py --sip-port 5070 --ws-url ws://127.0.0.1:8765/twilio

The Twilio messages themselves (opening, media, dtmf, mark echoes, stop, and
reading the server's media / mark / clear) come from the repository's one
Twilio client, ``benchmarks/callers/twilio.py``, which the tests' fake
carrier and the load generator use too. That package is standard library
only, so this process needs nothing beyond requirements.txt; the bridge finds
it from its own place in the checkout (``samples/sip/`` -> the repository
root on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import faulthandler
import gc
import itertools
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pjsua2 as pj
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.append(_REPO)  # after site-packages: the checkout's benchmarks/callers, stdlib only

from benchmarks.callers.base import Audio, Clear, to_wire  # noqa: E402
from benchmarks.callers.base import Mark as MarkEvent  # noqa: E402
from benchmarks.callers.twilio import Twilio  # noqa: E402

log = logging.getLogger("sipbridge")

LOOPBACK = "127.0.0.1"
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
CODECS = ("PCMU/8000", "PCMA/8000")  # offered/accepted, in this order; nothing else

# ---- G.711 μ-law (ITU-T G.711, numpy tables) ---------------------------------


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _ulaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # μ-law works on 14 bits (audioop.lin2ulaw)
    sign = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 8158) + 0x21
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 5, 0, 7)
    mantissa = (mag >> (exponent + 1)) & 0x0F
    return (((exponent << 4) | mantissa) ^ sign).astype(np.uint8)


ULAW_TO_PCM = _ulaw_decode_table()
PCM_TO_ULAW = _ulaw_encode_table()
SILENCE_PCM = bytes(FRAME_SAMPLES * 2)
# An ended call's pj objects are freed this long after it ended (see Bridge._bury).
BURY_AFTER_S = 1.0


def ulaw_encode(pcm16: bytes) -> bytes:
    return PCM_TO_ULAW[np.frombuffer(pcm16, dtype="<i2").astype(np.int32) + 32768].tobytes()


def ulaw_decode(ulaw: bytes) -> bytes:
    return ULAW_TO_PCM[np.frombuffer(ulaw, dtype=np.uint8)].astype("<i2").tobytes()


# ---- latency instrumentation -------------------------------------------------


@dataclass
class Latency:
    """Bridge-internal times, in ms: PJSIP frame callback -> websocket frame
    written (``in``), websocket frame read -> frame handed to PJSIP for RTP
    (``out``). Bounded."""

    inbound: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=20000))
    outbound: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=20000))

    def summary(self) -> dict[str, Any]:
        def pct(values: collections.deque[float]) -> dict[str, Any]:
            snapshot = list(values)  # one C-level copy under the GIL; other threads append
            if not snapshot:
                return {"n": 0}
            a = np.asarray(snapshot)
            return {
                "n": len(a),
                "p50_ms": round(float(np.percentile(a, 50)), 3),
                "p99_ms": round(float(np.percentile(a, 99)), 3),
            }

        return {"rtp_to_ws": pct(self.inbound), "ws_to_rtp": pct(self.outbound)}


# ---- one call ----------------------------------------------------------------


class Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class FirstlinePort(pj.AudioMediaPort):
    """The call's audio as PJSIP's conference bridge sees it: it pushes the
    caller's 20 ms frames into ``onFrameReceived`` and pulls one reply frame
    per tick from ``onFrameRequested`` (that pull is the RTP pacing).

    A port is never freed while PJSIP runs: ~AudioMediaPort asks the
    conference to remove the port and frees it at once, but PJSIP 2.14+
    removes ports later, on its clock thread, which may still call into the
    freed port (and so into a freed Python object: the bridge then crashed
    in unrelated Python code). An ended call's port goes back to
    ``Bridge.idle_ports`` and serves a later call; at most ``max_calls``
    (plus those cooling down) exist."""

    def __init__(self, name: str) -> None:
        super().__init__()
        fmt = pj.MediaFormatAudio()
        fmt.init(pj.PJMEDIA_FORMAT_PCM, 8000, 1, 20000, 16)
        self.createPort(name, fmt)
        # The call this port serves now; None while idle (the clock thread
        # may still tick it: it then hears nothing and says silence).
        self.session: Session | None = None

    def onFrameReceived(self, frame: pj.MediaFrame) -> None:
        session = self.session
        if session is None or frame.type != pj.PJMEDIA_FRAME_TYPE_AUDIO or frame.size == 0:
            return
        session.caller_frame(bytes(frame.buf))

    def onFrameRequested(self, frame: pj.MediaFrame) -> None:
        session = self.session
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.buf = pj.ByteVector(session.reply_frame() if session is not None else SILENCE_PCM)
        frame.size = FRAME_SAMPLES * 2


class Session:
    """One call's websocket to firstline (Twilio Media Streams dialect) and
    its audio buffers. Holds no pj object: it may outlive the SIP call."""

    def __init__(self, bridge: Bridge, info: dict[str, str], serial: int = 0) -> None:
        self.bridge = bridge
        self.info = info
        self.serial = serial  # what logs name it by: the SIP Call-ID is the far end's text
        params = {**bridge.parameters, **{k: v for k, v in info.items() if v}}
        # The Twilio side of the call; used on the asyncio thread only (it
        # numbers the messages). Its callSid is its own per leg (Twilio mints
        # one), never the SIP Call-ID: firstline keys a call's stored conversation by its
        # callSid, and the Call-ID is the far end's choice (an INVITE reusing
        # another call's took that call over; SIPp's default repeats). The
        # Call-ID goes along as a custom parameter.
        self.wire = Twilio(parameters=params)
        # Caller audio (μ-law), or ("mark", name) / ("dtmf", digit) to send in order with it.
        self.inbound: asyncio.Queue[tuple[float, bytes | tuple[str, str]] | None] = asyncio.Queue(maxsize=500)
        # Reply audio waiting for its 20 ms slot, with the time its websocket
        # frame was read when it found the queue empty (no playout queueing),
        # else None. One deque: append (asyncio) and popleft (clock) are atomic.
        self.out: collections.deque[tuple[bytes | Mark, float | None]] = collections.deque()
        self.sip_ended = threading.Event()
        self.frames_in = 0
        self.frames_out = 0
        self.task: asyncio.Future[Any] | None = None

    # --- media (PJSIP clock thread) ---

    def caller_frame(self, pcm16: bytes) -> None:
        if self.sip_ended.is_set():
            return
        payload = ulaw_encode(pcm16)
        self.bridge.loop.call_soon_threadsafe(_put_drop_oldest, self.inbound, (time.perf_counter(), payload))

    def reply_frame(self) -> bytes:
        while self.out:
            item, received = self.out.popleft()
            if isinstance(item, Mark):  # all audio before it has gone out: echo it
                self.bridge.loop.call_soon_threadsafe(self.send_soon, ("mark", item.name))
                continue
            if received is not None:
                self.bridge.latency.outbound.append((time.perf_counter() - received) * 1000)
            self.frames_out += 1
            return ulaw_decode(item)
        return SILENCE_PCM

    # --- any thread -> asyncio ---

    def send_soon(self, control: tuple[str, str]) -> None:
        """(asyncio thread) queue a control message (``("mark", name)``,
        ``("dtmf", digit)``) behind the audio."""
        _put_drop_oldest(self.inbound, (time.perf_counter(), control))

    def hung_up(self) -> None:
        """(PJSIP thread) the SIP call is over."""
        self.sip_ended.set()
        # Dropping the oldest audio if need be: a full queue (the websocket
        # stuck) raised here and lost the hang-up, and the server's call
        # lived on until its idle timeout.
        self.bridge.loop.call_soon_threadsafe(_put_drop_oldest, self.inbound, None)

    # --- websocket (asyncio thread) ---

    async def run(self) -> None:
        reason = "ws_closed"
        try:
            async with connect(
                self.bridge.ws_url,
                open_timeout=10,
                compression=None,
                max_size=1 << 20,
                additional_headers=self.bridge.auth_headers,
            ) as ws:
                for msg in self.wire.opening():
                    await ws.send(to_wire(msg))
                reader = asyncio.create_task(self._read(ws))
                try:
                    reason = await self._write(ws, reader)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await reader
        except (OSError, ConnectionClosed, TimeoutError) as exc:
            log.warning("sip call %d: websocket: %s", self.serial, type(exc).__name__)
            log.debug("sip call %d: websocket: %r", self.serial, exc)
        finally:
            log.info(
                "sip call %d: websocket done: %d frames sent, %d reply frames played, %d left unplayed",
                self.serial,
                self.frames_in,
                self.frames_out,
                sum(1 for item, _ in list(self.out) if not isinstance(item, Mark)),
            )
            if not self.sip_ended.is_set():  # firstline (or the network) ended it: hang up the SIP side
                log.info("sip call %d: websocket closed (%s): hanging up", self.serial, reason)
                self.bridge.pj_soon(lambda: self.bridge.hangup(self))

    async def _write(self, ws: Any, reader: asyncio.Task[None]) -> str:
        while True:
            get = asyncio.ensure_future(self.inbound.get())
            done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return "ws_closed"
            item = get.result()
            if item is None:  # SIP side hung up
                with contextlib.suppress(ConnectionClosed):
                    for msg in self.wire.closing():
                        await ws.send(to_wire(msg))
                return "sip_bye"
            t0, body = item
            if isinstance(body, tuple):
                kind, value = body
                await ws.send(to_wire(self.wire.played(value) if kind == "mark" else self.wire.dtmf(value)))
                continue
            await ws.send(to_wire(self.wire.media(body)))
            self.frames_in += 1
            self.bridge.latency.inbound.append((time.perf_counter() - t0) * 1000)

    async def _read(self, ws: Any) -> None:
        async for frame in ws:
            now = time.perf_counter()
            if not isinstance(frame, str):
                continue  # Twilio's route sends text only
            for ev in self.wire.parse(frame):
                if isinstance(ev, Audio):
                    audio = ev.data
                    stamp: float | None = now if not self.out else None
                    for i in range(0, len(audio) - len(audio) % FRAME_SAMPLES, FRAME_SAMPLES):
                        self.out.append((audio[i : i + FRAME_SAMPLES], stamp))
                        stamp = None
                elif isinstance(ev, MarkEvent):
                    self.out.append((Mark(str(ev.name)), None))
                elif isinstance(ev, Clear):  # barge-in: drop what has not played; pending marks come back now
                    pending = [item for item, _ in list(self.out) if isinstance(item, Mark)]
                    self.out.clear()
                    for mark in pending:
                        self.send_soon(("mark", mark.name))


_serials = itertools.count(1)


class BridgeCall(pj.Call):
    """The SIP leg. Lives on the PJSIP thread only; freed there right after
    it disconnects (see Bridge._bury)."""

    def __init__(self, bridge: Bridge, acc: pj.Account, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(acc, call_id)
        self.bridge = bridge
        self.session: Session | None = None
        self.port: FirstlinePort | None = None
        self.disconnected = False
        self.serial = next(_serials)

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        ci = self.getInfo()
        # The SIP Call-ID and the far end's reason phrase are the caller
        # side's text: INFO says the state and the code only.
        log.info("sip call %d: %s (%s)", self.serial, ci.stateText, ci.lastStatusCode)
        log.debug("sip call %d is %s: %s", self.serial, ci.callIdString, ci.lastReason)
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
            if self.session is not None:
                self.session.hung_up()
            self.bridge.call_ended(self)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        if self.session is not None:
            return  # re-INVITE / hold: the port stays connected
        ci = self.getInfo()
        for i, mi in enumerate(ci.media):
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            aud = self.getAudioMedia(i)
            codec = ""
            with contextlib.suppress(pj.Error):
                codec = self.getStreamInfo(i).codecName
            info = {"sipCallId": ci.callIdString, "from": ci.remoteUri, "to": ci.localUri, "codec": codec}
            self.session = Session(self.bridge, info, self.serial)
            self.port = self.bridge.take_port()
            self.port.session = self.session
            aud.startTransmit(self.port)
            self.port.startTransmit(aud)
            self.session.task = asyncio.run_coroutine_threadsafe(self.session.run(), self.bridge.loop)
            log.info("sip call %d: media up (%s), bridging to %s", self.serial, codec, self.bridge.shown_url)
            return

    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:
        # The digit is caller data (a PIN, a card number): DEBUG only.
        log.debug("sip call %d: DTMF %s", self.getId(), prm.digit)
        if self.session is not None:
            self.bridge.loop.call_soon_threadsafe(self.session.send_soon, ("dtmf", prm.digit))


def _put_drop_oldest(q: asyncio.Queue[Any], item: Any) -> None:
    if q.full():  # the websocket is stuck: drop audio rather than grow
        with contextlib.suppress(asyncio.QueueEmpty):
            q.get_nowait()
    q.put_nowait(item)


class BridgeAccount(pj.Account):
    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self.bridge = bridge

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        call = BridgeCall(self.bridge, self, prm.callId)
        op = pj.CallOpParam()
        if len(self.bridge.calls) >= self.bridge.max_calls:
            op.statusCode = pj.PJSIP_SC_BUSY_HERE
            call.answer(op)
            self.bridge.retire(call)
            return
        self.bridge.calls[prm.callId] = call
        if self.bridge.ring_s > 0:  # 180 now, 200 later (a CANCEL may come in between)
            op.statusCode = pj.PJSIP_SC_RINGING
            call.answer(op)
            cid, serial = prm.callId, call.serial
            self.bridge.pj_later(self.bridge.ring_s, lambda: self.bridge.answer(cid, serial))
        else:
            self.bridge.answer(prm.callId, call.serial)


# ---- the user agent ----------------------------------------------------------


class Bridge:
    def __init__(
        self,
        ws_url: str,
        sip_port: int = 5070,
        rtp_port: int = 40000,
        max_calls: int = 8,
        ring_s: float = 0.0,
        parameters: dict[str, str] | None = None,
        log_level: int = 1,
    ) -> None:
        self.ws_url = ws_url
        # A ?token= in the URL is a credential: logged without its query.
        self.shown_url = ws_url.split("?", 1)[0] + ("?…" if "?" in ws_url else "")
        # FIRSTLINE_AUTH_TOKEN (the server's own variable) goes as a header,
        # kept out of the URL, its logs and the process list.
        token = os.environ.get("FIRSTLINE_AUTH_TOKEN")
        self.auth_headers = {"Authorization": f"Bearer {token}"} if token else None
        self.sip_port = sip_port
        self.rtp_port = rtp_port
        self.max_calls = max_calls
        self.ring_s = ring_s
        self.parameters = parameters or {}
        self.log_level = log_level
        self.calls: dict[int, BridgeCall] = {}
        # Ended calls, with the time they ended: their pj objects die on the main thread, later (see _bury).
        self.graveyard: list[tuple[float, BridgeCall]] = []
        # Conference ports no call uses (see FirstlinePort), and how many exist.
        self.idle_ports: list[FirstlinePort] = []
        self.ports: list[FirstlinePort] = []
        self.latency = Latency()
        self.loop = asyncio.new_event_loop()
        self._pj_queue: queue.Queue[Any] = queue.Queue()
        self._timers: list[tuple[float, Any]] = []
        self.stopping = threading.Event()
        self.calls_total = 0

    # --- main-thread plumbing ---

    def pj_soon(self, fn: Any) -> None:
        self._pj_queue.put(fn)

    def pj_later(self, delay_s: float, fn: Any) -> None:
        self.pj_soon(lambda: self._timers.append((time.monotonic() + delay_s, fn)))

    # pjsua reuses call ids, so work queued for later names a call by
    # (id, serial) or by its Session, never by the pj object itself.

    def answer(self, call_id: int, serial: int) -> None:
        call = self.calls.get(call_id)
        if call is None or call.serial != serial or call.disconnected:
            return  # cancelled while ringing
        op = pj.CallOpParam()
        op.statusCode = pj.PJSIP_SC_OK
        call.answer(op)
        self.calls_total += 1

    def hangup(self, session: Session) -> None:
        for call in list(self.calls.values()):  # hangup() runs onCallState(DISCONNECTED) at once
            if call.session is session and not call.disconnected:
                op = pj.CallOpParam()
                op.statusCode = pj.PJSIP_SC_OK
                call.hangup(op)

    def call_ended(self, call: BridgeCall) -> None:
        for key, value in list(self.calls.items()):
            if value is call:
                del self.calls[key]
        self.retire(call)

    def retire(self, call: BridgeCall) -> None:
        if all(c is not call for _, c in self.graveyard):
            self.graveyard.append((time.monotonic(), call))

    def take_port(self) -> FirstlinePort:
        if self.idle_ports:
            return self.idle_ports.pop()
        port = FirstlinePort(f"fl{len(self.ports)}")
        self.ports.append(port)
        return port

    def place_call(self, uri: str) -> BridgeCall:
        """Outbound: dial ``uri`` (a loopback SIP URI); bridged once answered."""
        call = BridgeCall(self, self.account)
        prm = pj.CallOpParam(True)
        call.makeCall(uri, prm)
        self.calls[call.getId()] = call
        self.calls_total += 1
        return call

    def start(self) -> None:
        self.ep = pj.Endpoint()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = max(self.max_calls + 2, 4)
        cfg.uaConfig.userAgent = "firstline-sip-sample"
        cfg.logConfig.level = self.log_level
        cfg.logConfig.consoleLevel = self.log_level
        med = cfg.medConfig
        med.clockRate = 8000
        med.sndClockRate = 8000
        med.channelCount = 1
        med.audioFramePtime = 20
        med.ptime = 20
        med.noVad = True
        med.ecTailLen = 0
        # Small jitter buffer: phone-grade loopback/LAN; tune up for the internet.
        med.jbInit = 1
        med.jbMinPre = 1
        med.jbMaxPre = 2
        med.maxMediaPorts = 4 * self.max_calls + 8
        self.ep.libInit(cfg)
        tcfg = pj.TransportConfig()
        tcfg.port = self.sip_port
        tcfg.boundAddress = LOOPBACK
        tcfg.publicAddress = LOOPBACK
        self.ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()  # no sound card: the null device clocks the bridge
        for codec in self.ep.codecEnum2():
            prio = 0
            for rank, wanted in enumerate(CODECS):
                if codec.codecId.startswith(wanted):
                    prio = 255 - rank
            self.ep.codecSetPriority(codec.codecId, prio)
        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:firstline@{LOOPBACK}:{self.sip_port}"
        acfg.mediaConfig.transportConfig.port = self.rtp_port
        acfg.mediaConfig.transportConfig.portRange = 2 * self.max_calls + 10
        acfg.mediaConfig.transportConfig.boundAddress = LOOPBACK
        acfg.mediaConfig.transportConfig.publicAddress = LOOPBACK
        self.account = BridgeAccount(self)
        self.account.create(acfg, True)
        threading.Thread(target=self._run_loop, name="asyncio", daemon=True).start()
        log.info(
            "SIP UA on udp:%s:%d (codecs %s), bridging to %s",
            LOOPBACK,
            self.sip_port,
            ", ".join(CODECS),
            self.shown_url,
        )
        print(f"READY sip=udp:{LOOPBACK}:{self.sip_port} ws={self.shown_url}", flush=True)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def poll(self, seconds: float) -> None:
        """Run PJSIP's event loop on this (main) thread for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping.is_set():
            self.ep.libHandleEvents(10)
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                fn = self._pj_queue.get_nowait()
            except queue.Empty:
                break
            try:
                fn()
            except pj.Error as exc:
                log.warning("pjsua2: %s", exc.info())
            except Exception:  # one call's bug must not end the others
                log.exception("bridge task failed")
        now = time.monotonic()
        due = [t for t in self._timers if t[0] <= now]
        if due:
            self._timers = [t for t in self._timers if t[0] > now]
            for _, fn in due:
                fn()
        if self.graveyard:
            self._bury()

    def _bury(self, everything: bool = False) -> None:
        """Free ended calls here, on the PJSIP thread, while the library runs
        (pj objects freed later by Python's cycle collector, on any thread or
        after libDestroy, crash PJSIP). Their ports go back to
        ``idle_ports`` only once the conference has dropped the call's own
        slot and its connections (PJSIP 2.14+ applies conference changes on
        its clock thread, a tick or more later), so a reused port never
        carries an old call's audio."""
        now = time.monotonic()
        due = [c for t, c in self.graveyard if everything or now - t >= BURY_AFTER_S]
        if not due:
            return
        self.graveyard = [] if everything else [(t, c) for t, c in self.graveyard if now - t < BURY_AFTER_S]
        for call in due:
            if call.port is not None:
                call.port.session = None
                self.idle_ports.append(call.port)
            call.port = None
            call.session = None
        due.clear()
        gc.collect()

    def stop(self) -> None:
        self.ep.hangupAllCalls()
        self.poll(0.5)
        self.stopping.set()
        self.loop.call_soon_threadsafe(self.loop.stop)
        for call in self.calls.values():
            self.retire(call)
        self.calls.clear()
        self._bury(everything=True)
        self.ep.libDestroy()
        # Freeing a port after libDestroy crashes PJSIP, and exit would: the
        # C++ ports are left to the process's end.
        for port in self.ports:
            port.thisown = False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ws-url", default="ws://127.0.0.1:8765/twilio", help="firstline's Twilio route")
    ap.add_argument("--sip-port", type=int, default=5070)
    ap.add_argument("--rtp-port", type=int, default=40000, help="first RTP port (even); calls use the next ones")
    ap.add_argument("--max-calls", type=int, default=8, help="more are answered 486 Busy Here")
    ap.add_argument("--ring-ms", type=int, default=0, help="send 180 Ringing and wait this long before 200 OK")
    ap.add_argument("--system-prompt", default=None)
    ap.add_argument(
        "--call",
        action="append",
        default=[],
        help="also place an outbound call to this SIP URI (loopback only; repeat)",
    )
    ap.add_argument("--stats", default=None, help="write bridge latency JSON here on exit")
    ap.add_argument("--pj-log-level", type=int, default=1)
    args = ap.parse_args(argv)
    for uri in args.call:
        if not uri.startswith("sip:") or f"@{LOOPBACK}" not in uri:
            ap.error("this sample only dials loopback URIs (sip:user@127.0.0.1:port)")
    faulthandler.enable()  # a crash inside PJSIP leaves every thread's Python stack in the log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = {"system_prompt": args.system_prompt} if args.system_prompt else {}
    bridge = Bridge(
        args.ws_url, args.sip_port, args.rtp_port, args.max_calls, args.ring_ms / 1000, params, args.pj_log_level
    )
    bridge.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for uri in args.call:
        bridge.pj_soon(lambda uri=uri: bridge.place_call(uri))
    last = time.monotonic()
    try:
        while not stop.is_set():
            bridge.poll(0.2)
            if time.monotonic() - last > 2.0:
                last = time.monotonic()
                if args.stats:
                    _write_stats(args.stats, bridge)
    finally:
        if args.stats:
            _write_stats(args.stats, bridge)
        bridge.stop()


def _write_stats(path: str, bridge: Bridge) -> None:
    stats = {"latency": bridge.latency.summary(), "calls_total": bridge.calls_total, "active_calls": len(bridge.calls)}
    try:
        with open(path + ".tmp", "w") as fh:
            json.dump(stats, fh)
        os.replace(path + ".tmp", path)
    except OSError as exc:
        log.warning("stats not written: %s", exc)


if __name__ == "__main__":
    main()
