"""The Whisper decoder in a child process of its own (asr/lanes.py): the same
words as the in-process decoder, and a decoder that dies costs nothing but
a second decode of the final it was running (a final whose decoder dies
twice fails alone), not the server: real model, real speech, a real SIGKILL."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import numpy as np
import pytest
import pytest_asyncio

from asr.config import ASRConfig
from asr.lanes import DecoderCrashed, DecoderDied, ProcessLane
from asr.wer import word_error_rate
from asr.whisper import WhisperDecoder
from asr.worker import ASRWorker
from benchmarks.client import NativeCaller
from tests.conftest import with_silence
from tests.transport_checks import by_name


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def process_worker():
    worker = ASRWorker(ASRConfig(decoder_process=True, threads=1))
    await worker.start()
    yield worker
    await worker.close()


async def test_a_decoder_process_hears_what_a_decoder_in_this_process_hears(process_worker, jfk):
    audio = jfk.load(16000)
    assert process_worker.decoder is None, "the model must live in the child, not in this process"
    lane = process_worker.lane
    assert isinstance(lane, ProcessLane) and lane.pid not in (None, os.getpid())
    in_child = await process_worker.submit("lanes-a", audio, final=True)
    here = await asyncio.to_thread(lambda: WhisperDecoder(ASRConfig(threads=1, decoder_process=False)).decode(audio))
    assert in_child.text == here.text, (in_child.text, here.text)
    assert word_error_rate(jfk.reference, in_child.text) <= 0.15, in_child.text


async def test_a_final_whose_decoder_process_is_killed_is_decoded_again(process_worker, jfk):
    audio = jfk.load(16000)
    lane = process_worker.lane
    assert isinstance(lane, ProcessLane)
    dead, restarts, retries = lane.pid, lane.restarts, process_worker.crash_retries
    decoding = process_worker.submit("lanes-killed", audio, final=True)
    await asyncio.sleep(0.02)  # handed to the child (its decode takes ~80 ms)
    os.kill(dead, signal.SIGKILL)
    # The caller's final is not lost: it waits for the new child and is decoded there.
    again = await asyncio.wait_for(decoding, timeout=60)
    assert word_error_rate(jfk.reference, again.text) <= 0.15, again.text
    assert process_worker.crash_retries == retries + 1
    assert lane.restarts == restarts + 1 and lane.pid not in (None, dead)


async def test_a_final_whose_decoder_process_dies_twice_fails_alone(process_worker, jfk, monkeypatch):
    """Audio that kills every child it meets must not kill them forever: the
    second death fails that decode (the turn gets asr_failed), and the next
    decode is served by a third child. The first new child is killed as
    soon as it has started, standing in for audio that crashes the decoder."""
    audio = jfk.load(16000)
    lane = process_worker.lane
    assert isinstance(lane, ProcessLane)
    restarts, retries = lane.restarts, process_worker.crash_retries
    start = lane.start
    doomed: list[int] = []

    async def start_then_die(timeout_s: float | None = None) -> None:
        await start(timeout_s)
        if not doomed and lane.pid is not None:
            doomed.append(lane.pid)
            os.kill(lane.pid, signal.SIGKILL)

    monkeypatch.setattr(lane, "start", start_then_die)
    decoding = process_worker.submit("lanes-poison", audio, final=True)
    await asyncio.sleep(0.02)
    assert lane.pid is not None
    os.kill(lane.pid, signal.SIGKILL)
    with pytest.raises(DecoderDied, match="died during this decode"):
        await asyncio.wait_for(decoding, timeout=60)
    assert doomed and process_worker.crash_retries == retries + 1
    after = await asyncio.wait_for(process_worker.submit("lanes-next", audio, final=True), timeout=60)
    assert word_error_rate(jfk.reference, after.text) <= 0.15, after.text
    assert lane.restarts == restarts + 2 and lane.pid not in (None, *doomed)


async def test_a_call_outlives_its_decoder_process(server, call_url, monkeypatch):
    """Server level: the child dies under a call. That turn waits for the new
    child and is answered, and so is the call's next turn."""
    worker = ASRWorker(ASRConfig(decoder_process=True, threads=1), server.runtime.low_priority)
    worker.on_decoder_restart = server.runtime.asr.on_decoder_restart  # the server's metrics, as wired at startup
    registry = server.runtime.metrics.registry
    counted = registry.get_sample_value("firstline_asr_decoder_restarts_total") or 0.0
    await worker.start()
    monkeypatch.setattr(server.runtime, "asr", worker)  # calls placed from here on decode in the child
    try:
        first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000, options={"partials": False})
            lane = worker.lane
            assert isinstance(lane, ProcessLane) and lane.pid is not None
            os.kill(lane.pid, signal.SIGKILL)
            for turn, clip in enumerate((first, second), start=1):
                await caller.play(with_silence(clip.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=4.0)
                final = await caller.wait_for("transcript.final", timeout=60, turn=turn)
                assert word_error_rate(clip.reference, final["text"]) <= 0.5, (clip.reference, final["text"])
                done = await caller.wait_for("response.done", timeout=60, turn=final["turn"])
                assert done["text"] and not done["cancelled"]
            assert not caller.result.of("error"), caller.result.of("error")
            assert worker.crash_retries >= 1
            assert lane.restarts == 1
            assert registry.get_sample_value("firstline_asr_decoder_restarts_total") == counted + 1
    finally:
        await worker.close()


async def test_a_bad_input_fails_in_the_child_with_its_own_error(process_worker, jfk):
    """A malformed array is refused by the decoder in the child; the error
    that comes back is the decoder's, the child lives on, and the next
    decode is served."""
    lane = process_worker.lane
    assert isinstance(lane, ProcessLane)
    pid, restarts = lane.pid, lane.restarts
    with pytest.raises(ValueError, match="expected mono audio"):
        await lane.decode(np.zeros((16000, 2), dtype=np.float32))
    after = await lane.decode(jfk.load(16000))
    assert word_error_rate(jfk.reference, after.text) <= 0.15, after.text
    assert lane.pid == pid and lane.restarts == restarts


async def test_a_hung_decode_is_killed_and_the_lane_comes_back(jfk):
    """A decode that runs past the lane's limit is taken for hung: its child
    is killed, that decode fails with a clear error, a new child serves the
    next one. (The limit is set below one real decode to stand in for a hang.)"""
    audio = jfk.load(16000)
    lane = ProcessLane(ASRConfig(threads=1, decode_timeout_s=0.02), "asr", 0)
    await lane.start()
    try:
        first = lane.pid
        with pytest.raises(DecoderCrashed, match=r"took longer than 0\.02 s"):
            await lane.decode(audio)
        lane.timeout_s = 60.0
        after = await lane.decode(audio)
        assert word_error_rate(jfk.reference, after.text) <= 0.15, after.text
        assert lane.restarts == 1 and lane.pid not in (None, first)
        # A new child whose load hangs too (the limit set below one real
        # load to stand in for it) is killed: decodes fail with a clear
        # error instead of waiting on the load for ever, and the next one
        # tries again.
        lane.config = dataclasses.replace(lane.config, decoder_restart_timeout_s=0.05)
        lane.timeout_s = 0.02
        with pytest.raises(DecoderCrashed, match="took longer"):
            await lane.decode(audio)
        with pytest.raises(DecoderCrashed, match="could not be started again"):
            async with asyncio.timeout(30):
                await lane.decode(audio)
        lane.config = dataclasses.replace(lane.config, decoder_restart_timeout_s=120.0)
        lane.timeout_s = 60.0
        again = await lane.decode(audio)
        assert word_error_rate(jfk.reference, again.text) <= 0.15, again.text
    finally:
        lane.close()


def test_a_decoder_process_does_not_outlive_a_killed_server():
    """A server killed outright (SIGKILL: no shutdown runs) leaves no decoder
    child behind: the child sees it was reparented and exits, instead of
    holding its model for every restart of the server."""
    import subprocess
    import sys
    import time

    script = (
        "import asyncio, os, signal\n"
        "from asr.config import ASRConfig\n"
        "from asr.lanes import ProcessLane\n"
        "async def main():\n"
        "    lane = ProcessLane(ASRConfig(threads=1), 'asr-test', 0)\n"
        "    await lane.start()\n"
        "    print(lane.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    server = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert server.returncode == -signal.SIGKILL, server.stderr[-2000:]
    child = int(server.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail(f"decoder child {child} still running 10 s after its server was killed")
