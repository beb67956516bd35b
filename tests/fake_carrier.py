"""Fake carriers: test clients that speak each carrier's exact wire format.

A fake is the carrier's side of the call and nothing else: it streams a real
recording as the carrier would, collects the audio the server sends back and
plays it out on a simulated real-time clock, echoing marks / checkpoints when
the audio before them has "played" and flushing on clear, as the real
platforms do. The server side under test is entirely real.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from streaming.codecs import StreamResampler, decode, encode, float_to_int16, int16_to_float
from voice.transports.telephony import TelephonyCall


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Played:
    """What the fake's simulated playback did."""

    marks_echoed: list[str] = field(default_factory=list)
    marks_flushed: list[str] = field(default_factory=list)
    clears: int = 0


class FakeCarrier:
    """Base: connection, reader, simulated playback. Subclasses define the dialect."""

    path = "/"
    encoding = "mulaw"
    rate = 8000
    frame_s = 0.02  # inbound frame length the carrier sends
    echo_flushed = True  # on clear, pending marks come back at once (Twilio, Telnyx, Exotel)

    def __init__(self, base_url: str, **options: Any) -> None:
        self.url = base_url + self.path
        self.options = options
        self.ws: ClientConnection | None = None
        self.texts: list[tuple[float, dict[str, Any]]] = []
        self.raw_text: list[str] = []
        self.audio_chunks: list[tuple[float, bytes]] = []
        self.mark_offsets: list[int] = []  # audio bytes received before each mark
        self.played = Played()
        self._playback: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._flush = asyncio.Event()
        self.closed = asyncio.Event()
        self.last_voice_sent_at: float | None = None
        self._sent_frames = 0  # carriers number media across the whole call

    headers: dict[str, str] | None = None

    async def __aenter__(self) -> FakeCarrier:
        self.ws = await connect(self.url, max_size=1 << 22, compression=None, additional_headers=self.headers)
        self._reader = asyncio.create_task(self._read())
        self._player = asyncio.create_task(self._play())
        for msg in self.opening():
            await self.send(msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.hangup()

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

    # ---- dialect hooks ----------------------------------------------------

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        return []

    def closing(self) -> list[dict[str, Any] | bytes | str]:
        return []

    def media(self, chunk: bytes, seq: int) -> dict[str, Any] | bytes:
        raise NotImplementedError

    def dtmf(self, digit: str) -> dict[str, Any] | str:
        raise NotImplementedError

    def on_mark_style_event(self, msg: dict[str, Any]) -> None:
        """Twilio-shaped carriers (Twilio, Telnyx, Exotel) send the same media/mark/clear events."""
        event = msg.get("event")
        if event == "media":
            self.got_audio(base64.b64decode(msg["media"]["payload"]), time.monotonic())
        elif event == "mark":
            self.got_mark(msg["mark"]["name"])
        elif event == "clear":
            self.got_clear()

    def on_server_text(self, msg: dict[str, Any]) -> None:
        """Route a server message: audio / mark / clear, per dialect."""

    def echo_mark(self, name: str) -> dict[str, Any] | None:
        return None

    # ---- io ---------------------------------------------------------------

    async def send(self, msg: dict[str, Any] | bytes | str) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(msg) if isinstance(msg, dict) else msg)

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                now = time.monotonic()
                if isinstance(raw, bytes):
                    self.got_audio(raw, now)
                    continue
                self.raw_text.append(raw)
                try:
                    msg = json.loads(raw)
                except json.JSONDecodeError:
                    msg = {"text": raw}
                self.texts.append((now, msg))
                self.on_server_text(msg)
        self.closed.set()

    def got_audio(self, chunk: bytes, now: float) -> None:
        self.audio_chunks.append((now, chunk))
        self._playback.put_nowait(("audio", len(chunk) / self.bytes_per_s))

    def got_mark(self, name: Any) -> None:
        self.mark_offsets.append(sum(len(c) for _, c in self.audio_chunks))
        self._playback.put_nowait(("mark", name))

    def got_clear(self) -> None:
        """Drop buffered audio; pending marks come back at once (Twilio, Telnyx, Exotel)."""
        self.played.clears += 1
        self._flush.set()

    @property
    def bytes_per_s(self) -> int:
        return self.rate * (2 if self.encoding == "pcm16" else 1)

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
                echo = self.echo_mark(value)
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
                echo = self.echo_mark(v) if self.echo_flushed else None
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
            seq = self._sent_frames
            self._sent_frames += 1
            if speed is not None:
                delay = t0 + i * self.frame_s / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % 25 == 24:
                await asyncio.sleep(0)
            frame = pcm[start : start + n]
            if len(frame) < n:
                frame = np.concatenate([frame, np.zeros(n - len(frame), np.int16)])
            await self.send(self.media(encode(frame, self.encoding), seq))  # type: ignore[arg-type]
            if last_voice_s is not None and self.last_voice_sent_at is None and (i + 1) * self.frame_s >= last_voice_s:
                self.last_voice_sent_at = time.monotonic()

    async def press(self, digit: str) -> None:
        await self.send(self.dtmf(digit))

    # ---- what came back -------------------------------------------------------

    def texts_of(self, key: str, value: str) -> list[dict[str, Any]]:
        return [m for _, m in self.texts if m.get(key) == value]

    @property
    def first_audio_at(self) -> float | None:
        return self.audio_chunks[0][0] if self.audio_chunks else None

    def audio_bytes(self) -> bytes:
        return b"".join(c for _, c in self.audio_chunks)

    def audio16k(self) -> np.ndarray:
        pcm = decode(self.audio_bytes(), self.encoding)  # type: ignore[arg-type]
        return StreamResampler(self.rate, 16000).process(int16_to_float(pcm), last=True)

    def pieces16k(self) -> list[np.ndarray]:
        """The audio cut at the marks: one piece per reply sentence."""
        data = self.audio_bytes()
        cuts = [0, *self.mark_offsets, len(data)]
        out = []
        for a, b in itertools.pairwise(cuts):
            if b > a:
                pcm = decode(data[a:b], self.encoding)  # type: ignore[arg-type]
                out.append(StreamResampler(self.rate, 16000).process(int16_to_float(pcm), last=True))
        return out

    async def wait_audio(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.audio_chunks:
            if time.monotonic() > deadline:
                kinds = [m.get("type") or m.get("event") for _, m in self.texts][-12:]
                raise TimeoutError(f"no audio from the server; last messages: {kinds}")
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
    path = "/twilio"
    sid = "MZ00000000000000000000000000000001"

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        params = self.options.get("parameters", {})
        return [
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": self.sid,
                "start": {
                    "accountSid": "AC0",
                    "streamSid": self.sid,
                    "callSid": "CA0",
                    "tracks": ["inbound"],
                    "customParameters": params,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            },
        ]

    def closing(self) -> list[dict[str, Any] | bytes | str]:
        return [{"event": "stop", "sequenceNumber": "999999", "streamSid": self.sid, "stop": {"callSid": "CA0"}}]

    def media(self, chunk: bytes, seq: int) -> dict[str, Any]:
        return {
            "event": "media",
            "sequenceNumber": str(seq + 2),
            "streamSid": self.sid,
            "media": {"track": "inbound", "chunk": str(seq + 1), "timestamp": str(seq * 20), "payload": b64(chunk)},
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        dtmf = {"track": "inbound_track", "digit": digit}
        return {"event": "dtmf", "streamSid": self.sid, "sequenceNumber": "5", "dtmf": dtmf}

    def on_server_text(self, msg: dict[str, Any]) -> None:
        assert msg.get("streamSid") == self.sid, msg
        self.on_mark_style_event(msg)

    def echo_mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "sequenceNumber": "7", "streamSid": self.sid, "mark": {"name": name}}


class FakeTelnyx(FakeCarrier):
    path = "/telnyx"
    sid = "32de0dea-53cb-4b21-89a4-9e5f1cb5b2a5"

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        encoding = "PCMA" if self.encoding == "alaw" else "PCMU"
        return [
            {"event": "connected", "version": "1.0.0"},
            {
                "event": "start",
                "sequence_number": "1",
                "stream_id": self.sid,
                "start": {
                    "user_id": "u",
                    "call_control_id": "v3:cc",
                    "call_session_id": "cs",
                    "from": "+15550001111",
                    "to": "+15550002222",
                    "custom_parameters": self.options.get("parameters", {}),
                    "media_format": {"encoding": encoding, "sample_rate": 8000, "channels": 1},
                },
            },
        ]

    def closing(self) -> list[dict[str, Any] | bytes | str]:
        return [{"event": "stop", "sequence_number": "999999", "stream_id": self.sid, "stop": {}}]

    def media(self, chunk: bytes, seq: int) -> dict[str, Any]:
        return {
            "event": "media",
            "sequence_number": str(seq + 2),
            "stream_id": self.sid,
            "media": {"track": "inbound", "chunk": str(seq + 1), "timestamp": str(seq * 20), "payload": b64(chunk)},
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "stream_id": self.sid, "dtmf": {"digit": digit}}

    def on_server_text(self, msg: dict[str, Any]) -> None:
        self.on_mark_style_event(msg)

    def echo_mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "stream_id": self.sid, "mark": {"name": name}}


