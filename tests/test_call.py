"""End-to-end calls over a real websocket: real Whisper, VAD and LLM on real speech."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asr.wer import word_error_rate
from benchmarks.client import NativeCaller, last_voiced_s
from benchmarks.corpus import asterisk_prompts
from tests.conftest import with_silence
from tests.transport_checks import by_name, fail_next_final_decode


def _turn_events(caller: NativeCaller, turn: int, kind: str) -> list[dict]:
    return [e for e in caller.result.of(kind) if e.get("turn") == turn]


@pytest.mark.realtime
async def test_jfk_phone_call_realtime(call_url, jfk):
    """The issue's reference call: jfk.wav as 8 kHz mu-law, real-time 20 ms frames."""
    audio = with_silence(jfk.load(8000), 8000, 2.5)
    async with NativeCaller(call_url) as caller:
        ready = await caller.start("mulaw", 8000, options={"endpoint_silence_ms": 2000})
        assert ready["audio"] == {"encoding": "mulaw", "sample_rate": 8000}
        await caller.play(audio, 8000, "mulaw", realtime=True, last_voice_s=last_voiced_s(jfk.load(16000)))
        done = await caller.wait_for("response.done", timeout=30)
        finals = caller.result.of("transcript.final")
        assert len(finals) == 1, finals
        wer = word_error_rate(jfk.reference, finals[0]["text"])
        assert wer <= 0.15, (wer, finals[0]["text"])
        assert caller.result.of("transcript.partial"), "no partial transcript while the caller spoke"
        first = caller.result.first_at("response.sentence", first=True)
        assert first is not None and first <= caller.result.first_at("response.done")
        assert done["cancelled"] is False and done["text"]
        metrics = await caller.wait_for("turn.metrics", turn=1)
        assert metrics["ttfs_ms"] is not None and metrics["ttfs_ms"] > 0
        assert caller.result.ttfs_s is not None and caller.result.ttfs_s > 0


async def test_two_concurrent_calls_both_complete(call_url, phone_prompts):
    clips = [phone_prompts[3], phone_prompts[10]]

    async def one(clip):
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000)
            await caller.play(with_silence(clip.load(8000), 8000, 1.0), 8000, "mulaw", realtime=True, speed=4.0)
            done = await caller.wait_for("response.done", timeout=60)
            final = caller.result.of("transcript.final")[0]["text"]
            return clip, final, done

    results = await asyncio.gather(*(one(c) for c in clips))
    for clip, final, done in results:
        assert word_error_rate(clip.reference, final) <= 0.35, (clip.reference, final)
        assert done["text"] and not done["cancelled"]


async def test_pcm16_16k_with_commit(call_url, phone_prompts):
    """A push-to-talk client: pcm16 at 16 kHz sent at full speed, then input.commit."""
    clip = phone_prompts[20]
    async with NativeCaller(call_url) as caller:
        await caller.start("pcm16", 16000)
        await caller.play(clip.load(16000), 16000, "pcm16", realtime=False)
        await caller.send_json({"type": "input.commit"})
        final = await caller.wait_for("transcript.final", timeout=30)
        assert word_error_rate(clip.reference, final["text"]) <= 0.35, (clip.reference, final["text"])
        await caller.wait_for("response.done", timeout=30)


async def test_barge_in_cancels_reply_and_keeps_only_sent_text(call_url, phone_prompts):
    # A prompt and question for which the embedded model (greedy decoding)
    # writes a long reply, so there is a reply to talk over.
    story = "You are a storyteller. Always answer with a long story of many short sentences."
    by_name = {p.name: p for p in asterisk_prompts(min_words=1)}
    first, second = by_name["asterisk/all-circuits-busy-now"], by_name["asterisk/conf-now-recording"]
    async with NativeCaller(call_url) as caller:
        # No resume grace: talking at once after the first sentence would
        # otherwise count as the caller going on with their turn
        # (test_native_audio.py has that case).
        # No sentence cap either: the reply must still be going when the
        # caller talks over it.
        options = {"max_tokens": 400, "resume_grace_ms": 0, "reply_max_sentences": 0}
        await caller.start("mulaw", 8000, system_prompt=story, options=options)
        await caller.play(with_silence(first.load(8000), 8000, 1.3), 8000, "mulaw", realtime=False)
        await caller.wait_for("response.sentence", turn=1, timeout=30)
        # The caller talks over the reply (sent at full speed so the VAD
        # confirms speech within milliseconds, long before the reply ends).
        await caller.play(with_silence(second.load(8000), 8000, 1.3), 8000, "mulaw", realtime=False)
        done = await caller.wait_for("response.done", turn=1, timeout=30)
        assert done["cancelled"] is True, done
        sentences = [e["text"] for e in _turn_events(caller, 1, "response.sentence")]
        deltas = "".join(e["text"] for e in _turn_events(caller, 1, "response.delta"))
        assert done["text"] == " ".join(sentences)
        assert len(done["text"]) <= len(deltas.strip())
        # The interrupting speech becomes the next turn, and it is answered.
        final2 = await caller.wait_for("transcript.final", turn=2, timeout=30)
        assert word_error_rate(second.reference, final2["text"]) <= 0.5
        await caller.wait_for("response.done", turn=2, timeout=30)


