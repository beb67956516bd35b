"""Twilio Media Streams: a fake Twilio speaks the exact wire format to the real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import numpy as np
import pytest

from asr.wer import word_error_rate
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher, FakeTwilio
from tests.transport_checks import (
    LoopTurns,
    asr_text,
    barge_in_call,
    check_audio_frames,
    fail_next_final_decode,
    hangups_release_everything,
    malformed_then_call,
    prompt_clip,
    refused_at_once,
    reply_call,
    server_base,
    until_started,
)


async def test_twilio_call_speaks_the_reply(server):
    metrics = await reply_call(server, FakeTwilio(server_base(server)), prompt_clip(3), sizes={160})
    assert metrics["ttfa_ms"] > 0


async def test_twilio_marks_echo_after_playout_and_prompt_parameter(server):
    prompt = "You are a pirate. Answer in two or three short sentences."
    carrier = FakeTwilio(server_base(server), parameters={"system_prompt": prompt, "customer": "42"})
    # Custom parameters may set the prompt only when the server allows it (off by default).
    server.runtime.config.allow_custom_prompt = True
    try:
        await _prompt_parameter_call(carrier, prompt)
    finally:
        server.runtime.config.allow_custom_prompt = False


async def _prompt_parameter_call(carrier: FakeTwilio, prompt: str) -> None:
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.say(with_silence(prompt_clip(5).load(8000), 8000, 1.0), speed=None)
            await carrier.send(json.dumps({"event": "mark", "streamSid": carrier.sid, "mark": {"name": "nope"}}))
            await watcher.wait_event(call, "response.done", turn=1, timeout=60)
            assert call.session.history.system_prompt == prompt
            assert call.session._start is not None and call.session._start.metadata["customer"] == "42"
            await carrier.wait_audio()
            # Marks come back only once the fake has played the audio before them
            # (real time), and only then does the server count that sentence as
            # heard: at every moment what it counts as played was echoed (a
            # server that counted a sentence played when sent fails here while
            # the fake is still playing it out).
            seen_unplayed = False
            async with asyncio.timeout(60):
                while True:
                    echoed = set(carrier.played.marks_echoed)
                    played = {seg.name for seg in call.playout.segments if seg.played}
                    assert played <= echoed, (played, echoed)
                    seen_unplayed = seen_unplayed or len(played) < len(call.playout.segments)
                    names = [seg.name for seg in call.playout.segments]
                    if names and set(names) <= echoed and len(played) == len(names):
                        break
                    await asyncio.sleep(0.02)
            assert seen_unplayed, "every sentence was played before the first look: nothing tested"
            assert carrier.played.marks_echoed[: len(names)] == names  # in order
            assert "nope" not in names  # a mark the server never sent marks nothing


async def test_twilio_barge_in_clears_and_trims_history(server):
    await barge_in_call(server, FakeTwilio(server_base(server)))


async def test_twilio_malformed_messages_are_ignored(server):
    sid = FakeTwilio.sid
    bad = [
        b"\x00\x01binary",
        "not json",
        "[1, 2]",
        {"event": "dance"},
        {"no": "event"},
        {"event": "media", "streamSid": sid, "media": {"payload": "***not base64***"}},
        {"event": "media", "streamSid": sid},
        {"event": "dtmf", "streamSid": sid, "dtmf": {"digit": "Z"}},
        {"event": "mark", "streamSid": sid, "mark": {}},
        {"event": "start", "streamSid": sid, "start": {"streamSid": sid}},  # a second start
    ]
    await malformed_then_call(server, FakeTwilio(server_base(server)), bad, prompt_clip(7))


async def test_twilio_media_before_start_and_bad_start_are_ignored(server):
    carrier = FakeTwilio(server_base(server))
    carrier.opening = lambda: [  # type: ignore[method-assign]
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        {"event": "media", "media": {"payload": "AAAA"}},
        {"event": "start", "start": {"mediaFormat": {"encoding": "audio/x-mulaw"}}},  # no streamSid
    ]
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            for _ in range(100):
                if call.malformed >= 2:
                    break
                await asyncio.sleep(0.02)
            assert call.malformed == 2 and not call.session.started and not call.finished


async def _until(check, timeout_s: float = 4.0) -> None:
    """Poll ``check`` until it holds (the assert after it says what failed)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def test_a_start_with_a_bad_media_format_is_refused_briefly_and_the_call_goes_on(server, caplog):
    """A mediaFormat that is not an object is the caller's error (not a
    crash that ends the call), and a huge one does not reach the log: the
    WARNING names the reason in a few words. The carrier's next, good
    start begins the call."""
    carrier = FakeTwilio(server_base(server))
    good = carrier.wire.opening()
    bulky = {"encoding": list(range(50_000))}  # ~340 KB, no quotes to redact
    carrier.opening = lambda: [  # type: ignore[method-assign]
        {"event": "start", "start": {"streamSid": "MZ1", "mediaFormat": ["audio/x-mulaw", 8000]}},
        {"event": "start", "start": {"streamSid": "MZ1", "mediaFormat": bulky}},
        *good,
    ]
    caplog.set_level(logging.WARNING, logger="voice")
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await _until(lambda: call.session.started)
            assert call.malformed == 2 and call.session.started and not call.finished
    ignored = [r.getMessage() for r in caplog.records if "ignored message" in r.getMessage()]
    assert len(ignored) == 2 and all(len(line) < 300 for line in ignored), ignored
    assert "mediaFormat is not an object" in ignored[0] and "encoding is not a string" in ignored[1], ignored