class FakePlivo(FakeCarrier):
    path = "/plivo"
    sid = "20170ada-f610-433b-8758-c02a2aab3662"
    echo_flushed = False  # Plivo acknowledges clearAudio with clearedAudio instead

    def __init__(self, base_url: str, **options: Any) -> None:
        super().__init__(base_url, **options)
        self.encoding = options.get("encoding", "mulaw")
        self.rate = options.get("rate", 8000)

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        content = "audio/x-mulaw" if self.encoding == "mulaw" else "audio/x-l16"
        return [
            {
                "event": "start",
                "sequenceNumber": 0,
                "start": {
                    "callId": "c1",
                    "streamId": self.sid,
                    "accountId": "a1",
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": content, "sampleRate": self.rate},
                },
                "extra_headers": self.options.get("extra_headers", "caller=test"),
            }
        ]

    def media(self, chunk: bytes, seq: int) -> dict[str, Any]:
        return {
            "event": "media",
            "sequenceNumber": seq + 1,
            "streamId": self.sid,
            "media": {"track": "inbound", "timestamp": str(seq * 20), "chunk": seq + 1, "payload": b64(chunk)},
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "streamId": self.sid, "dtmf": {"track": "inbound", "digit": digit, "timestamp": "0"}}

    def on_server_text(self, msg: dict[str, Any]) -> None:
        assert msg.get("streamId") == self.sid, msg
        event = msg.get("event")
        if event == "playAudio":
            media = msg["media"]
            assert (media["contentType"], media["sampleRate"]) == (
                "audio/x-mulaw" if self.encoding == "mulaw" else "audio/x-l16",
                self.rate,
            ), media
            self.got_audio(base64.b64decode(media["payload"]), time.monotonic())
        elif event == "checkpoint":
            self.got_mark(msg["name"])
        elif event == "clearAudio":
            self.got_clear()
            asyncio.get_running_loop().create_task(self.send({"event": "clearedAudio", "streamId": self.sid}))

    def echo_mark(self, name: str) -> dict[str, Any]:
        return {"event": "playedStream", "streamId": self.sid, "name": name}


