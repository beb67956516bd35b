"""A native-protocol caller: streams real audio over a websocket the way a
phone line does (20 ms frames, real time or faster), records every server
event with its arrival time. Used by the tests and by benchmarks/ttfs.py.
The protocol's messages come from benchmarks/callers/native.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from asr.vad import CHUNK, SileroVAD
from benchmarks.callers.base import Mark, to_wire
from benchmarks.callers.native import Native
from streaming.codecs import encode, float_to_int16

FRAME_S = 0.02


@dataclass
class Received:
    at: float
    event: dict[str, Any]


@dataclass
class CallResult:
    events: list[Received] = field(default_factory=list)
    last_voice_sent_at: float | None = None  # monotonic
    audio_done_at: float | None = None
    # Reply audio (options.reply_audio): binary frames as received, and the
    # byte offset into them at which each response.audio.mark arrived.
    audio_frames: list[tuple[float, bytes]] = field(default_factory=list)
    audio_bytes: int = 0
    mark_offsets: dict[str, int] = field(default_factory=dict)

    def reply_audio(self) -> bytes:
        return b"".join(frame for _, frame in self.audio_frames)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r.event for r in self.events if r.event.get("type") == kind]

    def first_at(self, kind: str, **match: Any) -> float | None:
        for r in self.events:
            if r.event.get("type") == kind and all(r.event.get(k) == v for k, v in match.items()):
                return r.at
        return None

    def last_turn(self) -> int:
        """The last turn the server ended (0: none)."""
        return max((e["turn"] for e in self.of("turn.ended")), default=0)

    @property
    def ttfs_s(self) -> float | None:
        """Last voiced frame sent -> first sentence of the reply to the last
        turn: the one that answers the caller's last word. A clip the
        server split at a pause has an earlier turn whose sentence may also
        arrive after the last word; it answers only part of what was said."""
        turn = self.last_turn()
        if self.last_voice_sent_at is None or not turn:
            return None
        for r in self.events:
            ev = r.event
            if (
                ev.get("type") == "response.sentence"
                and ev.get("first")
                and ev.get("turn") == turn
                and r.at > self.last_voice_sent_at
            ):
                return r.at - self.last_voice_sent_at
        return None


_vad: SileroVAD | None = None


def last_voiced_s(audio16k: np.ndarray, threshold: float = 0.5) -> float:
    """End of the last voiced 32 ms chunk of a clip (Silero, run offline)."""
    global _vad
    if _vad is None:
        _vad = SileroVAD()
    probs = _vad.stream().process(audio16k)
    voiced = np.nonzero(probs >= threshold)[0]
    return 0.0 if len(voiced) == 0 else float((voiced[-1] + 1) * CHUNK / 16000)


def frames(audio: np.ndarray, rate: int, encoding: str) -> list[bytes]:
    pcm = float_to_int16(audio)
    n = int(rate * FRAME_S)
    return [encode(pcm[i : i + n], encoding) for i in range(0, len(pcm), n)]  # type: ignore[arg-type]


class NativeCaller:
    """A native-protocol call (benchmarks/callers/native.py speaks it). ``url``:
    the call's full URL (``ws://host:port/v1/call``, ``?token=`` included if
    wanted); ``token``: sent as a bearer header instead."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.wire = Native(token=token)
        self.ws: ClientConnection | None = None
        self.result = CallResult()
        self._reader: asyncio.Task[None] | None = None
        self._waiters: list[tuple[str, dict[str, Any], asyncio.Future[dict[str, Any]]]] = []

    async def __aenter__(self) -> NativeCaller:
        self.ws = await connect(self.url, max_size=1 << 20, compression=None, additional_headers=self.wire.headers())
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                if isinstance(raw, bytes):  # reply audio
                    self.result.audio_frames.append((time.monotonic(), raw))
                    self.result.audio_bytes += len(raw)
                    continue
                ev = json.loads(raw)
                self.result.events.append(Received(time.monotonic(), ev))
                for meaning in self.wire.events(ev):
                    if isinstance(meaning, Mark):
                        self.result.mark_offsets[meaning.name] = self.result.audio_bytes
                for waiter in list(self._waiters):
                    kind, match, fut = waiter
                    if ev.get("type") == kind and all(ev.get(k) == v for k, v in match.items()):
                        self._waiters.remove(waiter)
                        if not fut.done():
                            fut.set_result(ev)
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))

    async def send_json(self, msg: dict[str, Any]) -> None:
        """Any JSON message: the protocol's, or one a test makes up."""
        assert self.ws is not None
        await self.ws.send(to_wire(msg))

    async def send_raw(self, data: str | bytes) -> None:
        """Any frame, as is (garbage on purpose included)."""
        assert self.ws is not None
        await self.ws.send(data)

    async def wait_for(self, kind: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        for r in self.result.events:
            if r.event.get("type") == kind and all(r.event.get(k) == v for k, v in match.items()):
                return r.event
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((kind, match, fut))
        return await asyncio.wait_for(fut, timeout)

    def _last_begun_ended(self) -> bool:
        """The last turn the server began (speech.started) has ended: a
        turn end after that turn's speech.stopped. Not a count: a turn
        talked over before its transcript went out ends inside the next
        one, with no event of its own; and not any end after the start: the
        turn before may end just after the next one began."""
        kinds = [r.event.get("type") for r in self.result.events]
        began = max((i for i, k in enumerate(kinds) if k == "speech.started"), default=-1)
        stopped = next((i for i in range(began + 1, len(kinds)) if kinds[i] == "speech.stopped"), None)
        if stopped is None:
            return False
        return any(k in ("turn.ended", "turn.empty") for k in kinds[stopped + 1 :])

    async def settle(self, after: int, timeout: float = 60.0, quiet_s: float = 5.0) -> int | None:
        """Once the audio is sent: wait until a turn after ``after`` has
        ended and the last turn the server began has ended too
        (``_last_begun_ended``): a clip split at a pause ends its first turn
        while the audio still plays, and the turn that answers the last word
        ends later. Then the last turn's ``turn.metrics`` (it follows
        response.done). The last turn, or None when none ended in
        time: an unanswered turn the caller counts, not one left out of the
        percentiles. A begun turn that never ends stops the wait after
        ``quiet_s`` with nothing new."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen, changed = -1, loop.time()
        while True:
            if len(self.result.events) != seen:
                seen, changed = len(self.result.events), loop.time()
            if self.result.last_turn() > after and (self._last_begun_ended() or loop.time() - changed > quiet_s):
                break
            if loop.time() > deadline or (self.ws is not None and self.ws.close_code):
                if self.result.last_turn() <= after:
                    return None
                break
            await asyncio.sleep(0.05)
        turn = self.result.last_turn()
        left = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            await self.wait_for("turn.metrics", timeout=left, turn=turn)
        except TimeoutError:
            return None
        return turn

    async def start(self, encoding: str = "mulaw", sample_rate: int = 8000, **extra: Any) -> dict[str, Any]:
        """``start`` (``extra``: its other fields, ``options``, ``system_prompt``…); the ``ready`` event."""
        await self.send_json(self.wire.start(encoding, sample_rate, **extra))
        return await self.wait_for("ready", timeout=10)

    async def commit(self) -> None:
        await self.send_json(self.wire.commit())

    async def played(self, name: str) -> None:
        """The reply audio before mark ``name`` has played (``response.audio.played``)."""
        await self.send_json(self.wire.played(name))

    async def stop(self) -> None:
        for msg in self.wire.closing():
            await self.send_raw(to_wire(msg))

    async def play(
        self,
        audio: np.ndarray,
        rate: int,
        encoding: str,
        realtime: bool = True,
        speed: float = 1.0,
        last_voice_s: float | None = None,
    ) -> None:
        """Send ``audio`` (float32 at ``rate``) as 20 ms frames. Records when
        the frame holding the last voiced sample left."""
        assert self.ws is not None
        chunks = frames(audio, rate, encoding)
        t0 = time.monotonic()
        for i, chunk in enumerate(chunks):
            if realtime:
                delay = t0 + i * FRAME_S / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.ws.send(to_wire(self.wire.media(chunk)))
            if (
                last_voice_s is not None
                and self.result.last_voice_sent_at is None
                and (i + 1) * FRAME_S >= last_voice_s
            ):
                self.result.last_voice_sent_at = time.monotonic()
            if not realtime and i % 50 == 49:
                await asyncio.sleep(0)  # let the reader run
        self.result.audio_done_at = time.monotonic()
