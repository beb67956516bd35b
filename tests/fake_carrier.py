"""Fake carriers: test clients that speak each carrier's exact wire format.

A fake is the carrier's side of the call and nothing else: it streams a real
recording as the carrier would, collects the audio the server sends back and
plays it out on a simulated real-time clock, echoing marks / checkpoints when
the audio before them has "played" and flushing on clear, as the real
platforms do. The server side under test is entirely real.

The wire formats themselves live in ``benchmarks/callers`` (one module per
protocol, shared with the load generator and the SIP bridge); a fake is the
driver: socket, playout, what came back. Its keyword options go to the wire
(``parameters``, ``token``, formats…), but ``echo_marks=False``: a carrier
that never confirms playback. Anything else a test needs to send (garbage,
a wrong handshake) goes through :meth:`FakeCarrier.send` as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.callers import AsteriskWS, Exotel, FreeSwitch, Plivo, Realtime, Telnyx, Twilio, Vonage
from benchmarks.callers.audiosocket import AudioSocket, read_frame
from benchmarks.callers.base import (
    Audio,
    Clear,
    Control,
    Event,
    Mark,
    Message,
    ServerEvent,
    Wire,
    WireError,
    decode,
    to_wire,
)
from streaming.codecs import StreamResampler, encode, float_to_int16, int16_to_float
from streaming.codecs import decode as decode_audio
from voice.transports.telephony import TelephonyCall


@dataclass
class Played:
    """What the fake's simulated playback did."""

    marks_echoed: list[str] = field(default_factory=list)
    marks_flushed: list[str] = field(default_factory=list)
    clears: int = 0


