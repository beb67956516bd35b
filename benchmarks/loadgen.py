"""Load generator: simulated phone callers speaking a telephony protocol.

Each caller is one websocket that behaves like a carrier's media stream: a
20 ms frame of 8 kHz μ-law leaves every 20 ms for the whole call (silence
between turns, as a phone line sends), with optional network impairments
(jitter, late frames that hold up the ones behind them as TCP does, dropped
frames). The caller speaks the turns of a scripted call
(``benchmarks/data/calls.json``, built once by ``benchmarks/make_calls.py``
from real recordings), pauses inside a turn where the script says so, waits
for the reply (and, on audio protocols, for it to finish playing on a
simulated real-time playout that echoes marks as Twilio does), thinks, and
speaks again. A barge-in turn starts while the previous reply is playing.

Protocols (``PROTOCOLS``): ``twilio`` (Media Streams shape, the default),
``native`` (firstline protocol v1 with reply audio), ``native-text`` (its
text-only mode) and ``realtime`` (OpenAI
Realtime GA events over ``/v1/realtime``). On the Twilio shape the caller
asks for firstline's benchmark side channel (customParameters
``firstline_events=1``: the session's events as ``{"event": "firstline"}``
messages); servers that do not send it still give audio timings.

Per caller turn, measured at the caller (ms after the frame holding the
turn's last voiced sample was sent): ``ttfs_ms`` (first complete reply
sentence received), ``asr_final_ms`` (final transcript), ``first_token_ms``
(first reply text), ``ttfa_ms`` (first reply audio byte),
``sentence_audio_ms`` (first sentence's audio complete: its mark), plus the
transcript's WER against the reference, the server's ``turn.metrics`` where
the protocol carries them, and on barge-in turns ``barge_in_ms`` (first
voiced frame of the interruption sent -> ``clear``, or a cancelled
``response.done`` on text protocols).

    python -m benchmarks.loadgen --url ws://127.0.0.1:8765 --calls 2 --concurrency 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from asr.vad import CHUNK, SileroVAD
from asr.wer import word_error_rate
from benchmarks.callers import Native, Realtime, Twilio
from benchmarks.callers.base import Audio, Clear, Event, Mark, Message, ServerEvent, Wire, to_wire
from benchmarks.corpus import ASTERISK_SOUNDS, SHARED_SPEECH, load_audio
from streaming.codecs import encode, float_to_int16
from streaming.sentences import SentenceSegmenter
from voice.call.reply_policy import is_complete

FRAME_S = 0.02
RATE = 8000
FRAME_SAMPLES = 160
SILENCE = b"\xff" * FRAME_SAMPLES  # μ-law digital silence
CALLS_FILE = Path(__file__).resolve().parent / "data" / "calls.json"


class ProtocolUnavailable(RuntimeError):
    """The server does not speak this protocol (yet)."""


# ---- the scripted calls -------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One recording spoken inside a turn, after ``pause_before_s`` of silence."""

    source: str  # "shared" (../shared/data/speech) or "asterisk" (Debian's prompts)
    file: str
    reference: str
    pause_before_s: float = 0.0
    # A piece of the recording (seconds into it): a sentence cut between two
    # words, so the caller pauses mid-sentence (benchmarks/make_calls.py
    # --mid-sentence). 0 / None: all of it.
    start_s: float = 0.0
    end_s: float | None = None

    @property
    def path(self) -> Path:
        root = SHARED_SPEECH if self.source == "shared" else ASTERISK_SOUNDS
        return root / self.file


@dataclass(frozen=True)
class TurnSpec:
    segments: tuple[Segment, ...]
    # Silence after the previous reply finished playing, before speaking.
    think_s: float = 0.6
    # Barge-in: speak this long after the previous reply's first audio (or
    # first sentence, on text protocols) instead of after it finished.
    barge_in_after_s: float | None = None

    @property
    def reference(self) -> str:
        return " ".join(s.reference for s in self.segments)


@dataclass(frozen=True)
class CallSpec:
    name: str
    turns: tuple[TurnSpec, ...]


def load_calls(path: Path = CALLS_FILE) -> list[CallSpec]:
    data = json.loads(path.read_text())
    calls = []
    for c in data["calls"]:
        turns = tuple(
            TurnSpec(
                tuple(Segment(**s) for s in t["segments"]),
                think_s=t.get("think_s", 0.6),
                barge_in_after_s=t.get("barge_in_after_s"),
            )
            for t in c["turns"]
        )
        calls.append(CallSpec(c["name"], turns))
    return calls


