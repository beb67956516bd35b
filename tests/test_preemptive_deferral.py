"""A preemptive reply starts shortly before its pause's endpoint window ends,
not at the pause decode (asr/config.py preemptive_lead_s,
voice/call/turn.py Turn._defer_reply): at a pause the caller talks on
through, no LLM generation is started and thrown away.

Real server, real speech, sent in real time (the deferral is wall-clock
time: this is one of the tests where timing is the point)."""

from __future__ import annotations

import numpy as np

PAUSE_S = 0.7  # inside the window minus the lead (1.5 - 0.5 s): the caller goes on
WINDOW_MS = 1500  # a fixed window, asked for by the client


async def _call_with_a_pause(server, phone_prompts) -> tuple[list[str], dict]:
    """One call: a prompt, a 0.7 s pause, another prompt, then silence.
    Returns the reply requests the engine got for it, and the answered
    turn's metrics."""
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    engine = server.runtime.engine
    started: list[str] = []
    stream = engine.stream

    def counting(request):  # the real engine; only the request ids are noted
        if not request.request_id.startswith("prefill"):
            started.append(request.request_id)
        return stream(request)

    engine.stream = counting
    try:
        first = phone_prompts[0].load(8000)
        second = phone_prompts[1].load(8000)
        audio = np.concatenate([with_silence(first, 8000, PAUSE_S), with_silence(second, 8000, 3.0)])
        async with NativeCaller(f"ws://127.0.0.1:{server.port}/v1/call") as caller:
            await caller.start("mulaw", 8000, options={"endpoint_silence_ms": WINDOW_MS})
            await caller.play(audio, 8000, "mulaw", realtime=True)
            done = await caller.wait_for("response.done", timeout=60)
            metrics = await caller.wait_for("turn.metrics", timeout=10)
    finally:
        del engine.stream  # the instance attribute goes; the class's method is back
    assert not done["cancelled"] and done["text"]
    return started, metrics


async def test_a_pause_the_caller_talks_through_starts_no_reply(server, phone_prompts, monkeypatch) -> None:
    # At the pause decode (lead 0, the old way): the pause's preemptive reply
    # starts, and is thrown away when the caller goes on.
    monkeypatch.setattr(server.runtime.config.asr, "preemptive_lead_s", 0.0)
    at_pause, metrics = await _call_with_a_pause(server, phone_prompts)
    assert len(at_pause) >= 2, at_pause
    assert metrics["deferred_ms"] == 0
    # Deferred (the default): only the answered turn's reply is generated,
    # and it waited for most of its window before starting.
    monkeypatch.setattr(server.runtime.config.asr, "preemptive_lead_s", 0.5)
    deferred, metrics = await _call_with_a_pause(server, phone_prompts)
    assert len(deferred) == 1, deferred
    assert metrics["preemptive"] and metrics["deferred_ms"] >= 300