async def test_twilio_an_unsupported_media_format_is_refused_at_once_not_as_abuse(server):
    """Twilio streams only mu-law at 8 kHz: a start naming another format
    cannot be followed by a good one."""
    carrier = FakeTwilio(server_base(server))
    good = carrier.wire.opening()
    good[1]["start"]["mediaFormat"] = {"encoding": "audio/opus", "sampleRate": 48000}
    carrier.opening = lambda: good  # type: ignore[method-assign]
    await refused_at_once(carrier, "unsupported media format 'audio/opus' at 48000 Hz")


async def test_a_refusal_logs_no_number_the_caller_chose(server, caplog):
    """A refusal's WARNING names the reason, not a sample rate the caller
    made up (a card number, or 4,000 digits): unquoted, it was logged whole.
    (Read at DEBUG too: the WARNING comes once a minute per address, and an
    earlier test's refusal may have had it.)"""
    carrier = FakeTwilio(server_base(server))
    good = carrier.wire.opening()
    good[1]["start"]["mediaFormat"] = {"encoding": "audio/x-mulaw", "sampleRate": "4111111111111111" + "9" * 4000}
    carrier.opening = lambda: good  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, logger="voice")
    await refused_at_once(carrier, "unsupported media format 'audio/x-mulaw' at")
    lines = [r.getMessage() for r in caplog.records if "unsupported media format" in r.getMessage()]
    assert lines and all("4111111" not in line and len(line) < 400 for line in lines), lines


async def test_a_keypad_flood_carries_only_the_first_presses(server):
    """Presses wait in the next turn's text; a flood of them before any
    speech keeps the first MAX_CARRIED_KEYPRESSES (a card number, twice
    over) instead of growing the text, and the call goes on."""
    from voice.call.session import KEYPRESS_PREFIX, MAX_CARRIED_KEYPRESSES

    carrier = FakeTwilio(server_base(server))
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await _until(lambda: call.session.started)
            for i in range(MAX_CARRIED_KEYPRESSES + 100):
                await carrier.press("0123456789"[i % 10])
            await carrier.ws.send("not json")  # handled in order: after every press
            await _until(lambda: call.malformed)
            carried = call.session.carry_over
            assert carried.count(KEYPRESS_PREFIX) == MAX_CARRIED_KEYPRESSES, carried
            assert carried.startswith(f"{KEYPRESS_PREFIX}0] {KEYPRESS_PREFIX}1]"), carried
            assert not call.finished


async def test_a_key_pressed_during_a_long_reply_is_timed_from_the_reply_not_the_key(server):
    """A key pressed early in a long reply waits for the reply to end, then
    for no more than the settle: its turn's endpoint counts that settle, not
    the reply the caller was listening to (it read the whole reply)."""
    from tests.transport_checks import STORY

    config = server.runtime.config
    with CallWatcher() as watcher, contextlib.ExitStack() as undo:
        undo.callback(setattr, config, "keypad_answer_s", config.keypad_answer_s)
        config.keypad_answer_s = 0.3  # shorter than the reply's generation after the key
        async with FakeTwilio(server_base(server)) as carrier:
            call = await watcher.one()
            call.session.history.system_prompt = STORY
            call.session.max_tokens = 300
            await carrier.say(with_silence(prompt_clip(3).load(8000), 8000, 1.5), speed=4.0)
            await watcher.wait_event(call, "response.sentence", turn=1, index=0, timeout=60)
            await carrier.press("5")
            done = await watcher.wait_event(call, "response.done", turn=1, timeout=120)
            first = await watcher.wait_event(call, "turn.metrics", turn=1, timeout=30)
            keys = await watcher.wait_event(call, "transcript.final", turn=2, timeout=60)
            assert keys["text"] == "[caller pressed 5]", keys
            metrics = await watcher.wait_event(call, "turn.metrics", turn=2, timeout=60)
            settle_ms = config.keypad_answer_s * 1000
            reply_ms = first["done_ms"] - first["first_sentence_ms"]
            assert reply_ms > 3 * settle_ms, ("the reply must outlast the settle", done, first)
            assert settle_ms - 50 <= metrics["endpoint_ms"] <= settle_ms + 100, metrics