class FakeExotel(FakeCarrier):
    path = "/exotel"
    encoding = "pcm16"
    frame_s = 0.1  # Exotel sends about 100 ms per media message
    sid = "b3f1c2d4e5"

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        return [
            {"event": "connected"},
            {
                "event": "start",
                "sequence_number": "1",
                "stream_sid": self.sid,
                "start": {
                    "stream_sid": self.sid,
                    "call_sid": "x1",
                    "account_sid": "acc",
                    "from": "0",
                    "to": "1",
                    "custom_parameters": self.options.get("parameters", {}),
                    "media_format": {"encoding": "base64", "sample_rate": str(self.rate), "bit_rate": "16"},
                },
            },
        ]

    def closing(self) -> list[dict[str, Any] | bytes | str]:
        return [{"event": "stop", "sequence_number": "99999", "stream_sid": self.sid, "stop": {"reason": "callended"}}]

    def media(self, chunk: bytes, seq: int) -> dict[str, Any]:
        return {
            "event": "media",
            "sequence_number": str(seq + 2),
            "stream_sid": self.sid,
            "media": {"chunk": str(seq + 1), "timestamp": str(seq * 100), "payload": b64(chunk)},
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "stream_sid": self.sid, "dtmf": {"digit": digit, "duration": "120"}}

    def on_server_text(self, msg: dict[str, Any]) -> None:
        assert msg.get("stream_sid") == self.sid, msg
        self.on_mark_style_event(msg)

    def echo_mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "stream_sid": self.sid, "mark": {"name": name}}


class FakeVonage(FakeCarrier):
    path = "/vonage"
    encoding = "pcm16"
    echo_flushed = False

    def __init__(self, base_url: str, **options: Any) -> None:
        super().__init__(base_url, **options)
        self.rate = options.get("rate", 16000)

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        headers = self.options.get("headers", {"caller": "test"})
        return [{"event": "websocket:connected", "content-type": f"audio/l16;rate={self.rate}", **headers}]

    def media(self, chunk: bytes, seq: int) -> bytes:
        return chunk

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "websocket:dtmf", "digit": digit, "duration": 260}

    def on_server_text(self, msg: dict[str, Any]) -> None:
        action = msg.get("action")
        if action == "notify":
            self.got_mark(msg["payload"])
        elif action == "clear":
            self.got_clear()
            asyncio.get_running_loop().create_task(self.send({"event": "websocket:cleared"}))

    def echo_mark(self, name: Any) -> dict[str, Any]:
        return {"event": "websocket:notify", "payload": name}