BAD_INPUTS = [
    ("not json", "invalid_json", False),
    ('{"type": "dance"}', "unknown_event", False),
    ('["start"]', "invalid_message", False),
    ('{"type": "start", "audio": {"encoding": "opus", "sample_rate": 8000}}', "unsupported_encoding", False),
    ('{"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 44100}}', "unsupported_sample_rate", False),
    (
        '{"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 8000}, "options": {"first_clause_words": -1}}',
        "invalid_message",
        False,
    ),
    (b"\x00" * 320, "not_started", False),
    (b"\x00" * 321, "invalid_audio", True),
    (b"\x00" * (70 * 1024), "frame_too_large", True),
    ('{"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000}}', "already_started", True),
]


@pytest.mark.parametrize(("payload", "code", "after_start"), BAD_INPUTS)
async def test_bad_input_gets_error_and_other_call_unaffected(call_url, phone_prompts, payload, code, after_start):
    clip = phone_prompts[7]
    async with NativeCaller(call_url) as good, NativeCaller(call_url) as bad:
        await good.start("mulaw", 8000)
        good_play = asyncio.create_task(
            good.play(with_silence(clip.load(8000), 8000, 1.0), 8000, "mulaw", realtime=True, speed=4.0)
        )
        if after_start:
            await bad.start("pcm16", 16000)
        await bad.send_raw(payload)
        err = await bad.wait_for("error", timeout=10)
        assert err["code"] == code and err["message"]
        # The bad call is still alive and usable after the error...
        if not after_start:
            await bad.start("pcm16", 16000)
        await bad.send_raw(b"\x00" * 640)
        await good_play
        # ...and the good call got its full turn.
        final = await good.wait_for("transcript.final", timeout=30)
        assert word_error_rate(clip.reference, final["text"]) <= 0.35
        await good.wait_for("response.done", timeout=30)
        assert not good.result.of("error")


async def test_hangup_mid_reply_releases_everything(server, call_url, phone_prompts):
    story = "You tell very long, detailed stories of at least ten sentences whenever asked anything."
    baseline = len(asyncio.all_tasks())
    for clip in phone_prompts[40:43]:
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000, system_prompt=story)
            await caller.play(with_silence(clip.load(8000), 8000, 1.3), 8000, "mulaw", realtime=False)
            await caller.wait_for("response.delta", timeout=30)
        # leaving the block closes the socket mid-reply
    for _ in range(100):
        if server.runtime.active_calls == 0 and len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.05)
    assert server.runtime.active_calls == 0
    assert len(asyncio.all_tasks()) <= baseline
    # and the server still answers a call
    clip = phone_prompts[50]
    async with NativeCaller(call_url) as caller:
        await caller.start("mulaw", 8000)
        await caller.play(with_silence(clip.load(8000), 8000, 1.3), 8000, "mulaw", realtime=False)
        await caller.wait_for("response.done", timeout=30)


@pytest.mark.parametrize("name", ["asterisk/queue-quantity1", "asterisk/vm-onefor-full"])
async def test_a_line_that_goes_quiet_mid_turn_still_gets_its_turn_ended(call_url, name):
    """The client stops sending right after the last word (silence
    suppression on a SIP line, a client that streams only speech). These
    prompts end on an unfinished phrase, so the adaptive window is at its
    longest; with no audio to count it in, the server must count the silent
    line instead, and the caller gets a transcript and a reply. Its TTFS
    counts from the caller's last frame: the speech end, in the last VAD
    chunk that the filled silence completed, was read as the fill's time,
    and the TTFS came out 0.5-0.75 s shorter than the caller waited."""
    from benchmarks.client import last_voiced_s

    clip = next(p for p in asterisk_prompts(min_words=5) if p.name == name)
    audio = clip.load(8000)
    # Cut a few ms into the last voiced VAD chunk: the silence filled in completes it.
    audio = audio[: int((last_voiced_s(clip.load(16000)) - 0.02) * 8000)]
    async with NativeCaller(call_url) as caller:
        await caller.start("mulaw", 8000)
        await caller.play(audio, 8000, "mulaw", realtime=True, speed=4.0)  # no trailing silence at all
        last_frame_sent = caller.result.audio_done_at
        final = await caller.wait_for("transcript.final", timeout=20)
        assert word_error_rate(clip.reference, final["text"]) <= 0.5, (clip.reference, final["text"])
        done = await caller.wait_for("response.done", timeout=60)
        assert done["text"] and not done["cancelled"]
        metrics = await caller.wait_for("turn.metrics", timeout=10, turn=final["turn"])
        first_at = next(r.at for r in caller.result.events if r.event["type"] == "response.sentence")
        waited_ms = (first_at - last_frame_sent) * 1000
        assert metrics["ttfs_ms"] >= waited_ms - 250, (metrics["ttfs_ms"], waited_ms)
        await caller.send_json({"type": "stop"})
        await caller.wait_for("call.ended", timeout=10)