async def test_keys_pressed_without_speech_are_answered_as_a_turn(server):
    """ "Press 1 to confirm": the caller presses 1 and says nothing. Keys
    used to wait, in silence, for words that never came; once no key has
    come for keypad_answer_s they are a turn of their own (keys pressed
    close together one turn), answered; "#" answers at once."""
    carrier = FakeTwilio(server_base(server))
    config = server.runtime.config
    admission_read: list[float] = []  # the TTFS admission's target reads
    server.runtime.metrics.ttfs_listeners.append(admission_read.append)
    with CallWatcher() as watcher, contextlib.ExitStack() as undo:
        undo.callback(server.runtime.metrics.ttfs_listeners.remove, admission_read.append)
        async with carrier:
            call = await watcher.one()
            await _until(lambda: call.session.started)
            await carrier.press("1")
            await carrier.press("2")
            final = await watcher.wait_event(call, "transcript.final", timeout=30)
            assert final["text"] == "[caller pressed 1] [caller pressed 2]", final
            done = await watcher.wait_event(call, "response.done", turn=final["turn"], timeout=60)
            assert done["text"] and not done["cancelled"], done
            assert call.session.carry_over == ""
            # Timed from the last key, as a spoken turn is from its last word:
            # the settle the caller waited is in its endpoint and TTFS.
            metrics = await watcher.wait_event(call, "turn.metrics", turn=final["turn"], timeout=30)
            settle_ms = config.keypad_answer_s * 1000
            assert settle_ms - 50 <= metrics["endpoint_ms"] <= metrics["ttfs_ms"], metrics
            # ... and kept out of admission's TTFS (a few "press 1" turns
            # with their 2 s settle read as an overload).
            assert metrics["keys_only"] is True and admission_read == [], (metrics, admission_read)
            await _until(lambda: not call.session.reply_in_flight(), timeout_s=30)
            old, config.keypad_answer_s = config.keypad_answer_s, 300.0  # a settle no test waits out
            try:
                await carrier.press("4")
                await carrier.press("#")
                final = await watcher.wait_event(call, "transcript.final", turn=final["turn"] + 1, timeout=30)
            finally:
                config.keypad_answer_s = old
            assert final["text"] == "[caller pressed 4] [caller pressed #]", final
            await watcher.wait_event(call, "response.done", turn=final["turn"], timeout=60)
            metrics = await watcher.wait_event(call, "turn.metrics", turn=final["turn"], timeout=30)
            assert metrics["endpoint_ms"] < settle_ms, metrics  # "#": at once, from the "#"
            said = [m["content"] for m in call.session.history.messages_so_far if m["role"] == "user"]
            assert said == ["[caller pressed 1] [caller pressed 2]", "[caller pressed 4] [caller pressed #]"], said


async def test_twilio_hangup_mid_reply_releases_everything(server):
    await hangups_release_everything(
        server, lambda: FakeTwilio(server_base(server)), [prompt_clip(40), prompt_clip(41)]
    )


@pytest.mark.realtime
async def test_twilio_jfk_mulaw_reply_audio_speaks_the_first_sentence(server, jfk):
    """The issue's reference call: jfk.wav as Twilio μ-law at real time; the
    μ-law audio sent back, transcribed, holds the reply's first sentence."""
    carrier = FakeTwilio(server_base(server))
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.say(with_silence(jfk.load(8000), 8000, 2.0), speed=1.0)
            first = await watcher.wait_event(call, "response.sentence", first=True, timeout=60)
            for _ in range(600):  # the first sentence's mark: its audio is all out
                if carrier.mark_offsets:
                    break
                await asyncio.sleep(0.05)
            assert carrier.mark_offsets, "no mark after the first sentence's audio"
            check_audio_frames(carrier, {160})
            heard = await asr_text(server, carrier.pieces16k()[0])
            assert word_error_rate(first["text"], heard) <= 0.4, (first["text"], heard)


