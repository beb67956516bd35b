"""The native transport: firstline protocol v1 over one websocket.

Thin: parses frames (voice.protocol), drives a CallSession, serialises its
events as JSON. Any bad input gets an ``error`` event and the call goes on.
Limits (idle timeout, stuck readers, drain) come from a :class:`CallGuard`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from voice.limits import CLOSE_INTERNAL, CLOSE_NORMAL, SLOW_READER, CallGuard
from voice.log_format import bind_call, bind_turn
from voice.protocol import Commit, ProtocolError, Start, Stop, parse_text
from voice.runtime import Runtime
from voice.session import CallSession

log = logging.getLogger(__name__)


async def handle_native(ws: ServerConnection, runtime: Runtime) -> None:
    guard = CallGuard(ws, runtime.config.limits)

    async def emit(ev: dict[str, Any]) -> None:
        # The one place every event of a native call passes: metrics and the
        # log context's turn id are fed here, not inside the session.
        if "turn" in ev:
            bind_turn(ev["turn"])
        runtime.metrics.observe_event(ev)
        await guard.send(json.dumps(ev, separators=(",", ":")))

    session = CallSession(runtime, emit)
    bind_call(session.call_id)
    runtime.active_calls += 1
    reason = "client_closed"
    try:
        async with guard:
            async for frame in ws:
                guard.touch()
                try:
                    if isinstance(frame, bytes):
                        await session.audio(frame)
                        continue
                    msg = parse_text(frame)
                    if isinstance(msg, Start):
                        await session.start(msg)
                    elif isinstance(msg, Commit):
                        await session.commit()
                    elif isinstance(msg, Stop):
                        reason = "client_stop"
                        break
                except ProtocolError as exc:
                    await emit({"type": "error", "code": exc.code, "message": exc.message})
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
        log.exception("call %s failed", session.call_id)
        reason = "internal_error"
        await emit({"type": "error", "code": "internal_error", "message": "internal error"})
    finally:
        await session.stop(reason)
        runtime.active_calls -= 1
        runtime.metrics.call_ended(reason)
    if guard.end is SLOW_READER:
        await guard.close(SLOW_READER.code, SLOW_READER.text)
        return
    await guard.send(json.dumps({"type": "call.ended", "call_id": session.call_id, "reason": reason}))
    if guard.end is not None:
        await guard.close(guard.end.code, guard.end.text)
    else:
        await guard.close(CLOSE_NORMAL if reason != "internal_error" else CLOSE_INTERNAL, "")