async def test_a_server_stall_mid_turn_is_not_taken_for_a_silent_line(call_url, phone_prompts):
    """The caller talks on, but a feed holds the call's audio lock for 1 s
    (its events waiting on a full socket; held by the test here): the
    caller's frames queue behind it. The silent-line filler must not take
    that for a quiet line: it fed ~0.5 s of made-up silence in front of the
    queued speech, which can pause or end the turn in mid-word. Every
    second the server hears is one the caller sent."""
    from tests.fake_carrier import CallWatcher

    clip = phone_prompts[3]
    audio = with_silence(clip.load(8000), 8000, 1.5)
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000)
            session = (await watcher.one()).session
            play = asyncio.create_task(caller.play(audio, 8000, "mulaw", realtime=True, speed=1.0))
            async with asyncio.timeout(20):
                while session._tracker is None or not session._tracker.in_speech:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            async with session._feed_lock:
                await asyncio.sleep(1.0)
            await play
            await caller.wait_for("transcript.final", timeout=30)
            await asyncio.sleep(0.2)
            heard_s = session._cleared_s + session._fed_s
    sent_s = len(audio) / 8000
    assert heard_s <= sent_s + 0.05, (heard_s, sent_s)


async def test_a_client_sending_second_long_messages_in_real_time_gets_no_made_up_silence(call_url, phone_prompts):
    """A client that streams its caller in one-second messages, in real
    time (a Realtime append a second, or a native client's big frames), is
    quiet for most of each second between them. The silent-line filler took
    each such gap past 0.5 s for a quiet line and fed half a second of
    silence after every message: pauses in the middle of the caller's words
    (a turn cut short) and every later position that much late. Every
    second the server hears is one the caller sent."""
    from benchmarks.callers.base import to_wire
    from benchmarks.client import frames
    from tests.fake_carrier import CallWatcher

    clip = phone_prompts[3]
    audio = clip.load(8000)
    messages = [b"".join(frames(audio[i : i + 8000], 8000, "mulaw")) for i in range(0, len(audio), 8000)]
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000)
            session = (await watcher.one()).session
            assert caller.ws is not None
            started = asyncio.get_running_loop().time()
            for i, message in enumerate(messages):
                await asyncio.sleep(max(0.0, started + i - asyncio.get_running_loop().time()))
                await caller.ws.send(to_wire(caller.wire.media(message)))
            await asyncio.sleep(0.2)  # the last message fed (its own quiet line comes later)
            heard_s = session._cleared_s + session._fed_s
    sent_s = len(audio) / 8000
    assert heard_s <= sent_s + 0.05, (heard_s, sent_s)


