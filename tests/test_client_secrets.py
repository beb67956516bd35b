"""Client secrets: what a browser page gets instead of the server's token."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from benchmarks.client import NativeCaller
from tests.conftest import side_server
from tests.http_get import http_get, http_json
from voice.server import client_secrets
from voice.server.app import VoiceServer
from voice.server.routes import WS_ROUTES

ROOT = "tok-root-123"


def test_a_secret_is_valid_for_its_time_with_its_root_only() -> None:
    now = 1_800_000_000.0
    secret, expires_at = client_secrets.mint(ROOT, 60, now=now)
    assert expires_at == 1_800_000_060 and secret.startswith(client_secrets.PREFIX)
    assert client_secrets.valid(ROOT, secret, now=now + 59)
    assert not client_secrets.valid(ROOT, secret, now=now + 60)  # expired
    assert not client_secrets.valid("another-root", secret, now=now)
    expiry, nonce, mac = secret[len(client_secrets.PREFIX) :].split(".")
    later = f"{client_secrets.PREFIX}{int(expiry) + 300}.{nonce}.{mac}"
    assert not client_secrets.valid(ROOT, later, now=now)  # a longer life (within the most): the MAC says no
    assert not client_secrets.valid(ROOT, secret[:-1] + ("A" if secret[-1] != "A" else "B"), now=now)
    assert not client_secrets.valid(ROOT, ROOT, now=now) and not client_secrets.valid(ROOT, "", now=now)
    for ttl in (0, 0.5, client_secrets.MAX_TTL_S + 1):
        with pytest.raises(ValueError, match="ttl_s must be between"):
            client_secrets.mint(ROOT, ttl)
    # It rides as a websocket subprotocol: only characters an HTTP token holds.
    assert all(c.isalnum() or c in "._-" for c in secret)
    assert client_secrets.ROUTES <= set(WS_ROUTES)


def test_a_secret_stays_out_of_the_log() -> None:
    """A credential until it expires: websockets' DEBUG log of the upgrade
    names the subprotocols it came in."""
    from voice.server.log_format import REDACTED, ContextFilter

    secret, _ = client_secrets.mint(ROOT)
    record = logging.LogRecord("websockets.server", logging.DEBUG, __file__, 1,
                               "< Sec-WebSocket-Protocol: firstline, firstline-token.%s", (secret,), None)  # fmt: skip
    assert ContextFilter([ROOT]).filter(record)
    assert record.getMessage() == f"< Sec-WebSocket-Protocol: firstline, firstline-token.{REDACTED}"


async def test_a_backend_mints_a_secret_that_opens_a_browser_call_and_nothing_else(server: VoiceServer) -> None:
    async with side_server(server, auth_token=ROOT) as srv:
        port = srv.port
        # Only the server's token, in the Authorization header, mints one.
        assert (await http_json(port, client_secrets.PATH))[0] == 401
        assert (await http_json(port, client_secrets.PATH + f"?token={ROOT}"))[0] == 401
        backend = {"Authorization": f"Bearer {ROOT}"}
        status, minted = await http_json(port, client_secrets.PATH, headers=backend)
        assert status == 200 and minted["routes"] == ["/v1/call", "/v1/realtime"], minted
        secret = minted["value"]
        assert time.time() + 50 < minted["expires_at"] <= time.time() + 61
        status, headers, _ = await http_get(port, client_secrets.PATH, headers=backend)
        assert headers["cache-control"] == "no-store"
        bad_ttl = await http_json(port, client_secrets.PATH + "?ttl_s=9999", headers=backend)
        assert bad_ttl[0] == 400 and "ttl_s" in bad_ttl[1]["error"]
        # A secret mints no more.
        assert (await http_json(port, client_secrets.PATH, headers={"Authorization": f"Bearer {secret}"}))[0] == 401
        # It opens the native call (as the call page sends it: a subprotocol) ...
        url = f"ws://127.0.0.1:{port}/v1/call"
        async with connect(url, subprotocols=["firstline", f"firstline-token.{secret}"]) as ws:
            await ws.send('{"type": "start"}')
            assert '"ready"' in str(await asyncio.wait_for(ws.recv(), 10))
        # ... and the Realtime endpoint (as OpenAI's browser clients send it).
        realtime = f"ws://127.0.0.1:{port}/v1/realtime?model=x"
        async with connect(realtime, subprotocols=["realtime", f"openai-insecure-api-key.{secret}"]) as ws:
            assert '"session.created"' in str(await asyncio.wait_for(ws.recv(), 10))
        # Not a carrier's route.
        status, _ = await http_json(port, "/twilio", upgrade=True, headers={"Authorization": f"Bearer {secret}"})
        assert status == 401
        # Nor once expired, nor one minted with another server's token.
        stale, _ = client_secrets.mint(ROOT, 1, now=time.time() - 5)
        foreign, _ = client_secrets.mint("another-root", 60)
        for token in (stale, foreign):
            with pytest.raises(InvalidStatus) as refused:
                async with NativeCaller(url, token=token):
                    pass
            assert refused.value.response.status_code == 401
    async with side_server(server) as open_server:  # no --auth-token: nothing to mint
        assert (await http_json(open_server.port, client_secrets.PATH))[0] == 404


def test_a_secret_does_not_let_its_holder_test_guesses_of_the_server_token_cheaply() -> None:
    """A page user holds a secret and its payload in the clear. With the
    server token as the HMAC key, each guess of the token cost one HMAC
    (billions a second on a GPU); the key is derived with scrypt, so a
    plain HMAC with the right token does not even match."""
    import base64
    import hashlib
    import hmac

    from voice.server.client_secrets import _CONTEXT, PREFIX

    root = "root-token-of-the-server"
    value, _ = client_secrets.mint(root)
    payload, mac = value.removeprefix(PREFIX).rsplit(".", 1)
    plain = hmac.new(root.encode(), _CONTEXT + payload.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(plain).decode().rstrip("=") != mac
    assert client_secrets.valid(root, value) and not client_secrets.valid(root + "x", value)