@dataclass
class TurnAudio:
    frames: list[bytes]
    first_voice_frame: int  # index of the frame holding the first voiced sample
    last_voice_frame: int  # ... and the last


_vad: SileroVAD | None = None


def _voiced_span_s(audio8k: np.ndarray) -> tuple[float, float] | None:
    """First and last voiced instants of a clip (Silero, offline, 32 ms chunks)."""
    global _vad
    if _vad is None:
        _vad = SileroVAD()
    import soxr

    audio16k = soxr.resample(audio8k, RATE, 16000)
    probs = _vad.stream().process(np.ascontiguousarray(audio16k, dtype=np.float32))
    voiced = np.nonzero(probs >= 0.5)[0]
    if len(voiced) == 0:
        return None
    return float(voiced[0] * CHUNK / 16000), float((voiced[-1] + 1) * CHUNK / 16000)


@functools.lru_cache(maxsize=512)
def _clip(
    path: Path, start_s: float = 0.0, end_s: float | None = None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    audio = load_audio(path, RATE)
    if start_s or end_s is not None:
        audio = audio[int(start_s * RATE) : None if end_s is None else int(end_s * RATE)]
    return audio, _voiced_span_s(audio)


def turn_audio(turn: TurnSpec) -> TurnAudio:
    """The turn as it goes on the wire: segments and inner pauses, μ-law frames."""
    parts: list[np.ndarray] = []
    first: float | None = None
    last = 0.0
    t = 0.0
    for seg in turn.segments:
        if seg.pause_before_s > 0 and parts:
            parts.append(np.zeros(round(seg.pause_before_s * RATE), np.float32))
            t += seg.pause_before_s
        audio, span = _clip(seg.path, seg.start_s, seg.end_s)
        if span is not None:
            first = t + span[0] if first is None else first
            last = t + span[1]
        parts.append(audio)
        t += len(audio) / RATE
    pcm = float_to_int16(np.concatenate(parts))
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % FRAME_SAMPLES, np.int16)])
    frames = [encode(pcm[i : i + FRAME_SAMPLES], "mulaw") for i in range(0, len(pcm), FRAME_SAMPLES)]
    last_frame = min(len(frames) - 1, max(0, int(np.ceil(last / FRAME_S)) - 1))
    first_frame = min(last_frame, int((first or 0.0) / FRAME_S))
    return TurnAudio(frames, first_frame, last_frame)


# ---- what the caller sees ------------------------------------------------------


@dataclass
class Ev:
    at: float  # monotonic arrival
    kind: str  # speech_started final delta sentence done metrics audio mark clear interrupt
    turn: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Timeline:
    """Every server event of one call, normalised across protocols."""

    def __init__(self) -> None:
        self.events: list[Ev] = []
        self._changed = asyncio.Event()

    def add(self, kind: str, turn: int | None = None, **data: Any) -> Ev:
        ev = Ev(time.monotonic(), kind, turn, data)
        self.events.append(ev)
        self._changed.set()
        return ev

    def since(self, t: float, kind: str | None = None) -> list[Ev]:
        return [e for e in self.events if e.at >= t and (kind is None or e.kind == kind)]

    async def changed(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)


class Player:
    """The far end's real-time playout of reply audio: marks are echoed when
    the audio before them has played, and at once on ``clear`` (Twilio)."""

    def __init__(self, rate_bytes_per_s: int, echo: Callable[[str], Any]) -> None:
        self.bytes_per_s = rate_bytes_per_s
        self.echo = echo
        self.clock_end = 0.0
        self._pending: list[tuple[str, asyncio.TimerHandle]] = []
        self._echoes: set[asyncio.Future[Any]] = set()

    def audio(self, nbytes: int) -> None:
        self.clock_end = max(self.clock_end, time.monotonic()) + nbytes / self.bytes_per_s

    def mark(self, name: str) -> None:
        delay = max(0.0, self.clock_end - time.monotonic())
        handle = asyncio.get_running_loop().call_later(delay, self._fire, name)
        self._pending.append((name, handle))

    def _fire(self, name: str) -> None:
        self._pending = [(n, h) for n, h in self._pending if n != name]
        self._send_echo(name)

    def _send_echo(self, name: str) -> None:
        task = asyncio.ensure_future(self.echo(name))
        self._echoes.add(task)
        task.add_done_callback(self._echoes.discard)

    def clear(self, echo_pending: bool = True) -> None:
        """Stop playing. Twilio-shaped carriers echo every pending mark at
        once on ``clear``; the native protocol confirms only what played
        (docs/protocol.md), so its client drops them (``echo_pending=False``)."""
        self.clock_end = time.monotonic()
        pending, self._pending = self._pending, []
        for name, handle in pending:
            handle.cancel()
            if echo_pending:
                self._send_echo(name)

    @property
    def playing(self) -> bool:
        return self.clock_end > time.monotonic()

    def close(self) -> None:
        for _, handle in self._pending:
            handle.cancel()


