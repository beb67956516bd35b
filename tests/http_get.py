"""A minimal asyncio HTTP/1.1 GET for the server's plain endpoints and for
upgrade attempts (a refused upgrade is an ordinary HTTP response)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, upgrade: bool = False
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = dict(headers or {})
    host = headers.pop("Host", f"127.0.0.1:{port}")  # a test may name another host
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines[2] = "Connection: Upgrade"
        lines += ["Upgrade: websocket", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    parsed = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            parsed[k.strip().lower()] = v.strip()
    body = b""
    if status != 101:
        length = parsed.get("content-length")
        body = await reader.readexactly(int(length)) if length is not None else await reader.read()
    writer.close()
    return status, parsed, body


async def http_json(port: int, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = await http_get(port, path, **kwargs)
    return status, json.loads(body) if body else {}