class FakeAsteriskWS(FakeCarrier):
    """chan_websocket: binary media, plain-text (or JSON) control messages."""

    path = "/asterisk"

    def __init__(self, base_url: str, **options: Any) -> None:
        super().__init__(base_url, **options)
        self.format = options.get("format", "ulaw")
        self.encoding, self.rate = {"ulaw": ("mulaw", 8000), "alaw": ("alaw", 8000), "slin16": ("pcm16", 16000)}[
            self.format
        ]
        self.json_control = options.get("json", False)
        self.frame_size = 160 if self.encoding != "pcm16" else 640
        self.controls: list[str] = []

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        params = {
            "connection_id": "abc123",
            "channel": "WebSocket/test/0x1",
            "format": self.format,
            "optimal_frame_size": str(self.frame_size),
        }
        if self.json_control:
            return [{"event": "MEDIA_START", **params}]
        return ["MEDIA_START " + " ".join(f"{k}:{v}" for k, v in params.items())]

    def media(self, chunk: bytes, seq: int) -> bytes:
        return chunk

    def dtmf(self, digit: str) -> str:
        return f"DTMF_END digit:{digit}"

    def on_server_text(self, msg: dict[str, Any]) -> None:
        command = msg.get("command") or msg.get("text", "")
        self.controls.append(command)
        if command == "FLUSH_MEDIA":
            self.got_clear()


class FakeRealtime(FakeCarrier):
    """An OpenAI Realtime client over a raw websocket (GA event names, or the
    beta ones with ``beta=True``). Like the reference clients it stops its
    local playback on ``input_audio_buffer.speech_started`` and then tells
    the server how much of the reply it played (``conversation.item.truncate``)."""

    path = "/v1/realtime?model=firstline-test"
    echo_flushed = False
    FORMATS: ClassVar[dict[str, tuple[str, int]]] = {
        "audio/pcm": ("pcm16", 24000), "audio/pcmu": ("mulaw", 8000), "audio/pcma": ("alaw", 8000)}  # fmt: skip
    BETA: ClassVar[dict[str, str]] = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}

    def __init__(self, base_url: str, fmt: str = "audio/pcm", audio_out: bool = True, beta: bool = False,
                 **options: Any) -> None:  # fmt: skip
        super().__init__(base_url, **options)
        self.format = fmt
        self.encoding, self.rate = self.FORMATS[fmt]
        self.audio_out = audio_out
        self.beta = beta
        self.headers = {"Authorization": "Bearer test", **({"OpenAI-Beta": "realtime=v1"} if beta else {})}
        self.events: list[dict[str, Any]] = []
        self._item_audio: dict[str, tuple[float, int]] = {}  # item -> (first audio at, bytes)
        self._playing_item: str | None = None

    def session_update(self) -> dict[str, Any]:
        td = self.options.get("turn_detection", {"type": "server_vad"})
        if self.beta:
            session: dict[str, Any] = {
                "modalities": ["text", "audio"] if self.audio_out else ["text"],
                "input_audio_format": self.BETA[self.format],
                "output_audio_format": self.BETA[self.format],
                "turn_detection": td,
            }
        else:
            fmt: dict[str, Any] = {"type": self.format}
            if self.format == "audio/pcm":
                fmt["rate"] = 24000
            session = {
                "type": "realtime",
                "output_modalities": ["audio"] if self.audio_out else ["text"],
                "audio": {"input": {"format": fmt, "turn_detection": td}, "output": {"format": fmt}},
            }
        if "instructions" in self.options:
            session["instructions"] = self.options["instructions"]
        return {"type": "session.update", "event_id": "evt_update", "session": session}

    def opening(self) -> list[dict[str, Any] | bytes | str]:
        return [self.session_update()]

    def media(self, chunk: bytes, seq: int) -> dict[str, Any]:
        return {"type": "input_audio_buffer.append", "audio": b64(chunk)}

    def on_server_text(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        kind = msg.get("type")
        if kind in ("response.output_audio.delta", "response.audio.delta"):
            item = msg["item_id"]
            chunk = base64.b64decode(msg["delta"])
            at, size = self._item_audio.get(item, (time.monotonic(), 0))
            self._item_audio[item] = (at, size + len(chunk))
            self._playing_item = item
            self.got_audio(chunk, time.monotonic())
        elif kind == "input_audio_buffer.speech_started" and self._playing_item is not None:
            item, self._playing_item = self._playing_item, None
            at, size = self._item_audio[item]
            played_ms = min((time.monotonic() - at) * 1000, size / self.bytes_per_s * 1000)
            self.got_clear()
            truncate = {"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                        "audio_end_ms": int(played_ms)}  # fmt: skip
            asyncio.get_running_loop().create_task(self.send(truncate))

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
