"""Asterisk AudioSocket over TCP: Asterisk's side (docs/telephony.md).

Every message is ``kind (1 B) | length (2 B, big-endian) | payload``.
Asterisk sends the call's UUID (``0x01``) first, then signed-linear 16-bit
audio, 20 ms per message, as kind ``0x10`` (8 kHz) to ``0x16`` (48 kHz);
``0x03`` is a key (one ASCII digit), ``0x00`` the hang-up, ``0xff`` an error.
The server answers with audio of the same kind; it sends no marks and no
clear (barge-in just stops its frames).
"""

from __future__ import annotations

import asyncio
import struct
import uuid

from benchmarks.callers.base import Audio, Control, ServerEvent

KIND_HANGUP, KIND_UUID, KIND_DTMF, KIND_ERROR = 0x00, 0x01, 0x03, 0xFF
AUDIO_KINDS = {0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000, 0x15: 44100, 0x16: 48000}
HEADER = struct.Struct(">BH")


def frame(kind: int, payload: bytes = b"") -> bytes:
    """One AudioSocket message (any kind: tests send broken ones with it)."""
    return HEADER.pack(kind, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next message from the server: (kind, payload)."""
    kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    return kind, await reader.readexactly(length) if length else b""


class AudioSocket:
    """One call's Asterisk side. ``rate``: the audio's sample rate; ``kind``:
    its message kind, by default the rate's."""

    name = "audiosocket"
    encoding = "pcm16"
    frame_ms = 20

    def __init__(self, *, rate: int = 8000, kind: int | None = None, call_uuid: uuid.UUID | None = None) -> None:
        self.rate = rate
        self.kind = kind if kind is not None else {r: k for k, r in AUDIO_KINDS.items()}[rate]
        self.call_uuid = call_uuid or uuid.uuid4()

    @property
    def frame_bytes(self) -> int:
        return self.rate * self.frame_ms // 1000 * 2

    def opening(self) -> list[bytes]:
        return [frame(KIND_UUID, self.call_uuid.bytes)]

    def media(self, pcm16: bytes) -> bytes:
        return frame(self.kind, pcm16)

    def dtmf(self, digit: str) -> bytes:
        return frame(KIND_DTMF, digit.encode("ascii"))

    def closing(self) -> list[bytes]:
        return [frame(KIND_HANGUP)]

    def events(self, kind: int, payload: bytes) -> list[ServerEvent]:
        if kind in AUDIO_KINDS:
            return [Audio(payload)]
        return [Control(f"0x{kind:02x}", {"kind": kind, "payload": payload.hex()})]
