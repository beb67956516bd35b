"""The native transport: firstline protocol v1 over one websocket.

Thin: parses frames (voice.protocol), drives a CallSession, serialises its
events as JSON. Any bad input gets an ``error`` event and the call goes on.
Limits (idle timeout, stuck readers, drain) come from a :class:`CallGuard`.

Text-only by default (clients that run their own TTS). With
``options.reply_audio`` the reply is also spoken back, the way the carrier
transports do it (voice/telephony.py): binary frames in the call's own
encoding and rate, a ``response.audio.mark`` after each sentence, and
``response.audio.clear`` on barge-in.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streaming.playout import OutFormat
from voice.limits import CLOSE_INTERNAL, CLOSE_NORMAL, SLOW_READER, CallGuard
from voice.log_format import bind_call, bind_turn
from voice.protocol import Commit, Played, ProtocolError, Start, Stop, parse_text
from voice.runtime import Runtime
from voice.telephony import TelephonyCall

log = logging.getLogger(__name__)

# Reply audio goes out in 20 ms binary frames, as phone audio does.
OUT_FRAME_S = 0.02


class NativeCall(TelephonyCall):
    transport = "native"
    # Clients may confirm played sentences (response.audio.played); the
    # playout clock decides for those that do not.
    echoes_marks = False

    def __init__(self, ws: ServerConnection, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.ws = ws
        self.guard = CallGuard(ws, runtime.config.limits)

    async def serve(self) -> None:
        bind_call(self.call_id)
        self.admit()
        guard = self.guard
        reason = "client_closed"
        try:
            async with guard:
                async for frame in self.ws:
                    guard.touch()
                    try:
                        if isinstance(frame, bytes):
                            await self.session.audio(frame)
                            continue
                        msg = parse_text(frame)
                        if isinstance(msg, Start):
                            await self.on_start(msg)
                        elif isinstance(msg, Commit):
                            await self.session.commit()
                        elif isinstance(msg, Played):
                            self.mark_played(msg.name)
                        elif isinstance(msg, Stop):
                            reason = "client_stop"
                            break
                    except ProtocolError as exc:
                        await self.report_error(exc.code, exc.message)
        except ConnectionClosed:
            reason = "connection_lost"
        except asyncio.CancelledError:
            # The guard ended the call (idle, stuck reader, drain); anything else
            # cancelling this task is a real cancellation and goes on up.
            if not guard.ended_by_guard():
                raise
            assert guard.end is not None
            reason = guard.end.reason
        except Exception:
            # A bug in one call must not take the server down; the caller gets a
            # clear error and a proper close instead of a dropped socket.
            log.exception("call %s failed", self.call_id)
            reason = "internal_error"
            await self.report_error("internal_error", "internal error")
        finally:
            await self.finish(reason)
        if guard.end is SLOW_READER:
            await guard.close(SLOW_READER.code, SLOW_READER.text)
            return
        await self.send_event({"type": "call.ended", "call_id": self.call_id, "reason": reason})
        if guard.end is not None:
            await guard.close(guard.end.code, guard.end.text)
        else:
            await guard.close(CLOSE_NORMAL if reason != "internal_error" else CLOSE_INTERNAL, "")

    async def on_start(self, start: Start) -> None:
        out = None
        if start.reply_audio and not self.session.started:
            sample_bytes = 2 if start.encoding == "pcm16" else 1
            out = OutFormat(start.encoding, start.sample_rate, round(start.sample_rate * OUT_FRAME_S) * sample_bytes)
        await self.begin(start, out)

    # ---- session events out ----------------------------------------------

    async def report_error(self, code: str, message: str) -> None:
        """A protocol error: counted by code like the session's own, then sent."""
        await self._on_session_event({"type": "error", "code": code, "message": message})

    async def send_event(self, ev: dict[str, Any]) -> None:
        await self.guard.send(json.dumps(ev, separators=(",", ":")))

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
        await self.guard.send(chunk)

    async def send_mark(self, name: str) -> None:
        turn, _, index = name[1:].partition("s")  # Playout names sentences t{turn}s{index}
        await self.send_event({"type": "response.audio.mark", "turn": int(turn), "index": int(index), "name": name})

    async def send_clear(self) -> None:
        turn = self.playout.current_turn if self.playout is not None else None
        await self.send_event({"type": "response.audio.clear", "turn": turn})


async def handle_native(ws: ServerConnection, runtime: Runtime) -> None:
    """The WS_ROUTES entry point."""
    await NativeCall(ws, runtime).serve()