# ---- protocols -----------------------------------------------------------------


class Client:
    """One caller's connection, in one wire protocol. The protocol itself is
    the client's ``wire`` (benchmarks/callers: the messages, both ways); the
    client puts what comes back on the call's timeline and plays the reply
    audio out on a :class:`Player` that confirms marks as they play."""

    name = "abstract"
    path = "/"
    has_text = True  # transcripts and reply sentences on the wire
    has_done = True  # an end-of-reply event on the wire (else: quiet_s of silence ends a reply)
    has_audio = True  # reply audio on the wire

    def __init__(self, base_url: str, timeline: Timeline, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeline = timeline
        self.token = token
        self.wire = self.make_wire()
        self.url = self.connect_url()
        self.player: Player | None = Player(self.wire.bytes_per_s, self._echo) if self.wire is not None else None
        self.ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self.sent_frames = 0
        self.closed = asyncio.Event()

    def make_wire(self) -> Wire | None:
        return None

    def connect_url(self) -> str:
        return self.wire.url(self.base_url) if self.wire is not None else self.base_url + self.path

    async def connect(self) -> None:
        headers = self.wire.headers() if self.wire is not None else None
        self.ws = await connect(self.connect_url(), max_size=1 << 22, compression=None, additional_headers=headers)
        self._reader = asyncio.create_task(self._read())
        await self.opening()

    async def opening(self) -> None:
        """Messages after the upgrade, before audio."""
        for msg in self.wire.opening() if self.wire is not None else []:
            await self.send(msg)

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                self.on_message(raw)
        self.closed.set()

    def on_message(self, raw: str | bytes) -> None:
        assert self.wire is not None
        for ev in self.wire.parse(raw):
            self.on_event(ev)

    # Twilio and its peers confirm every pending mark when the server clears.
    echoes_marks_on_clear = True

    def on_event(self, ev: ServerEvent) -> None:
        assert self.player is not None
        match ev:
            case Audio(data=data):
                self.player.audio(len(data))
                self.timeline.add("audio", bytes=len(data))
            case Mark(name=name):
                self.timeline.add("mark", name=str(name))
                self.player.mark(str(name))
            case Clear():
                self.timeline.add("clear")
                self.player.clear(echo_pending=self.echoes_marks_on_clear)
            case Event(msg=msg):
                self.session_event(msg)

    async def send_frame(self, frame: bytes, timestamp_ms: int) -> None:
        assert self.wire is not None
        self.sent_frames += 1
        await self.send(self.wire.media(frame, timestamp_ms))

    async def _echo(self, name: str) -> None:
        """The reply audio before mark ``name`` has played."""
        msg = self.wire.played(name) if self.wire is not None else None
        if msg is not None:
            with contextlib.suppress(Exception):
                await self.send(msg)

    async def closing(self) -> None:
        """Messages before hanging up."""
        if self.player is not None:
            self.player.close()
        for msg in self.wire.closing() if self.wire is not None else []:
            await self.send(msg)

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.closing()
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def send(self, msg: Message) -> None:
        assert self.ws is not None
        await self.ws.send(to_wire(msg))

    def session_event(self, ev: dict[str, Any]) -> None:
        """A firstline session event (native protocol, or the Twilio side channel)."""
        kind = ev.get("type")
        turn = ev.get("turn")
        if kind == "speech.started":
            self.timeline.add("speech_started")
        elif kind == "transcript.final":
            self.timeline.add("final", turn, text=ev.get("text", ""))
        elif kind == "response.delta":
            self.timeline.add("delta", turn)
        elif kind == "response.sentence":
            self.timeline.add("sentence", turn, first=bool(ev.get("first")), text=ev.get("text", ""))
        elif kind == "response.done":
            cancelled = bool(ev.get("cancelled"))
            self.timeline.add("done", turn, cancelled=cancelled, text=ev.get("text", ""))
            if cancelled:
                self.timeline.add("interrupt", turn)
        elif kind == "turn.metrics":
            self.timeline.add("metrics", turn, metrics={k: v for k, v in ev.items() if k not in ("type", "turn")})
        elif kind == "turn.resumed":
            self.timeline.add("resumed", turn)
        elif kind == "error":
            self.timeline.add("error", turn, code=ev.get("code"), message=ev.get("message"))


class TwilioClient(Client):
    """Twilio Media Streams (bidirectional): JSON text frames only, with
    firstline's benchmark side channel asked for."""

    name = "twilio"
    path = Twilio.path

    def __init__(self, base_url: str, timeline: Timeline, token: str | None = None) -> None:
        super().__init__(base_url, timeline, token)
        # Until the firstline side channel (or a peer's text marks) shows up.
        self.has_text = False
        self.has_done = False

    def make_wire(self) -> Wire:
        return Twilio(parameters={"firstline_events": "1"}, token=self.token)

    def on_event(self, ev: ServerEvent) -> None:
        match ev:
            case Mark(name=name) if str(name).startswith(("sentence:", "transcript:")):
                self._peer_mark(str(name))
                assert self.player is not None
                self.player.mark(str(name))
            case Clear():
                super().on_event(ev)
                self.timeline.add("interrupt")
            case Event():  # the benchmark side channel
                self.has_text = self.has_done = True
                super().on_event(ev)
            case _:
                super().on_event(ev)

    def _peer_mark(self, name: str) -> None:
        """The pipecat peer reports text as marks (benchmarks/peers/pipecat/bot.py):
        ``sentence:<turn>:<index>:<text>`` and ``transcript:<turn>:<text>``;
        it has no TTS, so no reply audio and no end-of-reply event."""
        self.has_text = True
        self.has_audio = False
        if name.startswith("sentence:"):
            _, turn, index, text = name.split(":", 3)
            self.timeline.add("sentence", int(turn), first=int(index) == 0, text=text)
        else:
            _, turn, text = name.split(":", 2)
            self.timeline.add("final", int(turn), text=text)


class NativeClient(Client):
    """firstline protocol v1: binary audio in, JSON events out, and the reply
    spoken back as binary frames (``options.reply_audio``) with a mark per
    sentence, echoed as ``response.audio.played`` once it has played."""

    name = "native"
    path = Native.path
    echoes_marks_on_clear = False  # only what played is confirmed
    has_audio = True  # asks for reply audio (options.reply_audio)

    def make_wire(self) -> Wire:
        return Native(encoding="mulaw", rate=RATE, token=self.token, version=1,
                      options={"reply_audio": self.has_audio})  # fmt: skip


class NativeTextClient(NativeClient):
    """The native protocol in its default text-only mode (clients with their own TTS)."""

    name = "native-text"
    has_audio = False


SENTENCE_MARKS = (".", "!", "?", "…", '."', '!"', '?"')


class RealtimeClient(Client):
    """OpenAI Realtime (GA event names), speech in as audio/pcmu, server VAD.
    Sentences are cut client-side from the text deltas with firstline's
    segmenter; a delta that ends on a sentence's last mark ends it there
    (firstline's deltas are whole sentences, and the segmenter would wait
    for the next one to be sure); ``response.done`` with status
    ``cancelled`` is the barge-in."""

    name = "realtime"
    path = Realtime.path

    def __init__(self, base_url: str, timeline: Timeline, token: str | None = None) -> None:
        super().__init__(base_url, timeline, token)
        self._turn = 0
        self._segmenter: SentenceSegmenter | None = None
        self._sentences = 0
        self._ready = asyncio.Event()

    def make_wire(self) -> Wire:
        vad = {"type": "server_vad", "create_response": True, "interrupt_response": True}
        return Realtime(fmt="audio/pcmu", turn_detection=vad, token=self.token)

    async def connect(self) -> None:
        try:
            await super().connect()
        except InvalidStatus as exc:
            if exc.response.status_code == 404:
                raise ProtocolUnavailable("the server has no /v1/realtime endpoint (not yet)") from exc
            raise

    async def opening(self) -> None:
        await super().opening()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 10)

    def on_event(self, ev: ServerEvent) -> None:
        assert self.player is not None
        tl = self.timeline
        if isinstance(ev, Audio):
            self.player.audio(len(ev.data))
            tl.add("audio", self._turn, bytes=len(ev.data))
            return
        if not isinstance(ev, Event):
            return
        msg = ev.msg
        kind = msg.get("type", "")
        if kind in ("session.created", "session.updated"):
            self._ready.set()
        elif kind == "input_audio_buffer.speech_started":
            tl.add("speech_started")
        elif kind == "conversation.item.input_audio_transcription.completed":
            tl.add("final", self._turn + 1, text=msg.get("transcript", ""))
        elif kind == "response.created":
            self._turn += 1
            self._segmenter = SentenceSegmenter()
            self._sentences = 0
        elif kind in ("response.output_text.delta", "response.text.delta", "response.output_audio_transcript.delta"):
            tl.add("delta", self._turn)
            segmenter = self._segmenter or SentenceSegmenter()
            delta = str(msg.get("delta", ""))
            sentences = segmenter.push(delta)
            if delta.rstrip().endswith(SENTENCE_MARKS):
                sentences += segmenter.flush()
            for sentence in sentences:
                tl.add("sentence", self._turn, first=self._sentences == 0, text=sentence)
                self._sentences += 1
        elif kind == "response.done":
            if self._segmenter is not None:
                for sentence in self._segmenter.flush():
                    tl.add("sentence", self._turn, first=self._sentences == 0, text=sentence)
                    self._sentences += 1
            response = msg.get("response") or {}
            status = response.get("status")
            tl.add("done", self._turn, cancelled=status == "cancelled")
            # firstline puts its per-turn timings in response.metadata (strings).
            metrics = {}
            for k, v in (response.get("metadata") or {}).items():
                with contextlib.suppress(TypeError, ValueError):
                    metrics[k.removeprefix("firstline_")] = float(v)
            if metrics:
                tl.add("metrics", self._turn, metrics=metrics)
            if status == "cancelled":
                self.player.clear()
                tl.add("interrupt", self._turn)
        elif kind == "error":
            err = msg.get("error") or {}
            tl.add("error", code=err.get("code"), message=err.get("message"))


