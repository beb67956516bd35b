"""The native transport: firstline protocol v1 over one websocket.

Thin: parses frames (voice.protocol), drives a CallSession, serialises its
events as JSON. Any bad input gets an ``error`` event and the call goes on.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from voice.protocol import Commit, ProtocolError, Start, Stop, parse_text
from voice.runtime import Runtime
from voice.session import CallSession

log = logging.getLogger(__name__)


async def handle_native(ws: ServerConnection, runtime: Runtime) -> None:
    async def emit(ev: dict[str, Any]) -> None:
        await ws.send(json.dumps(ev, separators=(",", ":")))

    session = CallSession(runtime, emit)
    runtime.active_calls += 1
    reason = "client_closed"
    try:
        async for frame in ws:
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
                await ws.send(json.dumps({"type": "error", "code": exc.code, "message": exc.message}))
    except ConnectionClosed:
        reason = "connection_lost"
    except Exception:
        # A bug in one call must not take the server down; the caller gets a
        # clear error and a proper close instead of a dropped socket.
        log.exception("call %s failed", session.call_id)
        reason = "internal_error"
        try:
            await ws.send(json.dumps({"type": "error", "code": "internal_error", "message": "internal error"}))
        except ConnectionClosed:
            pass
    finally:
        await session.stop(reason)
        runtime.active_calls -= 1
    try:
        await ws.send(json.dumps({"type": "call.ended", "call_id": session.call_id, "reason": reason}))
        await ws.close(1000 if reason != "internal_error" else 1011)
    except ConnectionClosed:
        pass