async def test_twilio_a_start_the_session_refuses_is_refused_at_once_not_as_abuse(server):
    """A custom prompt the model's context cannot hold (the session refuses
    the start) ends the stream with 1008 and why: it was counted as a
    malformed start, every media frame after it as malformed too, and the
    flood ended the call as abuse and cooled the carrier's address down."""
    carrier = FakeTwilio(server_base(server), parameters={"system_prompt": "word " * 30_000})
    server.runtime.config.allow_custom_prompt = True
    try:
        await refused_at_once(carrier, "context")
    finally:
        server.runtime.config.allow_custom_prompt = False


async def test_twilio_an_asr_failure_is_said_not_silence(server, monkeypatch):
    """A phone caller hears no error event: the turn whose final decode
    fails (a fault injected into the real decoder's lane, as a CUDA OOM
    would) gets the reply policy's fallback spoken, heard as audio, and
    leaves nothing in the history; the call stays up."""
    failed = fail_next_final_decode(server, monkeypatch)
    carrier = FakeTwilio(server_base(server))
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.say(with_silence(prompt_clip(3).load(8000), 8000, 1.5), speed=None)
            error = await watcher.wait_event(call, "error", code="asr_failed", timeout=60)
            await carrier.wait_audio()
            await carrier.wait_quiet()
            assert failed and isinstance(error["turn"], int)
            assert not watcher.of(call, "response.done") and not call.session.history.messages_so_far
            line = call.session.reply_policy.fallback
            heard = await asr_text(server, carrier.audio16k())
            assert word_error_rate(line, heard) <= 0.4, (line, heard)
            assert not call.finished


async def test_twilio_one_long_media_message_lets_other_calls_run_while_it_is_fed(server):
    """A media message may hold 8 s of mu-law (64 KiB): its VAD work ran in
    one go on the shared event loop (only Realtime's appends were cut into
    frames). The session feeds it in steps of FEED_STEP_SAMPLES, and a task
    counting its turns on the loop moves on between them; the steps are all
    timed from the message's arrival (TTFS starts there)."""
    import itertools

    from voice.call.session import ASR_RATE, FEED_STEP_SAMPLES

    carrier = FakeTwilio(server_base(server))
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await until_started(call)
            session = call.session
            seen_at_step, fed, timed = [], [], []
            feed_locked = session._feed_locked

            with LoopTurns() as turns:

                async def counted(samples, now=None):
                    seen_at_step.append(turns.count)
                    fed.append(len(samples))
                    timed.append(now)
                    return await feed_locked(samples, now)

                session._feed_locked = counted
                await carrier.send(carrier.wire.media(b"\xff" * 8000 * 8))  # 8 s of mu-law silence
                async with asyncio.timeout(10):
                    while sum(fed) < 8 * ASR_RATE - FEED_STEP_SAMPLES:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
            assert max(fed) <= FEED_STEP_SAMPLES and len(seen_at_step) >= 8, fed
            assert all(b > a for a, b in itertools.pairwise(seen_at_step)), seen_at_step
            # Every step is timed from when the message came, not when it ran.
            assert timed[0] is not None and len(set(timed)) == 1, timed
            assert not call.finished


def line_noise() -> np.ndarray:
    """A third of a second of real sound that Silero calls speech and
    Whisper finds no words in: an Asterisk prompt played backwards (a
    cough or a door is the same to the pipeline), at 8 kHz."""
    from tests.transport_checks import by_name

    audio = by_name("conf-adminmenu-18").load(8000)[::-1]
    return np.ascontiguousarray(audio[int(4.4 * 8000) : int(4.75 * 8000)])


