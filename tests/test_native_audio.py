"""Reply audio on the native protocol (``options.reply_audio``): binary
frames in the call's encoding, a mark after each sentence, a clear on
barge-in; text-only stays the default. Real speech in, the real voice out,
and the audio that comes back is transcribed."""

from __future__ import annotations

import asyncio
import time

import pytest

from asr.wer import word_error_rate
from benchmarks.client import NativeCaller
from streaming.codecs import StreamResampler, decode, int16_to_float
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher
from tests.transport_checks import STORY, asr_text, by_name
from voice.server.app import VoiceServer


def to16k(data: bytes, encoding: str, rate: int):
    pcm = decode(data, encoding)  # type: ignore[arg-type]
    return StreamResampler(rate, 16000).process(int16_to_float(pcm), last=True)


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("encoding", "rate", "frame_bytes"), [("mulaw", 8000, 160), ("pcm16", 16000, 640)])
async def test_native_reply_audio_speaks_the_first_sentence(
    server: VoiceServer, call_url: str, encoding: str, rate: int, frame_bytes: int
) -> None:
    clip = by_name("all-circuits-busy-now")  # one phrase: one turn, even sent 4x faster than real time
    async with NativeCaller(call_url) as caller:
        ready = await caller.start(encoding, rate, options={"reply_audio": True})
        assert ready["reply_audio"] == {"encoding": encoding, "sample_rate": rate, "frame_bytes": frame_bytes}
        await caller.play(with_silence(clip.load(rate), rate, 1.5), rate, encoding, realtime=True, speed=4.0)
        done = await caller.wait_for("response.done", timeout=90)
        sentences = [e for e in caller.result.of("response.sentence") if e["turn"] == done["turn"]]
        assert sentences
        # Every sentence's audio is followed by its mark.
        await wait_until(lambda: len(caller.result.mark_offsets) >= len(sentences), 60, "one mark per sentence")
        marks = [m for m in caller.result.of("response.audio.mark") if m["turn"] == done["turn"]]
        assert [(m["turn"], m["index"]) for m in marks] == [(s["turn"], s["index"]) for s in sentences]
        metrics = await caller.wait_for("turn.audio_metrics", timeout=10, turn=done["turn"])
        assert metrics["ttfa_ms"] >= metrics["tts_first_audio_ms"] > 0, metrics
        await caller.send_json({"type": "stop"})
        await caller.wait_for("call.ended", timeout=10)
    frames = caller.result.audio_frames
    assert frames and all(len(f) == frame_bytes for _, f in frames), {len(f) for _, f in frames}
    # The audio before the first mark is the first sentence (the turn before
    # it, if any, ended with its own mark).
    offsets = sorted(caller.result.mark_offsets.values())
    first_cut = caller.result.mark_offsets[marks[0]["name"]]
    start = max([0, *(o for o in offsets if o < first_cut)])
    heard = await asr_text(server, to16k(caller.result.reply_audio()[start:first_cut], encoding, rate))
    assert word_error_rate(sentences[0]["text"], heard) <= 0.4, (sentences[0]["text"], heard)


