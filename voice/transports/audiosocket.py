"""Asterisk AudioSocket: a TCP listener (``AudioSocket(uuid,host:port)`` in the
dialplan, ``Dial(AudioSocket/host:port/uuid)``, or ARI externalMedia with
``encapsulation=audiosocket``).

Every message is ``kind (1 B) | length (2 B, big-endian) | payload``. Asterisk
sends the call's UUID (0x01) first, then signed-linear audio: 0x10 is 8 kHz,
0x11-0x18 higher rates (0x12 = 16 kHz, 0x13 = 24 kHz), 20 ms per message;
0x03 is a DTMF digit, 0x00 hang-up, 0xff an error. Asterisk neither buffers
nor paces what we send, so a per-call clock writes one 20 ms frame every
20 ms, reply audio when there is some and generated silence otherwise.
Barge-in simply empties the frame queue; what was written had played.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from streaming.playout import OutFormat
from voice.call.start import Start
from voice.server.limits import SLOW_READER, CallEnd, CallWatch
from voice.server.runtime import Runtime
from voice.transports.telephony import CallRefused, MalformedMessage, TelephonyCall, UnsupportedMedia, between_messages

log = logging.getLogger(__name__)

KIND_HANGUP, KIND_UUID, KIND_DTMF, KIND_ERROR = 0x00, 0x01, 0x03, 0xFF
AUDIO_KINDS = {
    0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000, 0x15: 44100, 0x16: 48000, 0x17: 96000,
    0x18: 192000,
}  # fmt: skip
# The protocol's audio range: a kind in it that is not listed (a newer
# Asterisk's rate) is audio this server cannot take, refused at once as such,
# not counted as malformed frames until the flood ends the call as abuse and
# cools the PBX's address (every caller behind it) down.
AUDIO_KIND_RANGE = range(0x10, 0x20)
# Every slin rate up to 48 kHz (a WebRTC or wideband channel bridged to
# AudioSocket arrives at 48 kHz): the call is resampled to the ASR's 16 kHz
# and the reply from the TTS's rate. 96 and 192 kHz are refused: studio
# rates no phone leg carries, at 4-8x the bytes of 48 kHz per call.
SUPPORTED_RATES = (8000, 12000, 16000, 24000, 32000, 44100, 48000)
FRAME_S = 0.02


def message(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


class AudioSocketCall(TelephonyCall):
    transport = "audiosocket"
    echoes_marks = False
    lead_s = 0.2  # frames queued ahead of the 20 ms clock; barge-in drops at most this

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        runtime: Runtime,
        watch: CallWatch | None = None,
    ) -> None:
        super().__init__(runtime)
        self.reader = reader
        self.writer = writer
        self.call_uuid: str | None = None
        self.kind = 0x10
        self.frame_bytes = 320
        self.frames: deque[bytes] = deque()
        self.frames_written = 0
        self.silence_written = 0
        self._clock: asyncio.Task[None] | None = None
        # Idle timeout and drain (the registry's); a silent TCP connection
        # must not hold a call slot forever.
        self.watch = watch or CallWatch(runtime.config.limits)
        self.watch.has_started = lambda: self.session.started  # its first audio: CallLimits.start_timeout_s

    async def serve(self) -> None:
        self.admit()
        reason = "carrier_closed"
        at_boundary = True
        watch = self.watch
        try:
            async with watch:
                for handled in itertools.count(1):
                    at_boundary = True
                    header = await self.reader.readexactly(3)
                    at_boundary = False
                    kind, length = struct.unpack(">BH", header)
                    payload = await self.reader.readexactly(length) if length else b""
                    if kind == KIND_HANGUP:
                        reason = "carrier_stop"
                        break
                    bad_before = self.malformed
                    try:
                        await self.on_message(kind, payload)
                    except MalformedMessage as exc:
                        self.note_malformed(exc)
                    if self.malformed == bad_before:
                        # Only a message that was used keeps the call from
                        # idling out: one bad message a minute held a slot
                        # for the whole --max-call-s.
                        watch.touch()
                    await between_messages(handled, watch.end is not None)
        except asyncio.IncompleteReadError as exc:
            # Asterisk ends a call by closing the socket (it sends no hang-up
            # message): a close between messages is the carrier's; one
            # inside a message is a lost connection.
            reason = "carrier_closed" if exc.partial == b"" and at_boundary else "connection_lost"
        except ConnectionError:
            reason = "connection_lost"
        except CallRefused as refusal:
            self.note_refused(watch, refusal)
            reason = str(refusal)
            with contextlib.suppress(Exception):
                self.writer.write(message(KIND_HANGUP))
        except asyncio.CancelledError:
            # The watch ended the call (idle, drain); any other cancellation is real.
            if not watch.ended_by_guard():
                raise
            assert watch.end is not None
            reason = watch.end.reason
            # Tell Asterisk to hang up rather than just dropping the socket.
            with contextlib.suppress(Exception):
                self.writer.write(message(KIND_HANGUP))
        except Exception:
            log.exception("call %s (audiosocket) failed", self.call_id)
            reason = "internal_error"
        finally:
            if self._clock is not None:
                self._clock.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._clock
            await self.finish(reason)
            with contextlib.suppress(Exception):
                self.writer.close()
                # close() flushes first; a peer that reads nothing would
                # hold this handler (and its call slot) in wait_closed.
                async with asyncio.timeout(self.watch.limits.close_timeout_s):
                    await self.writer.wait_closed()
            if self.writer.transport.get_write_buffer_size():
                self.writer.transport.abort()  # unsent bytes nobody will read

    def end_call(self, end: CallEnd) -> None:
        self.watch.finish(end)

    async def on_message(self, kind: int, payload: bytes) -> None:
        if kind == KIND_UUID:
            self.take_control_event()
            if len(payload) != 16:
                raise MalformedMessage(f"UUID of {len(payload)} bytes")
            self.call_uuid = str(uuid.UUID(bytes=payload))
        elif kind in AUDIO_KIND_RANGE:
            if not self.session.started:
                await self._start(kind)
            elif kind != self.kind:
                raise MalformedMessage(f"audio kind changed from {self.kind:#x} to {kind:#x}")
            await self.audio(payload)
        elif kind == KIND_DTMF:
            self.take_control_event()  # metered like the websocket carriers' DTMF
            self.on_dtmf_digit(payload.decode("ascii", "replace"))
        elif kind == KIND_ERROR:
            self.note_peer_report(f"Asterisk error {payload[:1].hex() or '(no code)'}", payload[:64].hex())
            self.count_bad_input()  # a real Asterisk sends one, not a stream
        else:
            raise MalformedMessage(f"unknown message kind {kind:#x}")

    async def _start(self, kind: int) -> None:
        rate = AUDIO_KINDS.get(kind)
        if rate is None:
            raise UnsupportedMedia(f"audio kind {kind:#x} is not supported; use slin at 8 to 48 kHz")
        if rate not in SUPPORTED_RATES:
            raise UnsupportedMedia(f"slin at {rate} Hz is not supported; use 8 to 48 kHz")
        self.kind = kind
        self.frame_bytes = round(rate * FRAME_S) * 2
        await self.begin(
            Start(encoding="pcm16", sample_rate=rate, metadata={"uuid": self.call_uuid}),
            OutFormat("pcm16", rate, chunk_bytes=self.frame_bytes),
        )
        self._clock = asyncio.create_task(self._write_clock())

    async def _write_clock(self) -> None:
        """One frame per 20 ms on an absolute schedule (no drift); after a
        stall (a blocked loop) resynchronise instead of bursting."""
        silence = bytes(self.frame_bytes)
        start = time.monotonic()
        n = 0
        while True:
            n += 1
            delay = start + n * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.1:
                # The frames still queued go out from now, one a slot: the
                # playout clock must say so, or it paces more in on top. By
                # what is queued, not by the stall: the playout may have
                # woken first and counted part of it already.
                now = time.monotonic()
                if self.playout is not None:
                    late = min(-delay, now + len(self.frames) * FRAME_S - self.playout.clock_end)
                    self.playout.delay(since=now + delay, stall=-delay, late=late)
                start, n = now, 0
            if self.frames:
                frame = self.frames.popleft()
                self.frames_written += 1
            else:
                frame = silence
                self.silence_written += 1
            self.writer.write(message(self.kind, frame))
            try:
                # A peer that stops reading must not hold the call (and
                # the replies queued for it) forever: as on the websockets.
                async with asyncio.timeout(self.watch.limits.send_timeout_s):
                    await self.writer.drain()
            except TimeoutError:
                log.warning("call %s (audiosocket): peer not reading for %.1f s: dropping the call", self.call_id,
                            self.watch.limits.send_timeout_s)  # fmt: skip
                self.frames.clear()
                self.watch.finish(SLOW_READER)
                return

    async def send_audio(self, chunk: bytes) -> None:
        self.frames.append(chunk)

    async def send_clear(self) -> None:
        self.frames.clear()


class OpenConnection(Protocol):
    """A connection counted against its source's cap until closed."""

    def close(self) -> None: ...