PROTOCOLS: dict[str, type[Client]] = {
    "twilio": TwilioClient,
    "native": NativeClient,
    "native-text": NativeTextClient,
    "realtime": RealtimeClient,
}


# ---- the line ------------------------------------------------------------------


@dataclass(frozen=True)
class Impairments:
    """Network trouble between carrier and server. Frames stay in order (one
    TCP stream): a late frame holds up the frames behind it."""

    jitter_ms: float = 0.0  # each frame leaves up to this much after its slot (uniform)
    late_prob: float = 0.0  # chance a frame is held back late_ms
    late_ms: float = 200.0
    drop_prob: float = 0.0  # chance a frame never leaves (lost upstream of the carrier)

    @property
    def any(self) -> bool:
        return bool(self.jitter_ms or self.late_prob or self.drop_prob)


class Line:
    """A call's outgoing 20 ms frame clock: speech when queued, else silence."""

    def __init__(self, client: Client, impairments: Impairments, speed: float, seed: int) -> None:
        self.client = client
        self.imp = impairments
        self.speed = speed
        self.rng = random.Random(seed)
        self._queue: list[tuple[bytes, asyncio.Future[float] | None]] = []
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def speak(self, audio: TurnAudio) -> tuple[asyncio.Future[float], asyncio.Future[float]]:
        """Queue a turn; futures: when its first / last voiced frame left."""
        loop = asyncio.get_running_loop()
        first: asyncio.Future[float] = loop.create_future()
        last: asyncio.Future[float] = loop.create_future()
        for i, frame in enumerate(audio.frames):
            fut = first if i == audio.first_voice_frame else last if i == audio.last_voice_frame else None
            self._queue.append((frame, fut))
        if audio.first_voice_frame == audio.last_voice_frame:  # one frame holds both
            first.add_done_callback(lambda f: last.done() or f.exception() or last.set_result(f.result()))
        return first, last

    @property
    def speaking(self) -> bool:
        return bool(self._queue)

    async def _run(self) -> None:
        step = FRAME_S / self.speed
        t0 = time.monotonic()
        release = t0
        i = 0
        try:
            while True:
                slot = t0 + i * step
                send_at = slot + (self.rng.uniform(0, self.imp.jitter_ms) / 1000 if self.imp.jitter_ms else 0.0)
                if self.imp.late_prob and self.rng.random() < self.imp.late_prob:
                    send_at += self.imp.late_ms / 1000
                release = max(release, send_at)
                delay = release - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                frame, fut = self._queue.pop(0) if self._queue else (SILENCE, None)
                if self.imp.drop_prob and self.rng.random() < self.imp.drop_prob:
                    self.dropped += 1
                else:
                    await self.client.send_frame(frame, round(i * FRAME_S * 1000))
                if fut is not None and not fut.done():
                    # The instant the voiced frame left (even if the network lost
                    # it), less the delay the impaired line added (jitter, a late
                    # frame holding those behind it): the caller spoke it then,
                    # and the line's delay is part of what they wait. 0 unimpaired.
                    fut.set_result(time.monotonic() - max(0.0, release - slot))
                i += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection gone: the turn driver sees it
            self.error = exc
            for _, fut in self._queue:
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError(str(exc)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ---- one call ------------------------------------------------------------------


@dataclass
class CallOptions:
    protocol: str = "twilio"
    speed: float = 1.0  # >1: faster than real time (tests only: not a latency figure)
    impairments: Impairments = field(default_factory=Impairments)
    turn_timeout_s: float = 30.0
    # No reply event for this long after the last one: the reply is over
    # (servers that send no response.done).
    quiet_s: float = 1.2
    wait_playout: bool = True  # wait for the reply audio to finish playing before the next turn
    token: str | None = None
    seed: int = 0


def _ms(t: float | None, base: float | None) -> float | None:
    return None if t is None or base is None else round((t - base) * 1000, 1)


def _reply_over(tl: Timeline, client: Client, t_last: float, opts: CallOptions) -> bool:
    evs = tl.since(t_last)
    now = time.monotonic()
    reply = [e for e in evs if e.kind in ("delta", "sentence", "done", "audio", "mark")]
    if client.has_done:
        done = [e for e in evs if e.kind == "done" and not e.data.get("cancelled")]
        if not done:
            return False
        if not client.has_audio:
            return True
        # All of the reply's sentences have come back as audio (one mark each),
        # or no audio came for a while.
        turn = done[-1].turn
        n = len([e for e in evs if e.kind == "sentence" and e.turn == turn])
        marks = [e for e in evs if e.kind == "mark" and str(e.data.get("name", "")).startswith(f"t{turn}s")]
        last = max(e.at for e in reply)
        if len(marks) < n and now - last < opts.quiet_s * 2:
            return False
    elif not reply or now - max(e.at for e in reply) < opts.quiet_s:
        return False
    player = getattr(client, "player", None)
    return not (opts.wait_playout and player is not None and player.playing)


def _first_signal(tl: Timeline, client: Client, t_last: float) -> Ev | None:
    """The first sign of the reply the caller could act on (barge-in timing)."""
    kinds = ("audio",) if client.has_audio else ("sentence",)
    evs = [e for e in tl.since(t_last) if e.kind in kinds]
    return evs[0] if evs else None


def metrics_arrived(tl: Timeline, records: list[dict[str, Any]]) -> None:
    """Give each record whose turn.metrics came after it was taken (the
    caller barged in on the reply) the metrics its server turn got since."""
    for rec in records:
        if rec.get("server") or rec.get("server_turn") is None:
            continue
        ev = next((e for e in tl.events if e.kind == "metrics" and e.turn == rec["server_turn"]), None)
        if ev is not None:
            rec["server"] = ev.data["metrics"]


def turn_record(tl: Timeline, t_first: float, t_last: float, spec: TurnSpec) -> dict[str, Any]:
    """What one caller turn got, from the call's timeline."""
    window = tl.since(t_first)
    finals: list[str] = []
    final_turns: list[int] = []
    for e in window:
        if e.kind != "final":
            continue
        text = str(e.data.get("text", ""))
        # A turn talked over before its reply is carried into the next final
        # (the words appear again there): keep the later.
        if finals and text.startswith(finals[-1]):
            finals[-1] = text
        else:
            finals.append(text)
        if e.turn is not None:
            final_turns.append(e.turn)
    dones = [e for e in window if e.kind == "done" and e.at >= t_last]
    answer = next((e.turn for e in reversed(dones) if not e.data.get("cancelled")), None)
    if answer is None:
        answer = final_turns[-1] if final_turns else None

    def of(kind: str, **match: Any) -> list[Ev]:
        return [
            e
            for e in window
            if e.kind == kind
            and e.at >= t_last
            and (answer is None or e.turn is None or e.turn == answer)
            and all(e.data.get(k) == v for k, v in match.items())
        ]

    sentence = next(iter(of("sentence", first=True)), None) or next(iter(of("sentence")), None)
    final = of("final")
    delta = of("delta")
    audio = [e for e in window if e.kind == "audio" and e.at >= t_last]
    marks = [e for e in window if e.kind == "mark" and e.at >= t_last]
    metrics = next((e.data["metrics"] for e in of("metrics")), {})
    done = next((e for e in reversed(dones) if e.turn == answer), None)
    transcript = " ".join(finals)
    sentences = [str(e.data.get("text", "")) for e in of("sentence")]
    # The first piece may be a clause (--first-clause-words): when did the
    # first whole sentence arrive? (first_is_clause: the first piece did not
    # end a sentence; also a run-on cut at its word cap, or no full stop.)
    whole = next((e for e, text in zip(of("sentence"), sentences, strict=True) if is_complete(text)), None)
    return {
        "reference": spec.reference,
        "transcript": transcript,
        "wer": round(word_error_rate(spec.reference, transcript), 4) if transcript or spec.reference else None,
        # Server turns that got a final transcript, and those of them the
        # server took back because the caller went on (turn.resumed: the
        # halves were answered as one turn, voice/call/session.py).
        "server_turns": len(set(final_turns)),
        "resumed_turns": len({e.turn for e in window if e.kind == "resumed" and e.turn in final_turns}),
        "ttfs_ms": _ms(sentence.at if sentence else None, t_last),
        "whole_sentence_ms": _ms(whole.at if whole else None, t_last),
        "first_is_clause": bool(sentences) and not is_complete(sentences[0]),
        "asr_final_ms": _ms(final[-1].at if final else None, t_last),
        "first_token_ms": _ms(delta[0].at if delta else None, t_last),
        "ttfa_ms": _ms(audio[0].at if audio else None, t_last),
        "sentence_audio_ms": _ms(marks[0].at if marks else None, t_last),
        # Each reply sentence on the wire (ms after the last voiced frame) and
        # its words: whether the next came before the caller had heard these.
        "sentences_ms": [_ms(e.at, t_last) for e in of("sentence")],
        "sentence_words": [len(text.split()) for text in sentences],
        "reply": (done.data.get("text") if done else None) or " ".join(sentences),
        "server": metrics,
        # The server turn that answered: a turn the next one talks over is
        # recorded before its turn.metrics arrive (metrics_arrived fills them).
        "server_turn": answer,
        # What came back, for auditing a number: (event, server turn, ms after the last voiced frame).
        "events": [[e.kind, e.turn, _ms(e.at, t_last)] for e in window if e.kind not in ("audio", "delta", "metrics")],
    }


async def run_call(base_url: str, spec: CallSpec, opts: CallOptions) -> list[dict[str, Any]]:
    """Place one call; returns one record per caller turn."""
    tl = Timeline()
    client = PROTOCOLS[opts.protocol](base_url, tl, opts.token)
    base = {"call": spec.name, "protocol": opts.protocol}
    try:
        await client.connect()
    except InvalidStatus as exc:
        # Refused (admission control, 503): a result, not a crash.
        return [{**base, "turn": i, "refused": exc.response.status_code} for i in range(len(spec.turns))]
    audios = [turn_audio(t) for t in spec.turns]
    line = Line(client, opts.impairments, opts.speed, seed=opts.seed)
    line.start()
    records: list[dict[str, Any]] = []
    try:
        prev_last: float | None = None
        for i, (turn, audio) in enumerate(zip(spec.turns, audios, strict=True)):
            rec: dict[str, Any] = {**base, "turn": i, "barge_in": turn.barge_in_after_s is not None}
            if turn.barge_in_after_s is not None and prev_last is not None:
                # Talk over the previous reply, once it has started.
                deadline = time.monotonic() + opts.turn_timeout_s
                signal = _first_signal(tl, client, prev_last)
                while signal is None and time.monotonic() < deadline and not client.closed.is_set():
                    await tl.changed(0.05)
                    signal = _first_signal(tl, client, prev_last)
                start_at = (signal.at if signal else time.monotonic()) + turn.barge_in_after_s / opts.speed
                await asyncio.sleep(max(0.0, start_at - time.monotonic()))
                rec["reply_playing"] = bool(getattr(client, "player", None) and client.player.playing)  # type: ignore[attr-defined]
            else:
                await asyncio.sleep(turn.think_s / opts.speed)
            first_fut, last_fut = line.speak(audio)
            t_first = await first_fut
            t_last = await last_fut
            if turn.barge_in_after_s is not None:
                interrupts = tl.since(t_first, "interrupt")
                while not interrupts and time.monotonic() < t_last + 3.0:
                    await tl.changed(0.05)
                    interrupts = tl.since(t_first, "interrupt")
                rec["barge_in_ms"] = _ms(interrupts[0].at if interrupts else None, t_first)
                heard = tl.since(t_first, "speech_started")
                rec["speech_started_ms"] = _ms(heard[0].at if heard else None, t_first)
            # Wait for this turn's reply (unless the next turn barges in on it).
            next_barges = i + 1 < len(spec.turns) and spec.turns[i + 1].barge_in_after_s is not None
            deadline = t_last + opts.turn_timeout_s
            timed_out = False
            while not client.closed.is_set():
                if next_barges and _first_signal(tl, client, t_last) is not None:
                    break
                if not next_barges and _reply_over(tl, client, t_last, opts):
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                await tl.changed(0.05)
            await asyncio.sleep(0.05 / opts.speed if not next_barges else 0)  # turn.metrics follows response.done
            rec.update(turn_record(tl, t_first, t_last, turn))
            rec["timed_out"] = timed_out
            rec["hung_up"] = client.closed.is_set()
            rec["text_on_wire"] = client.has_text
            records.append(rec)
            prev_last = t_last
            if client.closed.is_set():
                break
        metrics_arrived(tl, records)
        rec_extra = {"dropped_frames": line.dropped}
        if records:
            records[-1].update(rec_extra)
    finally:
        await line.stop()
        await client.close()
    return records


# ---- many calls ------------------------------------------------------------------


async def run_calls(
    base_url: str,
    calls: list[CallSpec],
    concurrency: int,
    opts: CallOptions,
    on_turns: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Place ``calls`` keeping ``concurrency`` of them up at once; each call's
    start is staggered a little so turns do not line up artificially."""
    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = []
    rng = random.Random(opts.seed)

    async def one(k: int, spec: CallSpec) -> None:
        async with sem:
            await asyncio.sleep(rng.uniform(0, 0.5) / opts.speed if k >= 1 else 0.0)
            call_opts = dataclasses.replace(opts, seed=opts.seed + k)
            try:
                records = await run_call(base_url, spec, call_opts)
            except ProtocolUnavailable:
                raise
            except Exception as exc:
                records = [{"call": spec.name, "turn": 0, "error": f"{type(exc).__name__}: {exc}"}]
            for r in records:
                r["call_index"] = k
            out.extend(records)
            if on_turns is not None:
                on_turns(len(records))

    await asyncio.gather(*(one(k, spec) for k, spec in enumerate(calls)))
    return out


def calls_for(n: int, turns: int | None = None, corpus: list[CallSpec] | None = None) -> list[CallSpec]:
    """``n`` calls from the corpus (default: the scripted calls file), cycling,
    each cut to ``turns`` turns."""
    corpus = corpus or load_calls()
    picked = []
    for k in range(n):
        spec = corpus[k % len(corpus)]
        kept = spec.turns[:turns] if turns else spec.turns
        picked.append(CallSpec(f"{spec.name}#{k}" if k >= len(corpus) else spec.name, kept))
    paths = {seg.path for call in picked for turn in call.turns for seg in turn.segments}
    missing = sorted(str(path) for path in paths if not path.is_file())
    if missing:
        # Before any call is placed: a missing clip would otherwise be one
        # failed call per level, read as the server's error rate.
        raise FileNotFoundError(
            f"{len(missing)} recording(s) the scripted calls need are missing, e.g. {missing[0]}. Shared clips are "
            f"read from {SHARED_SPEECH} (../shared/data/speech beside the project, or FIRSTLINE_SPEECH_DIR); "
            f"Asterisk prompts from {ASTERISK_SOUNDS} (`make test-deps` installs them)."
        )
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server base URL (no path)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="twilio")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--turns", type=int, default=None, help="turns per call (default: the script's)")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--late-prob", type=float, default=0.0)
    parser.add_argument("--late-ms", type=float, default=200.0)
    parser.add_argument("--drop-prob", type=float, default=0.0)
    parser.add_argument("--token", default=None)
    ns = parser.parse_args()
    opts = CallOptions(
        protocol=ns.protocol,
        speed=ns.speed,
        impairments=Impairments(ns.jitter_ms, ns.late_prob, ns.late_ms, ns.drop_prob),
        token=ns.token,
    )
    records = asyncio.run(run_calls(ns.url, calls_for(ns.calls, ns.turns), ns.concurrency, opts))
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
