"""The native transport: firstline protocol v1 over one websocket.

Thin: parses frames (voice.transports.native.protocol), drives a CallSession, serialises its
events as JSON. Any bad input gets an ``error`` event and the call goes on.
The read loop, limits (idle timeout, stuck readers, drain) and close are
the carriers' (:class:`voice.transports.media_json.WebSocketCall`).

Text-only by default (clients that run their own TTS). With
``options.reply_audio`` the reply is also spoken back, the way the carrier
transports do it (voice/transports/telephony.py): binary frames in the call's own
encoding and rate, a ``response.audio.mark`` after each sentence, and
``response.audio.clear`` on barge-in.
"""

from __future__ import annotations

import logging
from typing import Any

from websockets.asyncio.server import ServerConnection

from streaming.playout import OutFormat
from voice.call.audio_budget import AudioFlood, AudioOverBudget
from voice.call.start import ProtocolError, Start
from voice.server.limits import AUDIO_FLOOD, SLOW_READER
from voice.server.log_format import bind_call, bind_turn
from voice.server.runtime import Runtime
from voice.transports.media_json import WebSocketCall
from voice.transports.native.protocol import Commit, Played, Stop, parse_text
from voice.transports.telephony import CallEnded, TooManyEvents

log = logging.getLogger(__name__)

# Reply audio goes out in 20 ms binary frames, as phone audio does.
OUT_FRAME_S = 0.02


class NativeCall(WebSocketCall):
    transport = "native"
    closed_reason = "client_closed"
    # Clients may confirm played sentences (response.audio.played); the
    # playout clock decides for those that do not.
    echoes_marks = False
    refuse_bad_start = False  # an error event says why; the client may start again
    says_asr_failures = False  # asr_failed is on the wire: the client decides what its caller hears

    # ---- frames in (WebSocketCall's read loop) ----------------------------

    async def on_open(self) -> None:
        bind_call(self.call_id)

    async def on_binary(self, frame: bytes) -> None:
        try:
            await self.session.audio(frame)
        except ProtocolError as exc:
            await self.report_error(exc.code, exc.message)
            if isinstance(exc, AudioFlood):
                self.end_for(AUDIO_FLOOD, exc.message)
            elif not isinstance(exc, AudioOverBudget):  # dropped audio is the budget's business
                self.count_bad_input()

    async def on_text(self, frame: str) -> None:
        try:
            msg = parse_text(frame)
            if not isinstance(msg, Stop):
                self.take_control_event()
            if isinstance(msg, Start):
                await self.on_start(msg)
            elif isinstance(msg, Commit):
                await self.session.commit()
            elif isinstance(msg, Played):
                self.mark_played(msg.name)
            elif isinstance(msg, Stop):
                raise CallEnded("client_stop")
        except ProtocolError as exc:
            # Every bad message gets an error event with its code; the call
            # goes on, up to the call's allowance of them.
            await self.report_error(exc.code, exc.message)
            self.count_bad_input()
        except TooManyEvents as exc:
            await self.report_error(exc.code, str(exc))
            self.count_bad_input()

    async def on_internal_error(self) -> None:
        # The caller gets a clear error and a proper close, not a dropped socket.
        await self.report_error("internal_error", "internal error")

    async def on_ended(self, reason: str) -> None:
        if self.guard is not None and self.guard.end is SLOW_READER:
            return  # nothing more goes to a client that does not read
        await self.send_event({"type": "call.ended", "call_id": self.call_id, "reason": reason})

    async def on_start(self, start: Start) -> None:
        out = None
        if start.reply_audio and not self.session.started:
            out = OutFormat.framed(start.encoding, start.sample_rate, OUT_FRAME_S)
        await self.begin(start, out)

    # ---- session events out ----------------------------------------------

    async def report_error(self, code: str, message: str) -> None:
        """A protocol error: counted by code like the session's own, then sent."""
        await self._on_session_event({"type": "error", "code": code, "message": message})

    async def send_event(self, ev: dict[str, Any]) -> None:
        await self.send_json(ev)

    async def on_session_event(self, ev: dict[str, Any]) -> None:
        # Every session event goes to the client (metrics were fed by the
        # base); the log context's turn id is set here.
        if "turn" in ev:
            bind_turn(ev["turn"])
        if ev.get("type") == "ready":
            ev = {**ev, "reply_audio": self._reply_audio_format()}
        await self.send_event(ev)

    def _reply_audio_format(self) -> dict[str, Any] | None:
        if self.playout is None:
            return None  # text only (asked for, or the voice failed to load: see the log)
        fmt = self.playout.fmt
        return {"encoding": fmt.encoding, "sample_rate": fmt.sample_rate, "frame_bytes": fmt.chunk_bytes}

    async def on_audio_metrics(self, turn: int, metrics: dict[str, float]) -> None:
        await self.send_event({"type": "turn.audio_metrics", "turn": turn, **metrics})

    # ---- playout sink ----------------------------------------------------

    async def send_audio(self, chunk: bytes) -> None:
        await self.send_frame(chunk)

    async def send_mark(self, name: str) -> None:
        # The playout has just recorded the sentence this mark ends.
        assert self.playout is not None
        seg = next(s for s in reversed(self.playout.segments) if s.name == name)
        await self.send_event({"type": "response.audio.mark", "turn": seg.turn, "index": seg.index, "name": name})

    async def send_clear(self) -> None:
        turn = self.playout.current_turn if self.playout is not None else None
        await self.send_event({"type": "response.audio.clear", "turn": turn})


async def handle_native(ws: ServerConnection, runtime: Runtime) -> None:
    """The WS_ROUTES entry point."""
    await NativeCall(ws, runtime).serve()
