"""The websocket server: HTTP health endpoints, call admission, routing.

Routes: ``/v1/call`` (native protocol). ``/healthz`` answers 200 while the
process runs; ``/readyz`` answers 200 only once the models are warm.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import signal
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from voice.config import ServerConfig
from voice.native import handle_native
from voice.runtime import Runtime

log = logging.getLogger(__name__)

NATIVE_PATH = "/v1/call"

CallHandler = Callable[[ServerConnection, Runtime], Awaitable[None]]

# Websocket routes: path -> transport. Each transport is a thin adapter that
# turns its wire protocol into CallSession calls (see voice/native.py).
WS_ROUTES: dict[str, CallHandler] = {NATIVE_PATH: handle_native}
# websockets' own hard cap; the protocol enforces tighter per-frame limits
# and answers with an error event instead of dropping the connection.
WS_MAX_SIZE = 1 << 20


def _json_response(status: http.HTTPStatus, body: dict[str, object]) -> Response:
    response = Response(status.value, status.phrase, Headers())
    response.headers["Content-Type"] = "application/json"
    response.body = json.dumps(body).encode()
    return response


class VoiceServer:
    def __init__(self, config: ServerConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.runtime = runtime or Runtime(config)
        self._server: Server | None = None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _json_response(http.HTTPStatus.OK, {"status": "ok"})
        if path == "/readyz":
            status = http.HTTPStatus.OK if self.runtime.ready else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _json_response(status, {"ready": self.runtime.ready, "startup_s": self.runtime.startup_s})
        if path not in WS_ROUTES:
            return _json_response(http.HTTPStatus.NOT_FOUND, {"error": f"no route {path}; calls go to {NATIVE_PATH}"})
        if not self.runtime.ready:
            return _json_response(http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": "warming up"})
        if self.runtime.active_calls >= self.config.max_calls:
            return _json_response(
                http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"at capacity ({self.config.max_calls} calls)"}
            )
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        await WS_ROUTES[ws.request.path.split("?", 1)[0]](ws, self.runtime)

    async def start(self) -> None:
        self._server = await serve(
            self._handler,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=WS_MAX_SIZE,
            # Audio must not queue behind a slow reader for long; small
            # buffers make backpressure visible instead of growing memory.
            write_limit=256 * 1024,
            compression=None,  # audio does not compress; deflate only adds latency
        )
        await self.runtime.start()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.runtime.close()

    async def serve_forever(self) -> None:
        await self.start()
        log.info("firstline listening on ws://%s:%d%s", self.config.host, self.port, NATIVE_PATH)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.close()