class FakeCarrier:
    """Base: connection, reader, simulated playback. The dialect is ``wire``."""

    wire_class: ClassVar[type[Wire]]
    sid: ClassVar[str | None] = None  # the stream id the fake always uses (tests build messages with it)
    defaults: ClassVar[dict[str, Any]] = {}  # wire options unless the test gives its own

    def __init__(self, base_url: str, echo_marks: bool = True, **options: Any) -> None:
        self.options = options
        self.echo_marks = echo_marks
        self.wire = self.make_wire(**{**self.defaults, **options})
        self.url = self.wire.url(base_url)
        self.ws: ClientConnection | None = None
        self.texts: list[tuple[float, dict[str, Any]]] = []
        self.raw_text: list[str] = []
        self.audio_chunks: list[tuple[float, bytes]] = []
        self.mark_offsets: list[int] = []  # audio bytes received before each mark
        self.controls: list[str] = []  # protocol commands received (Asterisk)
        self.played = Played()
        self.error: BaseException | None = None  # what ended the reader, if not a close
        self._playback: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._flush = asyncio.Event()
        self._acks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.last_voice_sent_at: float | None = None

    def make_wire(self, **options: Any) -> Wire:
        if self.sid is not None:
            options.setdefault("sid", self.sid)
        return self.wire_class(strict=True, **options)

    # ---- the wire's format, which a test may change before the call starts ----

    @property
    def encoding(self) -> str:
        return self.wire.encoding

    @encoding.setter
    def encoding(self, value: str) -> None:
        self.wire.encoding = value

    @property
    def rate(self) -> int:
        return self.wire.rate

    @rate.setter
    def rate(self, value: int) -> None:
        self.wire.rate = value

    @property
    def frame_s(self) -> float:
        return self.wire.frame_ms / 1000

    @property
    def bytes_per_s(self) -> int:
        return self.wire.bytes_per_s

    @property
    def headers(self) -> dict[str, str] | None:
        return self.wire.headers()

    def opening(self) -> list[Message]:
        return self.wire.opening()

    def closing(self) -> list[Message]:
        return self.wire.closing()

    # ---- io ---------------------------------------------------------------

    async def __aenter__(self) -> FakeCarrier:
        self.ws = await connect(self.url, max_size=1 << 22, compression=None, additional_headers=self.headers)
        self._reader = asyncio.create_task(self._read())
        self._player = asyncio.create_task(self._play())
        for msg in self.opening():
            await self.send(msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.hangup()
        # The wires are strict: a server message that broke the protocol
        # stopped the reader. After the last thing a test waited for it went
        # unseen; it fails the test here (unless the test failed already).
        if exc[0] is None and isinstance(self.error, WireError):
            raise AssertionError(f"the server broke the carrier's protocol: {self.error}") from self.error

    async def hangup(self, say_stop: bool = True) -> None:
        if self.ws is not None:
            if say_stop:
                for msg in self.closing():
                    with contextlib.suppress(Exception):
                        await self.send(msg)
            await self.ws.close()
        for task in (self._reader, self._player):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def send(self, msg: Message) -> None:
        """Any message: the wire's, or one a test makes up (bad on purpose)."""
        assert self.ws is not None
        await self.ws.send(to_wire(msg))

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                now = time.monotonic()
                if isinstance(raw, bytes):
                    events = self.wire.events(raw)
                else:
                    self.raw_text.append(raw)
                    msg = decode(raw)
                    self.texts.append((now, msg))
                    events = self.wire.events(msg)
                for ev in events:
                    self.on_event(ev, now)
        except Exception as exc:  # a closed socket, or a message that broke the protocol
            self.error = exc
        self.closed.set()

    def on_event(self, ev: ServerEvent, now: float) -> None:
        match ev:
            case Audio(data=data):
                self.got_audio(data, now)
            case Mark(name=name):
                self.got_mark(name)
            case Clear():
                self.got_clear()
                ack = self.wire.cleared()
                if ack is not None:
                    self._send_soon(ack)
            case Control(command=command):
                self.controls.append(command)
            case Event():
                pass

    def _send_soon(self, msg: Message) -> None:
        task = asyncio.get_running_loop().create_task(self.send(msg))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def got_audio(self, chunk: bytes, now: float) -> None:
        self.audio_chunks.append((now, chunk))
        self._playback.put_nowait(("audio", len(chunk) / self.bytes_per_s))

    def got_mark(self, name: Any) -> None:
        self.mark_offsets.append(sum(len(c) for _, c in self.audio_chunks))
        self._playback.put_nowait(("mark", name))

    def got_clear(self) -> None:
        """Drop buffered audio; pending marks come back at once where the carrier does that."""
        self.played.clears += 1
        self._flush.set()

    def _echo(self, name: Any) -> Message | None:
        return self.wire.played(name) if self.echo_marks else None

    async def _play(self) -> None:
        """Real-time playout of what the server sent; marks echo as reached."""
        clock = time.monotonic()
        while True:
            kind, value = await self._playback.get()
            if self._flush.is_set():
                await self._do_flush(kind, value)
                clock = time.monotonic()
                continue
            if kind == "audio":
                clock = max(clock, time.monotonic()) + value
                # Play in 20 ms steps, so a clear cuts in as it does on a phone.
                while clock - time.monotonic() > 0 and not self._flush.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(min(0.02, clock - time.monotonic()))
                if self._flush.is_set():
                    await self._do_flush(kind, value)
                    clock = time.monotonic()
            else:
                self.played.marks_echoed.append(value)
                echo = self._echo(value)
                if echo is not None:
                    with contextlib.suppress(Exception):
                        await self.send(echo)

    async def _do_flush(self, kind: str, value: Any) -> None:
        self._flush.clear()
        items = [(kind, value)]
        while not self._playback.empty():
            items.append(self._playback.get_nowait())
        for k, v in items:
            if k == "mark":
                self.played.marks_flushed.append(v)
                echo = self._echo(v) if self.wire.echo_flushed else None
                if echo is not None:
                    with contextlib.suppress(Exception):
                        await self.send(echo)

    # ---- the caller's side --------------------------------------------------

    async def say(self, audio: np.ndarray, speed: float | None = None, last_voice_s: float | None = None) -> None:
        """Stream ``audio`` (float32 at self.rate) as the carrier frames it;
        ``speed`` None = as fast as possible."""
        pcm = float_to_int16(audio)
        n = round(self.rate * self.frame_s)
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), n)):
            if speed is not None:
                delay = t0 + i * self.frame_s / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % 25 == 24:
                await asyncio.sleep(0)
            frame = pcm[start : start + n]
            if len(frame) < n:
                frame = np.concatenate([frame, np.zeros(n - len(frame), np.int16)])
            await self.send(self.wire.media(encode(frame, self.encoding)))  # type: ignore[arg-type]
            if last_voice_s is not None and self.last_voice_sent_at is None and (i + 1) * self.frame_s >= last_voice_s:
                self.last_voice_sent_at = time.monotonic()

    async def press(self, digit: str) -> None:
        await self.send(self.wire.dtmf(digit))

    # ---- what came back -------------------------------------------------------

    def texts_of(self, key: str, value: str) -> list[dict[str, Any]]:
        return [m for _, m in self.texts if m.get(key) == value]

    @property
    def first_audio_at(self) -> float | None:
        return self.audio_chunks[0][0] if self.audio_chunks else None

    def audio_bytes(self) -> bytes:
        return b"".join(c for _, c in self.audio_chunks)

    def audio16k(self) -> np.ndarray:
        pcm = decode_audio(self.audio_bytes(), self.wire.reply_encoding)  # type: ignore[arg-type]
        return StreamResampler(self.rate, 16000).process(int16_to_float(pcm), last=True)

    def pieces16k(self) -> list[np.ndarray]:
        """The audio cut at the marks: one piece per reply sentence."""
        data = self.audio_bytes()
        cuts = [0, *self.mark_offsets, len(data)]
        out = []
        for a, b in itertools.pairwise(cuts):
            if b > a:
                pcm = decode_audio(data[a:b], self.wire.reply_encoding)  # type: ignore[arg-type]
                out.append(StreamResampler(self.rate, 16000).process(int16_to_float(pcm), last=True))
        return out

    async def wait_audio(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.audio_chunks:
            if time.monotonic() > deadline:
                kinds = [m.get("type") or m.get("event") for _, m in self.texts][-12:]
                error = f"; the reader stopped on {self.error!r}" if self.error is not None else ""
                raise TimeoutError(f"no audio from the server; last messages: {kinds}{error}")
            await asyncio.sleep(0.02)

    async def wait_quiet(self, quiet_s: float = 1.5, timeout: float = 60.0) -> None:
        """Until the server has sent nothing for ``quiet_s`` (the reply is out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = max([t for t, _ in self.audio_chunks] + [t for t, _ in self.texts] + [0.0])
            if self.audio_chunks and time.monotonic() - last >= quiet_s:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the server kept sending")


class CallWatcher:
    """Collects the server-side TelephonyCall objects as calls arrive."""

    def __init__(self) -> None:
        self.calls: list[TelephonyCall] = []

    def __enter__(self) -> CallWatcher:
        TelephonyCall.observers.append(self.calls.append)
        return self

    def __exit__(self, *exc: object) -> None:
        TelephonyCall.observers.remove(self.calls.append)

    async def one(self, timeout: float = 10.0) -> TelephonyCall:
        deadline = time.monotonic() + timeout
        while not self.calls:
            if time.monotonic() > deadline:
                raise TimeoutError("no call reached the server")
            await asyncio.sleep(0.01)
        return self.calls[-1]

    @staticmethod
    def of(call: TelephonyCall, kind: str) -> list[dict[str, Any]]:
        return [e for e in call.events if e.get("type") == kind]

    @staticmethod
    async def wait_event(call: TelephonyCall, kind: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in list(call.events):
                if e.get("type") == kind and all(e.get(k) == v for k, v in match.items()):
                    return e
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind} {match}")
            await asyncio.sleep(0.02)


# ---- the carriers ---------------------------------------------------------------


class FakeTwilio(FakeCarrier):
    """Options: ``parameters`` (the TwiML's ``<Parameter>``s), ``call_sid``
    (default: a new one per call, as Twilio's; the same one re-attaches to
    the call's stored conversation), ``token``."""

    wire_class = Twilio
    sid = "MZ00000000000000000000000000000001"


class FakeTelnyx(FakeCarrier):
    """Options: ``encoding`` (``mulaw``/``alaw``), ``parameters``, ``token``."""

    wire_class = Telnyx
    sid = "32de0dea-53cb-4b21-89a4-9e5f1cb5b2a5"


class FakePlivo(FakeCarrier):
    """Options: ``encoding`` (``mulaw``/``pcm16``), ``rate``, ``extra_headers``, ``token``."""

    wire_class = Plivo
    sid = "20170ada-f610-433b-8758-c02a2aab3662"
    defaults: ClassVar[dict[str, Any]] = {"extra_headers": "caller=test"}


class FakeExotel(FakeCarrier):
    """Options: ``rate`` (8000/16000), ``parameters``, ``token``."""

    wire_class = Exotel
    sid = "b3f1c2d4e5"


class FakeVonage(FakeCarrier):
    """Options: ``rate`` (16000/8000), ``headers`` (the NCCO's), ``token``."""

    wire_class = Vonage
    defaults: ClassVar[dict[str, Any]] = {"headers": {"caller": "test"}}


class FakeFreeSwitch(FakeCarrier):
    """FreeSWITCH's mod_audio_stream. Options: ``rate`` (16000/8000),
    ``metadata`` (custom parameters beside ``sample_rate``), ``token``."""

    wire_class = FreeSwitch


class FakeAsteriskWS(FakeCarrier):
    """chan_websocket: binary media, plain-text (or JSON) control messages.
    Options: ``format`` (``ulaw``/``alaw``/``slin16``), ``json``, ``token``."""

    wire_class = AsteriskWS

    @property
    def format(self) -> str:
        return self.wire.format  # type: ignore[attr-defined]

    @property
    def json_control(self) -> bool:
        return self.wire.json_control  # type: ignore[attr-defined]

    @property
    def frame_size(self) -> int:
        return self.wire.frame_size  # type: ignore[attr-defined]


class FakeRealtime(FakeCarrier):
    """An OpenAI Realtime client over a raw websocket (GA event names, or the
    beta ones with ``beta=True``). Like the reference clients it stops its
    local playback on ``input_audio_buffer.speech_started`` and then tells
    the server how much of the reply it played (``conversation.item.truncate``).
    Options: ``turn_detection``, ``instructions``, ``model``, ``token``."""

    wire_class = Realtime
    defaults: ClassVar[dict[str, Any]] = {"model": "firstline-test", "token": "test"}

    def __init__(self, base_url: str, fmt: str = "audio/pcm", audio_out: bool = True, beta: bool = False,
                 **options: Any) -> None:  # fmt: skip
        super().__init__(base_url, fmt=fmt, audio_out=audio_out, beta=beta, **options)
        self.events: list[dict[str, Any]] = []
        self._item_audio: dict[str, tuple[float, int]] = {}  # item -> (first audio at, bytes)
        self._playing_item: str | None = None

    @property
    def format(self) -> str:
        return self.wire.format  # type: ignore[attr-defined]

    @property
    def audio_out(self) -> bool:
        return self.wire.audio_out  # type: ignore[attr-defined]

    @property
    def beta(self) -> bool:
        return self.wire.beta  # type: ignore[attr-defined]

    def session_update(self) -> dict[str, Any]:
        return self.wire.session_update()  # type: ignore[attr-defined]

    def on_event(self, ev: ServerEvent, now: float) -> None:
        match ev:
            case Event(msg=msg):
                self.events.append(msg)
                if msg.get("type") == "input_audio_buffer.speech_started" and self._playing_item is not None:
                    item, self._playing_item = self._playing_item, None
                    at, size = self._item_audio[item]
                    played_ms = min((time.monotonic() - at) * 1000, size / self.bytes_per_s * 1000)
                    self.got_clear()
                    self._send_soon(self.wire.truncate(item, int(played_ms)))  # type: ignore[attr-defined]
            case Audio(data=data, item=item) if item is not None:
                at, size = self._item_audio.get(item, (time.monotonic(), 0))
                self._item_audio[item] = (at, size + len(data))
                self._playing_item = item
                self.got_audio(data, time.monotonic())
            case _:
                super().on_event(ev, now)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    async def next_event(self, kind: str, timeout: float = 60.0, after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events[after:]:
                if e.get("type") == kind:
                    return e
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind}; got {[e.get('type') for e in self.events][-20:]}")
            await asyncio.sleep(0.02)


# ---- AudioSocket (TCP) ------------------------------------------------------------


class FakeAsterisk:
    """Asterisk's side of AudioSocket: UUID first, then 20 ms slin frames.
    ``kind``: the audio's message kind (by default ``rate``'s)."""

    def __init__(self, port: int, kind: int | None = None, rate: int = 8000, host: str = "127.0.0.1") -> None:
        self.port, self.host = port, host
        self.wire = AudioSocket(rate=rate, kind=kind)
        self.rate, self.kind = rate, self.wire.kind
        self.received: list[tuple[float, int, bytes]] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeAsterisk:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        for msg in self.wire.opening():
            self.writer.write(msg)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        with contextlib.suppress(Exception):
            for msg in self.wire.closing():
                self.writer.write(msg)
            await self.writer.drain()
            self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        assert self.reader is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, payload = await read_frame(self.reader)
                self.received.append((time.monotonic(), kind, payload))

    async def send_raw(self, data: bytes) -> None:
        """Any bytes: the wire's messages, or broken ones a test makes up."""
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def say(self, audio: np.ndarray) -> None:
        pcm = float_to_int16(audio)
        n = self.rate * self.wire.frame_ms // 1000
        for i in range(0, len(pcm) - n + 1, n):
            await self.send_raw(self.wire.media(pcm[i : i + n].astype("<i2").tobytes()))

    async def press(self, digit: str) -> None:
        await self.send_raw(self.wire.dtmf(digit))

    def speech(self) -> tuple[list[bytes], int]:
        """The frames written so far and how many carry sound (not silence)."""
        frames = [p for _, k, p in self.received if k == self.kind]
        return frames, sum(1 for f in frames if any(f))
