"""The ``input_audio_buffer.*`` family: the caller's audio in, and the
client's own end of turn (push-to-talk) or a cleared buffer."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from voice.call.start import MAX_AUDIO_FRAME
from voice.transports.media_json import b64decode
from voice.transports.realtime.protocol import RealtimeError

if TYPE_CHECKING:
    from voice.transports.realtime.call import RealtimeCall


async def append(call: RealtimeCall, msg: dict[str, Any]) -> None:
    audio = b64decode(msg.get("audio"), "audio")
    await call.ensure_started()
    # One append may hold seconds of audio: fed in frames the session accepts.
    step = MAX_AUDIO_FRAME // 2 - (MAX_AUDIO_FRAME // 2) % 2
    message_s = call.input_seconds(len(audio))
    for offset in range(0, len(audio), step):
        if offset:
            # Other calls run between frames: an append of 15 s of audio is
            # twenty frames of VAD work, which held the shared loop at once.
            await asyncio.sleep(0)
        await call.audio(audio[offset : offset + step], message_s)


async def commit(call: RealtimeCall, msg: dict[str, Any]) -> None:
    item_id = call.next_user_item
    if not call.session.started or not await call.session.commit():
        raise RealtimeError("buffer has no speech to commit", "input_audio_buffer_commit_empty", "input_audio_buffer")
    call.input_committed(item_id)


async def clear(call: RealtimeCall, msg: dict[str, Any]) -> None:
    await call.session.clear_input()
    call.input_cleared()
    await call.send_event("input_audio_buffer.cleared")


HANDLERS = {
    "input_audio_buffer.append": append,
    "input_audio_buffer.commit": commit,
    "input_audio_buffer.clear": clear,
}
