"""Per-call audio budget (voice/call/audio_budget.py): a call cannot feed
audio much faster than real time; excess is dropped with an error, and a
call that keeps it up is closed (1008)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import assert_gets_a_call, loopback_alias_works, side_server
from voice.call.audio_budget import AudioBudget, AudioBudgets, AudioFlood, AudioOverBudget, frame_seconds
from voice.server.app import VoiceServer
from voice.server.limits import CallLimits


def test_bucket_refills_at_the_multiple_and_reports_once_per_episode() -> None:
    budget = AudioBudget(multiple=2.0, window_s=1.0)  # holds 2 s of audio, refills 2 s per s
    assert budget.spend(1.0, now=0.0) and budget.spend(1.0, now=0.0)
    with pytest.raises(AudioOverBudget) as first:
        budget.spend(0.5, now=0.0)
    assert first.value.code == "audio_rate_exceeded" and not isinstance(first.value, AudioFlood)
    assert budget.spend(0.5, now=0.0) is False  # same episode: dropped quietly
    assert budget.spend(1.0, now=0.5)  # half a second later: 1 s of audio is back
    with pytest.raises(AudioOverBudget):
        budget.spend(0.5, now=0.5)  # a new episode is reported again
    with pytest.raises(AudioFlood):
        budget.spend(1.0, now=0.5)  # 2 s dropped in all, more than the bucket holds: the end
    assert frame_seconds(320, "pcm16", 8000) == 0.02 and frame_seconds(160, "mulaw", 8000) == 0.02


def test_a_client_held_at_the_limit_is_told_once_not_every_other_frame() -> None:
    """Right at the limit frames are kept and dropped in turn: one episode."""
    budget = AudioBudget(multiple=1.0, window_s=1.0)
    assert budget.spend(1.0, now=0.0)
    errors, t = 0, 0.0
    for _ in range(500):  # 20 ms frames every 10 ms: twice the limit
        t += 0.01
        try:
            budget.spend(0.02, now=t)
        except AudioFlood:
            break
        except AudioOverBudget:
            errors += 1
    assert errors == 1


def test_real_time_audio_never_touches_the_budget() -> None:
    budget = AudioBudget(multiple=1.5, window_s=2.0)
    assert all(budget.spend(0.02, now=i * 0.02) for i in range(5000))  # 100 s at real time


def default_budgets() -> AudioBudgets:
    limits = CallLimits()
    return AudioBudgets([
        AudioBudget(limits.audio_rate_multiple, limits.audio_rate_window_s),
        AudioBudget(limits.audio_rate_sustained_multiple, limits.audio_rate_sustained_window_s),
    ])  # fmt: skip


def test_the_default_budgets_close_an_endless_talker_and_spare_a_line_catching_up() -> None:
    """The defaults (3x over 5 s, 1.5x over 20 s): a line that sends a 15 s
    backlog at once and then real time for five minutes is never touched;
    a talker at 2.7x (just under the burst limit) is told within half a
    minute and closed within a minute."""
    line = default_budgets()
    assert line.spend(15.0, now=0.0)
    assert all(line.spend(0.02, now=1.0 + i * 0.02) for i in range(15000))
    talker, t, told = default_budgets(), 0.0, None
    with pytest.raises(AudioFlood) as closed:
        while t < 120.0:
            try:
                talker.spend(0.02, now=t)
            except AudioFlood:
                raise
            except AudioOverBudget as exc:
                told = told if told is not None else (t, str(exc))
            t += 0.02 / 2.7
    assert told is not None and 20.0 < told[0] < 30.0 and "1.5x real time (over 20 s)" in told[1], told
    assert t < 60.0 and "1.5x" in str(closed.value)


def test_a_browser_sending_128_samples_a_message_in_real_time_is_never_charged_more() -> None:
    """An AudioWorklet sends 128 samples a message (5.3 ms at 24 kHz, 2.7 ms
    at 48 kHz): in real time it is charged real time, so it is neither served
    last nor dropped nor ended (a 10 ms floor per frame charged it 1.9x:
    dropped after 80 s, ended at 160 s). Tiny frames still cost a floor."""
    from streaming.fair_share import IntakeRate

    for rate in (24000, 48000):
        frame_s = 128 / rate
        assert frame_seconds(256, "pcm16", rate) == pytest.approx(frame_s)
        budgets, intake = default_budgets(), IntakeRate()
        frames = round(300 / frame_s)  # five minutes
        assert all(budgets.spend(frame_seconds(256, "pcm16", rate), now=i * frame_s) for i in range(frames))
        assert intake.add(0.0, now=0.0) == 0.0
        for i in range(round(30 / frame_s)):
            speed = intake.add(frame_seconds(256, "pcm16", rate), now=i * frame_s)
        assert speed < 1.1, (rate, speed)
    assert frame_seconds(1, "pcm16", 16000) == 0.0025  # a 1-byte frame is not free


async def test_a_flooding_call_gets_an_error_then_is_closed(server: VoiceServer) -> None:
    limits = server.runtime.config.limits
    saved = limits.audio_rate_multiple, limits.audio_rate_window_s
    limits.audio_rate_multiple, limits.audio_rate_window_s = 2.0, 1.0  # read when a call starts
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/call") as ws:
            await ws.send(json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}))
            assert json.loads(await ws.recv())["type"] == "ready"
            frame = bytes(640)  # 20 ms of silence
            events: list[dict] = []
            try:
                for _ in range(1000):  # 20 s of audio as fast as the socket takes it
                    await ws.send(frame)
                while True:
                    msg = await ws.recv()
                    if isinstance(msg, str):
                        events.append(json.loads(msg))
            except ConnectionClosed:
                pass
            assert ws.close_code == 1008 and ws.close_reason == "audio faster than real time"
    finally:
        limits.audio_rate_multiple, limits.audio_rate_window_s = saved
    errors = [e for e in events if e["type"] == "error"]
    assert errors and errors[0]["code"] == "audio_rate_exceeded" and "2x real time" in errors[0]["message"]
    assert events[-1] == {"type": "call.ended", "call_id": events[-1]["call_id"], "reason": "audio_rate_exceeded"}


@pytest.mark.skipif(not loopback_alias_works(), reason="no 127.0.0.2 on this loopback")
async def test_an_address_whose_call_flooded_is_refused_for_the_cool_down(server: VoiceServer) -> None:
    """Each new call starts with a full budget, so a flooder that simply
    reconnects would get a fresh burst every time: its address is cooled
    down instead (429), while another address still gets in."""
    call_limits = server.runtime.config.limits  # a call's budget is read from the runtime's
    saved = call_limits.audio_rate_multiple, call_limits.audio_rate_window_s
    call_limits.audio_rate_multiple, call_limits.audio_rate_window_s = 2.0, 1.0
    limits = CallLimits(abuse_cooldown_s=30.0)  # the listener's own: its registry cools down
    try:
        await _flood_then_redial(server, limits)
    finally:
        call_limits.audio_rate_multiple, call_limits.audio_rate_window_s = saved


async def _flood_then_redial(server: VoiceServer, limits: CallLimits) -> None:
    async with side_server(server, limits=limits, per_address_exempt=["127.0.0.1/32"]) as srv:
        url = f"ws://127.0.0.1:{srv.port}/v1/call"
        async with connect(url, local_addr=("127.0.0.2", 0)) as ws:
            await ws.send(json.dumps({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}))
            assert json.loads(await ws.recv())["type"] == "ready"
            with contextlib.suppress(ConnectionClosed):
                for _ in range(1000):
                    await ws.send(bytes(640))
                while True:
                    await ws.recv()
            assert ws.close_code == 1008
        async with asyncio.timeout(10):
            while srv.registry.live_calls():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, local_addr=("127.0.0.2", 0))
        assert refused.value.response.status_code == 429
        body = json.loads(refused.value.response.body)
        assert body["reason"] == "abuse_cooldown" and "audio flood" in body["error"]
        assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 30
        await assert_gets_a_call(url)  # another address: unaffected
