"""One warm server per test session (models load once), real models, real speech."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from benchmarks.corpus import Utterance, asterisk_prompts, shared_clip, through_phone_line
from voice.server.app import VoiceServer
from voice.server.config import ServerConfig

Dial = Callable[[], Awaitable[ClientConnection]]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def server() -> VoiceServer:
    config = ServerConfig(port=0, max_calls=8)
    # Tests send speech up to 4x real time, and short clips as fast as the
    # socket takes them (several clips in a row can exceed the default
    # budget's 15 s burst); the budget itself is tested in test_audio_budget.
    config.limits.audio_rate_multiple = 8.0
    config.limits.audio_rate_sustained_multiple = 0.0  # tested in test_audio_budget too
    srv = VoiceServer(config)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture(scope="session")
def call_url(server: VoiceServer) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/call"


@pytest.fixture(scope="session")
def jfk() -> Utterance:
    return shared_clip("jfk.wav")


@pytest.fixture(scope="session")
def phone_prompts() -> list[Utterance]:
    # One-sentence prompts of 7+ words: one turn each, long enough for a stable WER.
    prompts = [
        p
        for p in asterisk_prompts(min_words=7)
        if len(p.reference.split()) <= 18 and p.reference.rstrip(".!? ").count(".") == 0
    ]
    if not prompts:
        pytest.skip("asterisk-core-sounds-en-wav not installed (apt-get install asterisk-core-sounds-en-wav)")
    return prompts


def menu_that_stops_early() -> np.ndarray:
    """The first 10 s of asterisk/conf-adminmenu-162 through a phone line:
    in the 10 s window tiny.en decodes only its first sentence, in 30 s all
    of it (asr/whisper.py cut_short)."""
    prompt = next(p for p in asterisk_prompts(min_words=1) if p.name == "asterisk/conf-adminmenu-162")
    return through_phone_line(prompt.load(8000))[: 10 * 16000]


def with_silence(audio: np.ndarray, rate: int, seconds: float) -> np.ndarray:
    return np.concatenate([audio, np.zeros(int(rate * seconds), dtype=np.float32)])


@contextlib.asynccontextmanager
async def side_server(main: VoiceServer, **config: object) -> AsyncIterator[VoiceServer]:
    """A second listener with its own settings (auth, limits, admission,
    AudioSocket) on the session's warm models."""
    srv = VoiceServer(ServerConfig(port=0, **config), runtime=main.runtime)  # type: ignore[arg-type]
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


async def refused_once_released(dial: Dial, tries: int = 50) -> InvalidStatus:
    """The refusal a new call (``dial()``) gets once the server has released
    the call it ended. A call's connection is gone
    before its handler releases it (and cools its address down): until then
    the address may still get in, and waiting for live_calls() to reach 0
    raced with that release."""
    for _ in range(tries):
        try:
            ws = await dial()
        except InvalidStatus as refused:
            return refused
        await ws.close()
        await asyncio.sleep(0.1)
    raise AssertionError("no call was refused")


async def assert_gets_a_call(url: str) -> None:
    """A native call from this test's own address starts (ready)."""
    async with connect(url) as ws, asyncio.timeout(10):
        await ws.send(json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}))
        assert json.loads(await ws.recv())["type"] == "ready"


def loopback_alias_works() -> bool:
    """127.0.0.2 is a second source address on this loopback (Linux: yes)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True