async def test_twilio_a_reply_cut_by_a_noise_goes_on(server):
    """Past the resume grace, speech cuts the reply (the buffer is cleared);
    that speech held no words (turn.empty). The caller heard half an answer
    and then silence; now the reply goes on from what they heard, as a
    reply of its own, and a real interruption (words) still ends it."""
    from tests.transport_checks import STORY, by_name

    with CallWatcher() as watcher:
        async with FakeTwilio(server_base(server)) as carrier:
            call = await watcher.one()
            call.session.history.system_prompt = STORY
            call.session.max_tokens = 400
            question = by_name("all-circuits-busy-now")
            await carrier.say(with_silence(question.load(8000), 8000, 0.7), speed=None)
            await watcher.wait_event(call, "response.sentence", turn=1, index=1, timeout=60)
            await carrier.wait_audio(timeout=60)
            async with asyncio.timeout(30):  # the first sentence played (its mark came back) ...
                while not carrier.played.marks_echoed:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # ... and past resume_grace_s: a barge-in, not the caller going on
            await carrier.say(with_silence(line_noise(), 8000, 1.5), speed=None)
            await watcher.wait_event(call, "turn.empty", turn=2, timeout=30)
            assert call.barge_ins == 1 and carrier.played.clears >= 1
            going_on = await watcher.wait_event(call, "response.sentence", turn=3, timeout=60)
            assert going_on["text"]
            assert call.session.history.replies.get(1), "what the caller heard of the cut reply is kept"
            written = " ".join(e["text"] for e in CallWatcher.of(call, "response.sentence") if e["turn"] == 1)
            heard = call.session.history.replies[1]["content"]
            assert heard != written and written.startswith(heard), "the history keeps only what was heard"
            # Once per reply: a go-on that a noise cuts again stays cut (a TV
            # on the line had the engine writing go-ons without end).
            call.session.go_on_after_noise(3)
            await watcher.wait_event(call, "response.done", turn=3, timeout=60)
            await asyncio.sleep(1.0)
            assert not [e for e in CallWatcher.of(call, "response.sentence") if e["turn"] > 3]


async def test_a_noise_once_the_reply_has_played_does_not_go_on(server):
    """The reply has played out by the clock; its last mark has not come
    back (a carrier's echo runs late: the playout still counts it as
    playing for a grace). A cough then cuts nothing the caller had not
    heard, so no "go on" reply follows it (one did: the cut of a reply heard
    in full was taken for a reply cut short)."""
    with CallWatcher() as watcher:
        async with FakeTwilio(server_base(server), echo_marks=False) as carrier:
            call = await watcher.one()
            await carrier.say(with_silence(prompt_clip(3).load(8000), 8000, 1.5), speed=4.0)
            await watcher.wait_event(call, "response.done", turn=1, timeout=90)
            playout = call.playout
            async with asyncio.timeout(60):
                while playout.unplayed:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert playout.busy, "the noise must come inside the unconfirmed sentence's grace"
            await carrier.say(with_silence(line_noise(), 8000, 1.5), speed=None)
            await watcher.wait_event(call, "turn.empty", turn=2, timeout=30)
            assert call.barge_ins == 1, "the noise came while the playout still counted the reply as playing"
            await asyncio.sleep(0.5)  # a go-on starts its turn as soon as the empty one has ended
            assert not call.session.reply_in_flight()
            assert not [e for e in call.events if isinstance(e.get("turn"), int) and e["turn"] > 2], call.events[-5:]


async def test_a_sentence_whose_audio_failed_leaves_the_history(server, monkeypatch):
    """The voice fails on the reply's first sentence (fault injected into
    the real TTS: nothing here makes it fail on its own). The caller never
    heard that sentence, so the history the next turn is answered from
    does not hold it (it used to keep the whole text, and the agent went on
    as if it had been said); the sentences after it, and the call, go on."""
    from tests.transport_checks import STORY, fail_next_sentence_voice

    with CallWatcher() as watcher:
        async with FakeTwilio(server_base(server)) as carrier:
            call = await watcher.one()
            await until_started(call)
            call.session.history.system_prompt = STORY  # sentences after the one that fails
            call.session.max_tokens = 120
            await _until(lambda: call.playout is not None)
            clip = prompt_clip(3).load(8000)
            await carrier.say(clip, speed=4.0)
            # Armed before the silence that ends the turn: its reply is the
            # first thing the voice is asked to say.
            failed = fail_next_sentence_voice(call, monkeypatch)
            await carrier.say(np.zeros(8000 * 2, np.float32), speed=4.0)
            done = await watcher.wait_event(call, "response.done", turn=1, timeout=90)
            assert done["text"] and not done["cancelled"], done
            sentences = [e["text"] for e in watcher.of(call, "response.sentence") if e["turn"] == 1]
            assert failed == sentences[:1] and len(sentences) >= 2, (failed, sentences)
            went_out = " ".join(sentences[1:])
            history = call.session.history
            replies = lambda: [m["content"] for m in history.messages_so_far if m["role"] == "assistant"]  # noqa: E731
            await _until(lambda: replies() == ([went_out] if went_out else []), timeout_s=30)
            assert replies() == ([went_out] if went_out else []), (replies(), sentences)
            assert [m["role"] for m in history.messages_so_far][:1] == ["user"]
            assert call.playout.failed is not None and not call.finished