async def test_native_is_text_only_by_default(call_url: str, phone_prompts) -> None:
    clip = phone_prompts[5]
    async with NativeCaller(call_url) as caller:
        ready = await caller.start("mulaw", 8000)
        assert ready["reply_audio"] is None
        await caller.play(with_silence(clip.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=4.0)
        await caller.wait_for("response.done", timeout=60)
        await caller.send_json({"type": "stop"})
        await caller.wait_for("call.ended", timeout=10)
    assert caller.result.audio_frames == []
    assert caller.result.of("response.audio.mark") == []


async def test_native_barge_in_clears_and_history_keeps_what_was_played(server: VoiceServer, call_url: str) -> None:
    """The caller confirms the first sentence played, then talks over the
    rest: the server sends response.audio.clear, and the turn's history holds
    the played sentences only."""
    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("pcm16", 16000, system_prompt=STORY, options={"reply_audio": True, "max_tokens": 400})
            call = await watcher.one()
            await caller.play(with_silence(first.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            mark = await caller.wait_for("response.audio.mark", timeout=60)
            await caller.send_json({"type": "response.audio.played", "name": mark["name"]})
            await caller.wait_for("response.sentence", timeout=30, turn=mark["turn"], index=1)
            # Past the resume grace: this is a new turn cutting the reply off,
            # not the caller finishing the last one (that case is below).
            await asyncio.sleep(server.runtime.config.asr.resume_grace_s + 0.2)
            await caller.play(with_silence(second.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            clear = await caller.wait_for("response.audio.clear", timeout=20)
            assert clear["turn"] == mark["turn"]
            await caller.wait_for("response.done", timeout=30, turn=mark["turn"])
            await caller.wait_for("transcript.final", timeout=30, turn=mark["turn"] + 1)
            sentences = [e["text"] for e in caller.result.of("response.sentence") if e["turn"] == mark["turn"]]
            reply = call.session.history.replies.get(mark["turn"])
            heard = reply["content"] if reply is not None else ""
            assert heard and len(sentences) >= 2
            assert heard != " ".join(sentences), "history kept sentences the caller never heard"
            assert " ".join(sentences).startswith(heard)
            await caller.send_json({"type": "stop"})
            await caller.wait_for("call.ended", timeout=20)


async def test_a_caller_who_resumes_right_after_the_reply_began_is_one_turn(server: VoiceServer, call_url: str) -> None:
    """The caller pauses, the reply starts, and they go on talking at once
    (within resume_grace_s): the reply stops (clear), the server says the
    turn was resumed, the history drops it, and the next turn's transcript
    and prompt hold both halves, answered once. The server counts the taken-back
    reply's LLM work as premature, not as an answer (/metrics)."""
    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
    registry = server.runtime.metrics.registry

    def llm(purpose: str, what: str = "requests") -> float:
        if what == "requests":
            return registry.get_sample_value("firstline_llm_requests_total", {"purpose": purpose}) or 0.0
        return registry.get_sample_value("firstline_llm_tokens_total", {"purpose": purpose, "kind": what}) or 0.0

    before = {p: (llm(p), llm(p, "generated")) for p in ("premature", "answered")}
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("pcm16", 16000, system_prompt=STORY, options={"reply_audio": True, "max_tokens": 400})
            call = await watcher.one()
            await caller.play(with_silence(first.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            sentence = await caller.wait_for("response.sentence", timeout=60)
            turn = sentence["turn"]
            await caller.play(with_silence(second.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            resumed = await caller.wait_for("turn.resumed", timeout=20)
            assert resumed["turn"] == turn
            await caller.wait_for("response.audio.clear", timeout=20, turn=turn)
            final = await caller.wait_for("transcript.final", timeout=30, turn=turn + 1)
            both = f"{first.reference} {second.reference}"
            assert word_error_rate(both, final["text"]) <= 0.4, (both, final["text"])
            await caller.wait_for("response.done", timeout=60, turn=turn + 1)
            history = call.session.history
            assert turn not in history.asked and turn not in history.replies
            users = [m["content"] for m in history.messages_so_far if m["role"] == "user"]
            assert users == [final["text"]], users  # one user turn, both halves
            await caller.send_json({"type": "stop"})
            await caller.wait_for("call.ended", timeout=20)
    # The reply taken back generated at least its first sentence; the answer to
    # both halves is counted once as answered.
    assert llm("premature") == before["premature"][0] + 1
    assert llm("premature", "generated") > before["premature"][1]
    assert llm("answered") >= before["answered"][0] + 1
    assert llm("answered", "generated") > before["answered"][1]


async def test_a_reply_waits_out_the_resume_grace_before_its_second_sentence(
    server: VoiceServer, call_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its first sentence out, a reply generates nothing more until its
    caller has had the resume grace to go on: a caller who resumes then
    leaves a reply of one sentence, and the tokens it generated are only
    about that sentence's (/metrics, premature). Without the hold
    (--no-hold-for-resume) the same call goes on generating at once."""
    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
    registry = server.runtime.metrics.registry

    def premature_generated() -> float:
        labels = {"purpose": "premature", "kind": "generated"}
        return registry.get_sample_value("firstline_llm_tokens_total", labels) or 0.0

    async def resumed_reply(url: str) -> tuple[list[str], float]:
        before = premature_generated()
        async with NativeCaller(url) as caller:
            # A grace of 1.5 s, not the default 1 s: the caller goes on ~1.1 s
            # after the first sentence (the sleep below, VAD onset, a loaded
            # loop), and a resume past the grace is a new turn, not this test.
            # The hold is the grace or the sentence's pacing, whichever ends
            # first: a longer grace does not let the reply run on.
            options = {"max_tokens": 400, "resume_grace_ms": 1500}
            await caller.start("pcm16", 16000, system_prompt=STORY, options=options)
            await caller.play(with_silence(first.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            sentence = await caller.wait_for("response.sentence", timeout=60)
            turn = sentence["turn"]
            # The caller goes on once the reply could have had its second
            # sentence (~0.4 s of tokens here), still within the grace.
            await asyncio.sleep(0.6)
            await caller.play(with_silence(second.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            await caller.wait_for("turn.resumed", timeout=20, turn=turn)
            await caller.wait_for("response.done", timeout=60, turn=turn + 1)
            said = [e["text"] for e in caller.result.of("response.sentence") if e["turn"] == turn]
            await caller.send_json({"type": "stop"})
            await caller.wait_for("call.ended", timeout=20)
        return said, premature_generated() - before

    held, held_tokens = await resumed_reply(call_url)
    assert len(held[0].split()) >= 6, "the first sentence is too short to be held"
    assert held == held[:1], held  # nothing past the first sentence
    assert 0 < held_tokens <= 2 * len(held[0].split()) + 8, (held, held_tokens)
    monkeypatch.setattr(server.runtime.config, "hold_for_resume", False)  # as --no-hold-for-resume
    unheld, unheld_tokens = await resumed_reply(call_url)
    assert unheld_tokens > held_tokens, (unheld, unheld_tokens, held, held_tokens)


async def test_native_bad_audio_options_get_errors_and_the_call_goes_on(call_url: str, phone_prompts) -> None:
    clip = phone_prompts[6]
    async with NativeCaller(call_url) as caller:
        await caller.send_json({"type": "start", "options": {"reply_audio": "yes"}})
        error = await caller.wait_for("error", timeout=10)
        assert error["code"] == "invalid_message" and "reply_audio" in error["message"]
        await caller.send_json({"type": "response.audio.played"})
        await wait_until(lambda: len(caller.result.of("error")) >= 2, 10, "the second error")
        assert "name" in caller.result.of("error")[1]["message"]
        await caller.start("mulaw", 8000, options={"reply_audio": True})
        await caller.send_json({"type": "response.audio.played", "name": "t9s9"})  # not ours: ignored
        await caller.play(with_silence(clip.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=4.0)
        await caller.wait_for("response.audio.mark", timeout=60)
        await caller.send_json({"type": "stop"})
        await caller.wait_for("call.ended", timeout=10)


async def test_a_reply_cancelled_while_its_commit_flushes_still_ends(server: VoiceServer, call_url: str) -> None:
    """A preemptive reply written before the endpoint waits to be committed;
    the commit then sends what it held, and a cancel in that moment (a
    client's cancel while a send waits on a slow socket; here, during the
    transcript's send) escaped the turn: no response.done, no metrics, and
    the caller's words in neither the history nor the next turn."""
    clip = by_name("conf-now-recording")
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("pcm16", 16000, options={"endpoint_silence_ms": 4000})
            call = await watcher.one()
            emit, cancelled = call.session.emit, []

            async def cancel_mid_flush(ev: dict) -> None:
                turn = call.session._active
                if ev["type"] == "transcript.final" and turn is not None and not turn.committed:
                    assert turn.times.endpoint is not None and turn.task is not None
                    cancelled.append(turn.outcome_given)  # False: the reply waits at its commit
                    call.session.cancel_reply()
                await emit(ev)

            call.session.emit = cancel_mid_flush
            await caller.play(with_silence(clip.load(16000), 16000, 5.0), 16000, "pcm16", realtime=True, speed=2.0)
            done = await caller.wait_for("response.done", timeout=60)
            metrics = await caller.wait_for("turn.metrics", timeout=30, turn=done["turn"])
            assert cancelled == [False], "the reply was not waiting at its commit: nothing tested"
            assert done["cancelled"] and metrics["preemptive"], (done, metrics)
            assert call.session.history.asked.get(done["turn"]), call.session.history.asked


async def test_a_resumed_turn_whose_reply_ends_meanwhile_is_still_one_turn(server: VoiceServer, call_url: str) -> None:
    """The caller resumes within the grace; while turn.resumed goes out (a
    send that waits), the reply ends by itself. Its outcome is premature
    but not cancelled, and the history kept the first half's turn, though
    the client was told it was resumed (a Realtime client deleted it): the
    next turn then had only the second half's words."""
    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("pcm16", 16000)
            call = await watcher.one()
            emit = call.session.emit
            ended_meanwhile: list[bool] = []

            async def slow_resumed(ev: dict) -> None:
                if ev["type"] == "turn.resumed":
                    active = call.session._active
                    async with asyncio.timeout(30):  # the reply ends while this send waits
                        while active is not None and not active.outcome_given:  # noqa: ASYNC110
                            await asyncio.sleep(0.02)
                    ended_meanwhile.append(active is not None and active.outcome_given)
                await emit(ev)

            call.session.emit = slow_resumed
            await caller.play(with_silence(first.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            sentence = await caller.wait_for("response.sentence", timeout=60)
            turn = sentence["turn"]
            await caller.play(with_silence(second.load(16000), 16000, 1.5), 16000, "pcm16", realtime=True, speed=4.0)
            await caller.wait_for("turn.resumed", timeout=60, turn=turn)
            final = await caller.wait_for("transcript.final", timeout=60, turn=turn + 1)
            both = f"{first.reference} {second.reference}"
            assert word_error_rate(both, final["text"]) <= 0.4, (both, final["text"])
            await caller.wait_for("response.done", timeout=60, turn=turn + 1)
            assert ended_meanwhile == [True], "the reply did not end while turn.resumed was sent: nothing tested"
            assert turn not in call.session.history.asked, call.session.history.messages_so_far