async def test_an_asr_failure_fails_one_turn_not_the_call(server, call_url, monkeypatch):
    """Fault injection into the real decoder's lane: its next decode raises
    (what a CUDA OOM or a broken model file does). That turn gets an
    ``asr_failed`` error; the call stays up and its next turn is transcribed
    and answered. (A decoder process that dies: tests/test_asr_lanes.py.)"""
    failed = fail_next_final_decode(server, monkeypatch)  # partials are off: the turn's first decode
    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")  # one turn each
    async with NativeCaller(call_url) as caller:
        await caller.start("mulaw", 8000, options={"partials": False})
        await caller.play(with_silence(first.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=4.0)
        error = await caller.wait_for("error", timeout=30)
        # A code and a plain sentence; the exception's text stays in the server log.
        assert error["code"] == "asr_failed" and error["message"] == "turn 1: speech recognition failed for this turn"
        assert failed, "the injected fault never ran"
        await caller.play(with_silence(second.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=4.0)
        final = await caller.wait_for("transcript.final", timeout=30)
        assert word_error_rate(second.reference, final["text"]) <= 0.5, (second.reference, final["text"])
        done = await caller.wait_for("response.done", timeout=60, turn=final["turn"])
        assert done["text"] and not done["cancelled"]
        await caller.send_json({"type": "stop"})
        ended = await caller.wait_for("call.ended", timeout=10)
        assert ended["reason"] == "client_stop"


async def test_a_turn_cancelled_while_its_transcript_is_sent_keeps_the_words_once(server, phone_prompts):
    """The caller's transcript is on its way out (the transport's send waits
    on a full socket) when the turn is cancelled: the client gets the words
    as that turn's, so they stay that turn's in the history and are not
    carried into the next turn as well (they were: said twice). The
    session's output is the test's stand-in for the transport here."""
    from streaming.codecs import float_to_int16
    from voice.call.session import CallSession
    from voice.call.start import Start

    release, sending = asyncio.Event(), asyncio.Event()
    sent: list[dict] = []

    async def emit(event: dict) -> None:
        if event.get("type") == "transcript.final":
            sending.set()
            await release.wait()
        sent.append(event)

    session = CallSession(server.runtime, emit)  # type: ignore[arg-type]
    await session.start(Start(encoding="pcm16", sample_rate=16000, server_greeting=False))
    try:
        clip = phone_prompts[4]
        pcm = float_to_int16(with_silence(clip.load(16000), 16000, 1.5)).tobytes()
        for i in range(0, len(pcm), 640):
            await session.audio(pcm[i : i + 640])
        await asyncio.wait_for(sending.wait(), 30)
        turn = session._active
        assert turn is not None and turn.cancel()
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait({turn.task}, timeout=10)
        finals = [e for e in sent if e.get("type") == "transcript.final"]
        assert finals, "the cancel cut the transcript's send short"
        assert session.carry_over == "", session.carry_over
        assert {"role": "user", "content": finals[0]["text"]} in session.history.messages_so_far
        # Told, so answered as any cancelled turn: a client that has the words
        # (a Realtime response created for them) is not left waiting.
        done = [e for e in sent if e.get("type") == "response.done" and e.get("turn") == finals[0]["turn"]]
        assert done and done[0]["cancelled"] and done[0]["text"] == "", done
    finally:
        release.set()
        await session.stop()


async def test_a_commit_right_after_the_last_word_decodes_all_of_it(server, phone_prompts) -> None:
    """A push-to-talk client at 8 kHz commits right after its last frame:
    the resampler still held the last 20-70 ms of it, which reached the
    tracker only with the next turn's audio. The commit drains it into the
    turn it belongs to."""
    from streaming.codecs import float_to_int16
    from voice.call.session import CallSession
    from voice.call.start import Start

    async def emit(event: dict) -> None:
        pass

    session = CallSession(server.runtime, emit)  # type: ignore[arg-type]
    await session.start(Start(encoding="pcm16", sample_rate=8000, server_greeting=False))
    try:
        audio = phone_prompts[20].load(8000)
        pcm = float_to_int16(audio).tobytes()
        for i in range(0, len(pcm), 320):
            await session.audio(pcm[i : i + 320])
        assert await session.commit()
        assert session._fed_s >= len(audio) / 8000, (session._fed_s, len(audio) / 8000)
    finally:
        await session.stop()


async def test_a_connection_lost_right_after_a_commit_keeps_the_committed_words(server, phone_prompts) -> None:
    """A client commits its turn and its connection drops in the same read
    (no stop: the call may come back). The committed turn's task had not
    taken its first step, and the stop cancelled it directly: its handler,
    which hands the words on, never ran, and the re-attached call had lost
    what its caller last said. The stop cancels it as a turn, so the words
    are decoded and wait in the stored conversation."""
    import uuid

    from asr.wer import word_error_rate
    from streaming.codecs import float_to_int16
    from voice.call.session import CallSession
    from voice.call.start import Start

    async def emit(event: dict) -> None:
        pass

    key = f"native:test-{uuid.uuid4().hex}"
    session = CallSession(server.runtime, emit)  # type: ignore[arg-type]
    await session.start(
        Start(encoding="pcm16", sample_rate=16000, server_greeting=False, resume_key=key, may_resume=False)
    )
    clip = phone_prompts[5]
    pcm = float_to_int16(clip.load(16000)).tobytes()
    for i in range(0, len(pcm), 640):
        await session.audio(pcm[i : i + 640])
    assert await session.commit()
    turn = session._active
    assert turn is not None and not turn._started  # no step taken yet: the same read
    await session.stop("connection_lost")
    async with asyncio.timeout(10):
        while (state := await server.runtime.store.load(key)) is None or not state.carry_over:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert word_error_rate(clip.reference, state.carry_over) <= 0.5, (clip.reference, state.carry_over)


async def test_words_carried_over_turn_after_turn_stay_bounded(server) -> None:
    """Turns talked over before any reply went out hand their words to the
    next turn; on a line where that happens turn after turn (a noisy line,
    a chatty caller on a loaded decoder) nothing took them, and they grew
    without bound, in every saved call state too (past the store's size
    none was saved). They keep the newest words, as a turn's words do."""
    from voice.call.session import CallSession
    from voice.call.start import Start
    from voice.call.turn import MAX_USER_TEXT_CHARS, TurnOutcome

    async def emit(event: dict) -> None:
        return None

    session = CallSession(server.runtime, emit)  # type: ignore[arg-type]
    await session.start(Start(encoding="pcm16", sample_rate=16000, server_greeting=False))
    try:
        for index in range(1, 200):
            words = f"and then item {index} of the list I was reading out"
            session._turn_finished(TurnOutcome(index, words, "", cancelled=True, replied=False))
        assert len(session.carry_over) <= MAX_USER_TEXT_CHARS, len(session.carry_over)
        assert session.carry_over.endswith("item 199 of the list I was reading out")
    finally:
        await session.stop()


async def test_words_carried_over_keep_the_order_they_came_in(server) -> None:
    """A turn taken back (the caller resumed) hands its words on: keys
    pressed while it replied came after them, keys it never took (talked
    over before its decode was read) before them. Both went in before."""
    from voice.call.session import CallSession
    from voice.call.start import Start
    from voice.call.turn import TurnOutcome

    async def emit(event: dict) -> None:
        return None

    session = CallSession(server.runtime, emit)  # type: ignore[arg-type]
    await session.start(Start(encoding="pcm16", sample_rate=16000, server_greeting=False))
    try:
        session.carry_over = "[caller pressed 5]"  # pressed while turn 1 replied
        session._turn_finished(
            TurnOutcome(
                1, "my account number is", "", cancelled=True, replied=True, premature=True, took_carry_over=True
            )
        )
        assert session.carry_over == "my account number is [caller pressed 5]"
        session.carry_over = "[caller pressed 7]"  # pressed before turn 2, which never read it
        session._turn_finished(TurnOutcome(2, "and my pin is", "", cancelled=True, replied=False))
        assert session.carry_over == "[caller pressed 7] and my pin is"
    finally:
        await session.stop()


async def test_keys_pressed_after_a_turns_pause_decode_are_still_answered(server, phone_prompts) -> None:
    """The caller speaks, pauses (the pause decode reads the waiting keys:
    none), presses 1 and # inside the endpoint window, and says no more.
    The turn is answered without the keys; they used to wait, unanswered,
    for the caller's next words. They are answered as a turn of their own."""
    from streaming.codecs import float_to_int16
    from voice.call.session import CallSession
    from voice.call.start import Start

    sent: list[dict] = []

    async def emit(event: dict) -> None:
        sent.append(event)

    session = CallSession(server.runtime, emit)  # type: ignore[arg-type]
    await session.start(Start(encoding="pcm16", sample_rate=16000, server_greeting=False))

    async def feed(audio: np.ndarray) -> None:  # in real time: a preemptive turn needs a real-time caller
        pcm = float_to_int16(audio).tobytes()
        for i in range(0, len(pcm), 640):
            await session.audio(pcm[i : i + 640])
            await asyncio.sleep(0.02)

    def finals() -> list[str]:
        return [e["text"] for e in sent if e.get("type") == "transcript.final"]

    try:
        await feed(phone_prompts[2].load(16000))
        await feed(np.zeros(1600, np.float32))  # 0.1 s: the pause, and its decode
        for _ in range(200):
            pending = session._pending
            if pending is not None and pending.carry_over is not None:
                break  # the pause decode read the carried-over words: none
            await asyncio.sleep(0.02)
        assert session._pending is not None and session._pending.carry_over == ""
        session.dtmf("1")
        session.dtmf("#")
        await feed(np.zeros(16000 * 2, np.float32))  # the turn ends; the caller says no more
        for _ in range(1500):
            if any("[caller pressed" in text for text in finals()):
                break
            await asyncio.sleep(0.02)
        assert len(finals()) == 2 and "[caller pressed" not in finals()[0], finals()
        assert finals()[1] == "[caller pressed 1] [caller pressed #]", finals()
    finally:
        await session.stop()