class CallGate(Protocol):
    """The server's call registry as this listener sees it
    (voice/server/registry.py; a transport does not import the server)."""

    def connection_opened(self, address: str | None, listener: str = "websocket") -> OpenConnection | None: ...

    async def serve_connection(
        self,
        listener: str,
        address: str | None,
        allow: Any,
        call: Callable[[CallWatch], Awaitable[None]],
        refuse: Callable[[str], Awaitable[None]],
    ) -> None: ...


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str) -> None:
    # No websocket 503 here: a hang-up, nothing else. Asterisk's reader takes
    # only hang-up and audio from us (the error kind is its own, "received
    # only"): an error message makes it log an ERROR and hang the channel
    # up, where a hang-up alone returns AudioSocket() normally and the
    # dialplan goes on to its fallback (a queue, an agent).
    log.debug("audiosocket: refused (%s)", reason)
    writer.write(message(KIND_HANGUP))
    with contextlib.suppress(Exception):
        await writer.drain()
        # Half-close and wait (briefly) for the peer's close: closing with
        # its UUID still unread would send a reset, and the peer might lose
        # the hang-up that says the call is over.
        writer.write_eof()
        async with asyncio.timeout(1.0):
            while await reader.read(4096):
                pass
    with contextlib.suppress(Exception):
        writer.close()
        await writer.wait_closed()


async def start_audiosocket(
    runtime: Runtime, host: str, port: int, registry: CallGate | None = None, allow: Any = ()
) -> asyncio.Server:
    """Listen for AudioSocket. With ``registry`` (the server's) every
    connection goes through its allow-list, admission, idle timeout and
    drain; without one (tests driving the transport alone) only
    ``max_calls`` on this listener is checked."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else None

        async def call(watch: CallWatch) -> None:
            await AudioSocketCall(reader, writer, runtime, watch).serve()

        if registry is not None:
            slot = registry.connection_opened(address, "audiosocket")
            if slot is None:  # its source holds the cap: closed before a byte is read
                writer.close()
                return
            try:
                await registry.serve_connection(
                    "audiosocket", address, list(allow), call, lambda reason: _refuse(reader, writer, reason)
                )
            finally:
                slot.close()
            return
        config: Any = runtime.config
        if not runtime.ready or runtime.active_calls >= config.max_calls:
            await _refuse(reader, writer, "at_capacity")
            return
        await call(CallWatch(config.limits))

    server = await asyncio.start_server(on_connect, host, port)
    log.info("AudioSocket listening on %s:%d", host, server.sockets[0].getsockname()[1])
    return server
