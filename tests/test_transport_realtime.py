"""OpenAI-Realtime-compatible endpoint (/v1/realtime): a raw-websocket
Realtime client (GA and beta event names) and the official ``openai`` SDK
drive real calls through the real pipeline."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging

import numpy as np
import pytest

from asr.config import ASRConfig
from asr.wer import word_error_rate
from benchmarks.corpus import shared_clip
from streaming.codecs import StreamResampler, float_to_int16
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher, FakeRealtime
from tests.transport_checks import (
    STORY,
    LoopTurns,
    barge_in_call,
    by_name,
    fail_next_sentence_voice,
    hangups_release_everything,
    malformed_then_call,
    prompt_clip,
    reply_call,
    server_base,
)
from voice.call.reply_policy import ReplyPolicy


def _watched_prompts(server, monkeypatch) -> list[list[dict[str, str]]]:
    """The prompts the server's real engine is sent from now on, in order."""
    engine = server.runtime.engine
    prompts: list[list[dict[str, str]]] = []
    real_stream = engine.stream

    def spy(request):  # the real engine, watched
        prompts.append(list(request.messages))
        return real_stream(request)

    monkeypatch.setattr(engine, "stream", spy)
    return prompts


async def _first_turn_held(carrier: FakeRealtime, watcher: CallWatcher, clip):
    """Push-to-talk: ``clip`` said and committed, and its reply written and
    held (remembered, never shown); the live call."""
    await carrier.next_event("session.updated", timeout=10)
    await carrier.say(with_silence(clip.load(24000), 24000, 0.5), speed=None)
    await carrier.send({"type": "input_audio_buffer.commit"})
    call = await watcher.one()
    for _ in range(600):  # the held reply is done (remembered) before the next turn
        if 1 in call.session.history.replies:
            break
        await asyncio.sleep(0.05)
    assert 1 in call.session.history.replies and not carrier.of("response.created")
    return call


@contextlib.asynccontextmanager
async def _started_call(server, **settings):
    """A Realtime session (text out) started by a moment of silence, and its
    live call, for the tests that hand the call a session event no real
    audio can be made to cause on cue."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, **settings)
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            await carrier.say(np.zeros(2400, np.float32), speed=None)  # starts the call
            yield carrier, await watcher.one()


async def test_realtime_pcm24k_speaks_the_reply(server):
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm")
    metrics = await reply_call(server, carrier, prompt_clip(11), multiple_of=2, dtmf=None)
    assert metrics["ttfa_ms"] > 0
    kinds = [e["type"] for e in carrier.events]
    # The GA sequence a Realtime client expects, in order.
    order = [
        "session.created", "session.updated", "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.added",
        "conversation.item.done", "conversation.item.input_audio_transcription.completed", "response.created",
        "response.output_item.added", "response.content_part.added", "response.output_audio_transcript.delta",
        "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.done",
        "response.content_part.done", "response.output_item.done", "response.done",
    ]  # fmt: skip
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))
    # Each item added is finalized: the caller's (at once, its transcript in)
    # and the reply's (after its output item is done, before response.done).
    added = [e["item"]["id"] for e in carrier.of("conversation.item.added")]
    done_items = [e["item"]["id"] for e in carrier.of("conversation.item.done")]
    assert done_items == added, (added, done_items)
    last_done = len(kinds) - 1 - kinds[::-1].index("conversation.item.done")
    assert kinds.index("response.output_item.done") < last_done < kinds.index("response.done")
    assert all(isinstance(e.get("event_id"), str) for e in carrier.events)
    done = carrier.of("response.done")[0]["response"]
    assert done["status"] == "completed"
    transcript = carrier.of("response.output_audio_transcript.done")[0]["transcript"]
    assert done["output"][0]["content"][0]["transcript"] == transcript
    # firstline's per-turn timings ride in the response metadata.
    assert float(done["metadata"]["firstline_ttfs_ms"]) > 0
    assert float(done["metadata"]["firstline_ttfa_ms"]) > 0
    assert done["usage"]["output_tokens"] > 0
    # Audio deltas come before response.done, 100 ms each but the last.
    sizes = {len(c) for _, c in carrier.audio_chunks}
    assert 4800 in sizes and max(sizes) <= 4800


async def test_realtime_items_can_be_retrieved(server):
    """OpenAI's agents SDKs send conversation.item.retrieve for each user
    item once its transcript is in; it was refused as an unknown event, an
    error on every turn. It answers with the item as last sent."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        await carrier.say(with_silence(prompt_clip(11).load(24000), 24000, 1.3), speed=None)
        transcribed = await carrier.next_event("conversation.item.input_audio_transcription.completed", timeout=60)
        await carrier.send({"type": "conversation.item.retrieve", "item_id": transcribed["item_id"]})
        got = (await carrier.next_event("conversation.item.retrieved", timeout=10))["item"]
        assert got["id"] == transcribed["item_id"] and got["role"] == "user"
        assert got["content"][0]["transcript"] == transcribed["transcript"]
        done = (await carrier.next_event("response.done", timeout=60))["response"]
        mark = len(carrier.events)
        await carrier.send({"type": "conversation.item.retrieve", "item_id": done["output"][0]["id"]})
        reply = (await carrier.next_event("conversation.item.retrieved", timeout=10, after=mark))["item"]
        assert reply["role"] == "assistant" and reply["content"][0]["text"] == done["output"][0]["content"][0]["text"]
        await carrier.send({"type": "conversation.item.retrieve", "item_id": "item_nope", "event_id": "evt_r"})
        err = await carrier.next_event("error", timeout=10)
        assert err["error"]["code"] == "item_not_found" and err["error"]["event_id"] == "evt_r", err


async def test_realtime_speech_stopped_is_sent_at_the_endpoint(server, jfk):
    """input_audio_buffer.speech_stopped goes out when the server's endpoint
    fires, before Whisper's final decode (it waited for the transcript),
    for the item that is then committed. The ASR worker is kept busy with
    other calls' finals, so this call's final decode comes seconds after its
    endpoint: speech_stopped must not wait for it."""
    clip = prompt_clip(13)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            busy = [server.runtime.asr.submit(f"busy-{i}", jfk.load(16000), final=True) for i in range(3)]
            await carrier.say(with_silence(clip.load(8000), 8000, 1.3), speed=None)
            stopped = await carrier.next_event("input_audio_buffer.speech_stopped", timeout=60)
            assert not carrier.of("input_audio_buffer.committed"), "speech_stopped waited for the transcript"
            assert not all(b.done() for b in busy), "the worker was free: this proves nothing"
            committed = await carrier.next_event("input_audio_buffer.committed", timeout=60)
            await asyncio.gather(*busy)
            assert stopped["item_id"] == committed["item_id"], (stopped, committed)
            assert len(carrier.of("input_audio_buffer.speech_stopped")) == 1
            kinds = [e.get("type") for e in (await watcher.one()).events]
            assert kinds.index("speech.stopped") < kinds.index("transcript.final"), kinds


async def test_realtime_text_only_pcmu_and_transcription_events(server):
    clip = prompt_clip(12)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        updated = carrier.of("session.updated")[0]["session"]
        assert updated["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert updated["output_modalities"] == ["text"]
        await carrier.say(with_silence(clip.load(8000), 8000, 1.3), speed=None)
        done = await carrier.next_event("response.done")
        completed = carrier.of("conversation.item.input_audio_transcription.completed")[0]
        assert word_error_rate(clip.reference, completed["transcript"]) <= 0.35, completed
        deltas = "".join(e["delta"] for e in carrier.of("response.output_text.delta"))
        text = carrier.of("response.output_text.done")[0]["text"]
        # The deltas stream the model's text as it comes; the reply policy may
        # stop it after a sentence the deltas already ran past (docs/protocol.md),
        # so the done text is what the deltas said, up to where it stopped.
        assert text.strip() and " ".join(deltas.split()).startswith(" ".join(text.split())), (deltas, text)
        assert done["response"]["output"][0]["content"] == [{"type": "output_text", "text": text}]
        assert not carrier.audio_chunks, "text modality sends no audio"
        # The user item precedes the assistant's, and the ids chain.
        user = carrier.of("conversation.item.added")[0]["item"]
        assert user["role"] == "user" and user["id"] == completed["item_id"]
        assistant = carrier.of("conversation.item.added")[1]
        assert assistant["previous_item_id"] == user["id"]


async def test_realtime_beta_names_and_g711_alaw(server):
    clip = prompt_clip(13)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcma", beta=True)
    async with carrier:
        created = await carrier.next_event("session.created", timeout=10)
        assert created["session"]["input_audio_format"] == "pcm16"  # the beta session object
        # The operator's system prompt is not read out to a client that set none.
        assert server.runtime.config.llm.system_prompt and created["session"]["instructions"] == ""
        await carrier.say(with_silence(clip.load(8000), 8000, 1.3), speed=None)
        await carrier.next_event("response.done")
        kinds = {e["type"] for e in carrier.events}
        assert {"conversation.item.created", "response.audio.delta", "response.audio_transcript.delta",
                "response.audio_transcript.done"} <= kinds, kinds  # fmt: skip
        assert not kinds & {"conversation.item.added", "response.output_audio.delta", "conversation.item.done"}
        assert carrier.of("session.updated")[0]["session"]["output_audio_format"] == "g711_alaw"
        assert carrier.audio_chunks and all(len(c) <= 800 for _, c in carrier.audio_chunks)
        # The beta shapes strict clients validate (pipecat's beta service
        # refused GA's "output_audio" content and a usage without details).
        done = carrier.of("response.done")[0]["response"]
        assert done["output"][0]["content"][0]["type"] == "audio" and "modalities" in done
        assert carrier.of("response.output_item.done")[0]["item"]["content"][0]["type"] == "audio"
        assert set(done["usage"]["output_token_details"]) == {"text_tokens", "audio_tokens"}


async def test_realtime_push_to_talk_holds_the_reply_until_response_create(server):
    clip = prompt_clip(14)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        await carrier.send({"type": "input_audio_buffer.commit", "event_id": "evt_empty"})
        err = await carrier.next_event("error", timeout=10)
        assert err["error"]["code"] == "input_audio_buffer_commit_empty" and err["error"]["event_id"] == "evt_empty"
        # Speech and a long silence: no server VAD, so nothing happens by itself.
        await carrier.say(with_silence(clip.load(24000), 24000, 2.0), speed=None)
        await asyncio.sleep(1.0)
        assert not carrier.of("input_audio_buffer.speech_started")
        assert not carrier.of("input_audio_buffer.committed")
        await carrier.send({"type": "input_audio_buffer.commit"})
        completed = await carrier.next_event("conversation.item.input_audio_transcription.completed")
        assert word_error_rate(clip.reference, completed["transcript"]) <= 0.35, completed
        await asyncio.sleep(1.5)  # the reply is generated meanwhile, but held
        assert not carrier.of("response.created") and not carrier.of("response.output_text.delta")
        # A cancel cannot reach a reply the client was never shown (it was
        # cancelled silently, and the create below got it back "cancelled").
        mark = len(carrier.events)
        await carrier.send({"type": "response.cancel"})
        err = await carrier.next_event("error", after=mark, timeout=10)
        assert err["error"]["code"] == "response_cancel_not_active", err
        mark = len(carrier.events)
        await carrier.send({"type": "response.create"})
        await carrier.next_event("response.created", after=mark, timeout=5)
        done = await carrier.next_event("response.done", after=mark)
        assert done["response"]["status"] == "completed" and done["response"]["output"][0]["content"][0]["text"]


async def test_realtime_a_held_reply_written_before_new_context_is_written_again(server, monkeypatch):
    """The manual flow: commit, add what was looked up (a text item), then
    response.create. The reply held since the commit was written without
    the item, and the create released it as it was. Now it is dropped
    unseen and the create answers the conversation with the item in it."""
    clip = prompt_clip(14)
    prompts = _watched_prompts(server, monkeypatch)
    note = "Looked up: the caller's booking reference is QX-7731, ferry at 9:40."
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None)
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            await carrier.say(with_silence(clip.load(24000), 24000, 0.5), speed=None)
            await carrier.send({"type": "input_audio_buffer.commit"})
            completed = await carrier.next_event("conversation.item.input_audio_transcription.completed", timeout=60)
            async with asyncio.timeout(30):  # the held reply is being written
                while not prompts:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert all(note not in m["content"] for m in prompts[0])
            await carrier.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "system", "content": [{"type": "input_text", "text": note}]}})  # fmt: skip
            await carrier.next_event("conversation.item.added", timeout=10,
                                     after=carrier.events.index(completed))  # fmt: skip
            mark = len(carrier.events)
            await carrier.send({"type": "response.create", "event_id": "evt_after_note"})
            done = await carrier.next_event("response.done", after=mark, timeout=90)
            assert done["response"]["status"] == "completed", done
            assert len(carrier.of("response.created")) == 1  # the held one was never shown
            answered = prompts[-1]
            assert any(note in m["content"] for m in answered), answered
            assert any(completed["transcript"] in m["content"] for m in answered if m["role"] == "user"), answered
            # The caller's words stay their turn; the dropped reply is not in the history.
            said = [m for m in call.session.history.messages_so_far if m["role"] == "assistant"]
            assert [m["content"] for m in said] == [done["response"]["output"][0]["content"][0]["text"]], said
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_a_caller_who_resumes_right_after_the_reply_began_is_one_item(server):
    """A caller who goes on within the resume grace after the reply began
    was not done: the server takes their turn and its reply out of the
    conversation and answers both halves as one item. The client is told
    (conversation.item.deleted for both): it kept the first half's item and
    the reply, then got an item holding both halves' words."""
    first, second = by_name("all-circuits-busy-now"), by_name("conf-now-recording")
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, instructions=STORY)
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            await carrier.say(with_silence(first.load(24000), 24000, 1.5), speed=4.0)
            await carrier.next_event("response.output_text.delta", timeout=60)
            seen = len(carrier.events)
            await carrier.say(with_silence(second.load(24000), 24000, 1.5), speed=4.0)
            resumed = await watcher.wait_event(call, "turn.resumed", timeout=20)
            half = carrier.of("conversation.item.input_audio_transcription.completed")[0]["item_id"]
            reply = carrier.of("response.output_item.added")[0]["item"]["id"]
            both = await carrier.next_event("conversation.item.input_audio_transcription.completed", after=seen)
            text = f"{first.reference} {second.reference}"
            assert word_error_rate(text, both["transcript"]) <= 0.4, (text, both["transcript"])
            async with asyncio.timeout(30):
                while {e["item_id"] for e in carrier.of("conversation.item.deleted")} != {half, reply}:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            added = [e for e in carrier.of("conversation.item.added") if e["item"]["id"] == both["item_id"]]
            assert added and added[0]["previous_item_id"] not in (half, reply), added
            done = await carrier.next_event("response.done", after=seen, timeout=90)
            while done["response"]["output"][0]["id"] == reply:
                done = await carrier.next_event("response.done", after=carrier.events.index(done) + 1, timeout=90)
            assert done["response"]["status"] == "completed", done
            assert resumed["turn"] not in call.session.history.asked


async def test_realtime_a_create_cancelled_before_its_turn_decoded_is_answered_cancelled(server):
    """Push-to-talk: response.create then response.cancel while the
    committed turn still decodes. No response existed yet, so the cancel
    said nothing and a client waiting on its response.done hung; now it gets
    the created/done pair of a response cancelled at once, and the turn's
    reply, generated after, stays held (never shown)."""
    clip = prompt_clip(14)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        await carrier.say(with_silence(clip.load(24000), 24000, 0.5), speed=None)
        await carrier.send({"type": "input_audio_buffer.commit"})
        await carrier.send({"type": "response.create"})
        await carrier.send({"type": "response.cancel"})
        done = await carrier.next_event("response.done", timeout=30)
        assert not carrier.of("conversation.item.input_audio_transcription.completed")  # before the transcript
        created = carrier.of("response.created")
        assert len(created) == 1 and created[0]["response"]["id"] == done["response"]["id"], created
        assert done["response"]["status"] == "cancelled", done
        assert done["response"]["status_details"]["reason"] == "client_cancelled" and done["response"]["output"] == []
        await carrier.next_event("conversation.item.input_audio_transcription.completed", timeout=60)
        await asyncio.sleep(1.5)  # the reply is generated meanwhile, but held
        assert len(carrier.of("response.created")) == 1 and not carrier.of("response.output_text.delta")
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_a_create_while_the_next_turn_decodes_answers_that_turn(server):
    """Push-to-talk: turn 1's reply is held; the client commits turn 2 and
    sends response.create while it decodes. The conversation ends with turn
    2 now: the create is answered by turn 2's reply (it released turn 1's,
    written without turn 2, and turn 2's stayed held and unseen)."""
    first, second = prompt_clip(14), prompt_clip(15)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None)
    with CallWatcher() as watcher:
        async with carrier:
            call = await _first_turn_held(carrier, watcher, first)
            # Past the resume grace: turn 2 is a turn of its own.
            await asyncio.sleep(server.runtime.config.asr.resume_grace_s + 0.3)
            mark = len(carrier.events)
            await carrier.say(with_silence(second.load(24000), 24000, 0.5), speed=None)
            await carrier.send({"type": "input_audio_buffer.commit"})
            await carrier.send({"type": "response.create", "event_id": "evt_turn2"})
            completed = await carrier.next_event("conversation.item.input_audio_transcription.completed", after=mark)
            done = await carrier.next_event("response.done", after=mark, timeout=90)
            assert done["response"]["status"] == "completed", done
            assert len(carrier.of("response.created")) == 1
            added = [e for e in carrier.of("conversation.item.added") if e["item"]["role"] == "assistant"]
            assert [e["previous_item_id"] for e in added] == [completed["item_id"]], added
            assert 1 not in call.session.history.replies
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_a_create_with_its_own_instructions_is_not_given_the_held_reply(server, monkeypatch):
    """Push-to-talk: a reply is held since the commit; response.create then
    gives instructions of its own ("answer in French" style). The held reply
    was written without them, and the create released it as it was; now it
    is dropped unseen and the create is answered with its instructions."""
    clip = prompt_clip(14)
    prompts = _watched_prompts(server, monkeypatch)
    own = "Answer with one short sentence that names the caller's ferry, the 9:40 to Oban."
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        await carrier.say(with_silence(clip.load(24000), 24000, 0.5), speed=None)
        await carrier.send({"type": "input_audio_buffer.commit"})
        await carrier.next_event("conversation.item.input_audio_transcription.completed", timeout=60)
        async with asyncio.timeout(30):  # the held reply is being written
            while not prompts:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert all(own not in m["content"] for m in prompts[0])
        await carrier.send({"type": "response.create", "response": {"instructions": own}})
        done = await carrier.next_event("response.done", timeout=90)
        assert done["response"]["status"] == "completed", done
        assert len(carrier.of("response.created")) == 1  # the held one was never shown
        assert any(own in m["content"] for m in prompts[-1] if m["role"] == "system"), prompts[-1]
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_speech_after_a_commit_is_the_next_item(server):
    """Push-to-talk: the client commits and goes on appending before the
    committed turn's transcript is out. The new speech's transcription
    deltas named the committed item (its id changed only at the
    transcript); the commit closes the item now. (The new speech's partial
    is handed to the live call right after the commit: on real audio it
    comes too late or too early to be put there on cue.)"""
    from voice.transports.realtime import input_audio_buffer

    clip = prompt_clip(14)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None)
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            audio = with_silence(clip.load(24000), 24000, 0.5)
            await carrier.say(audio, speed=None)
            async with asyncio.timeout(10):  # all of it in the buffer
                while call.session._fed_s < len(audio) / 24000 - 0.05:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await input_audio_buffer.commit(call, {"type": "input_audio_buffer.commit"})
            await call._on_partial(call.session._turn_index + 1, "and one more thing")
            delta = await carrier.next_event("conversation.item.input_audio_transcription.delta", timeout=10)
            completed = await carrier.next_event("conversation.item.input_audio_transcription.completed", timeout=60)
            assert delta["item_id"] != completed["item_id"], (delta, completed)
            committed = carrier.of("input_audio_buffer.committed")
            assert [c["item_id"] for c in committed] == [completed["item_id"]], committed


async def test_realtime_reply_instructions_that_leave_no_room_are_refused(server):
    """response.create with instructions of its own that, beside the call's
    prompt, leave the model no room: they were only held to 32K characters,
    the engine refused the prompt, and each refusal made every later prompt
    of the call a quarter smaller. Refused now (context_too_large), nothing
    sent to the engine."""
    from voice.transports.realtime.protocol import MAX_INSTRUCTIONS

    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.updated", timeout=10)
            scale = call.session.token_scale
            text = ("Answer in one short sentence. " * 2000)[: MAX_INSTRUCTIONS - 100]
            await carrier.send({"type": "response.create", "event_id": "evt_long", "response": {"instructions": text}})
            error = await carrier.next_event("error", timeout=10)
            assert error["error"]["code"] == "context_too_large", error
            assert error["error"]["param"] == "response.instructions" and error["error"]["event_id"] == "evt_long"
            await asyncio.sleep(0.3)
            assert not carrier.of("response.created") and call.session.token_scale == scale


async def test_realtime_settings_keep_no_nested_values(server):
    """turn_detection and transcription are echoed in every session object:
    whatever a client nested in them was kept whole and sent back with every
    session.updated (500 levels deep here; past the parser's limit the server
    and its clients cannot read it). Only flat fields are kept."""
    deep = '{"a":' * 500 + "1" + "}" * 500
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        mark = len(carrier.events)
        assert carrier.ws is not None
        await carrier.ws.send(
            '{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {'
            f'"turn_detection": {{"type": "server_vad", "silence_duration_ms": 600, "nested": {deep}}}, '
            f'"transcription": {{"model": "whisper-1", "nested": {deep}}}}}}}}}}}'
        )
        updated = await carrier.next_event("session.updated", timeout=10, after=mark)
        echoed = updated["session"]["audio"]["input"]
        assert echoed["turn_detection"] == {"type": "server_vad", "silence_duration_ms": 600}, echoed
        assert echoed["transcription"] == {"model": "whisper-1"}, echoed
        mark = len(carrier.events)
        await carrier.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}})
        await carrier.next_event("session.updated", timeout=10, after=mark)
        assert not carrier.closed.is_set()
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_a_held_reply_released_mid_generation_keeps_its_order(server):
    """response.create releases a reply still being written: what was held
    goes out first, then what is written meanwhile, in the order written.
    Sends that wait (a client reading slowly; here each forward sleeps)
    let new deltas overtake the held ones: the client's text came out of
    order."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None,
                           instructions=STORY)  # fmt: skip
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            call.session.max_tokens = 200
            # No sentence cap: the reply is still being written at the create.
            call.session.reply_policy = dataclasses.replace(call.session.reply_policy, max_sentences=0)
            emitted: list[dict] = []
            emit, slow_forward = call.session.emit, call.forward

            async def emit_seen(ev):
                emitted.append(ev)
                await emit(ev)

            async def forward(ev):
                await asyncio.sleep(0.2)
                await slow_forward(ev)

            call.session.emit, call.forward = emit_seen, forward
            await carrier.say(with_silence(prompt_clip(14).load(24000), 24000, 1.0), speed=None)
            await carrier.send({"type": "input_audio_buffer.commit"})
            async with asyncio.timeout(60):
                while not any(e["type"] == "response.delta" for e in emitted):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # a few deltas held, more to come
            assert not any(e["type"] == "response.done" for e in emitted), "the reply was written before the create"
            await carrier.send({"type": "response.create"})
            await carrier.next_event("response.done", timeout=90)
            written = " ".join(e["text"] for e in emitted if e["type"] == "response.sentence")
            sent = "".join(e["delta"] for e in carrier.of("response.output_text.delta"))
            assert sent == written, (sent, written)


async def test_realtime_a_long_append_lets_other_calls_run_between_its_frames(server):
    """One append may carry 15 s of audio, fed to the session in frames;
    each frame is VAD work on the shared event loop, and the frames ran back
    to back with nothing else in between. Here a task counts its turns on
    the loop, and each frame sees the count move on."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.updated", timeout=10)
            seen_at_frame: list[int] = []
            feed = call.audio
            with LoopTurns() as turns:

                async def counted(payload, message_s=None):
                    seen_at_frame.append(turns.count)
                    await feed(payload, message_s)

                call.audio = counted
                audio = float_to_int16(np.zeros(24000 * 5, np.float32)).tobytes()  # 5 s: several frames
                await carrier.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()})
                async with asyncio.timeout(10):
                    while len(seen_at_frame) < 4:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
            assert all(b > a for a, b in itertools.pairwise(seen_at_frame)), seen_at_frame


async def test_realtime_text_deltas_add_up_to_what_was_said(server):
    """The text deltas are the sentences the caller was sent: the model's
    own tokens past the sentence cap (here one sentence) were sent as
    deltas too, and the deltas did not add up to response.done's text."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, instructions=STORY)
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            call.session.reply_policy = dataclasses.replace(call.session.reply_policy, max_sentences=1)
            generated: list[str] = []
            emit = call.session.emit

            async def emit_seen(ev):
                if ev["type"] == "response.delta":
                    generated.append(ev["text"])
                await emit(ev)

            call.session.emit = emit_seen
            await carrier.say(with_silence(prompt_clip(14).load(24000), 24000, 1.0), speed=None)
            done = await carrier.next_event("response.done", timeout=90)
            said = done["response"]["output"][0]["content"][0]["text"]
            deltas = "".join(e["delta"] for e in carrier.of("response.output_text.delta"))
            assert deltas == said and said, (deltas, said)
            assert len("".join(generated).strip()) > len(said), "the model stopped at the cap by itself: nothing tested"


async def test_realtime_a_held_reply_never_asked_for_leaves_the_conversation(server):
    """Push-to-talk: a turn's reply is generated and held; the client never
    asks for it and commits another turn. That reply was never said, so it
    is not in the history the next turn is answered with, even when it had
    finished before the next turn came."""
    first, second = prompt_clip(14), prompt_clip(15)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None)
    with CallWatcher() as watcher:
        async with carrier:
            call = await _first_turn_held(carrier, watcher, first)
            history = call.session.history
            # Past the resume grace: the next commit is a turn of its own, not
            # the first one resumed (which would retract it whole).
            await asyncio.sleep(server.runtime.config.asr.resume_grace_s + 0.3)
            mark = len(carrier.events)
            await carrier.say(with_silence(second.load(24000), 24000, 0.5), speed=None)
            await carrier.send({"type": "input_audio_buffer.commit"})
            await carrier.next_event("conversation.item.input_audio_transcription.completed", after=mark)
            assert 1 not in history.replies
            assert [m["role"] for m in history.messages_so_far] == ["user"], history.messages_so_far


@pytest.mark.parametrize("audio_out", [True, False], ids=["audio", "text"])
async def test_realtime_a_fallback_reply_opens_before_its_audio(server, audio_out):
    """A 1-token cap leaves no sentence, so the reply policy speaks its
    fallback: a reply whose words no model delta carried. Its
    response.created and item still come before its first audio delta,
    and a delta carries its words. The cap cut the reply: it is
    ``incomplete`` (max_output_tokens), as OpenAI says of one."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=audio_out)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        mark = len(carrier.events)
        await carrier.send({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 1}})
        await carrier.next_event("session.updated", timeout=10, after=mark)
        await carrier.say(with_silence(prompt_clip(16).load(8000), 8000, 1.3), speed=None)
        done = await carrier.next_event("response.done", timeout=60)
        kinds = [e.get("type") for e in carrier.events]
    content = done["response"]["output"][0]["content"][0]
    said = content["transcript"] if audio_out else content["text"]
    assert said, done
    assert done["response"]["status"] == "incomplete", done
    assert done["response"]["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}, done
    assert done["response"]["output"][0]["status"] == "incomplete", done
    deltas = carrier.of("response.output_audio_transcript.delta" if audio_out else "response.output_text.delta")
    assert "".join(d["delta"] for d in deltas).endswith(said), (deltas, said)
    if audio_out:
        assert "response.output_audio.delta" in kinds, kinds
        assert kinds.index("response.created") < kinds.index("response.output_audio.delta"), kinds


async def test_realtime_a_commit_with_no_words_is_answered_with_an_empty_item(server, monkeypatch):
    """A push-to-talk commit whose audio Whisper hears no words in (a cough)
    still closes the commit: committed, an item with an empty transcript,
    and no response of its own, so a client waiting on its commit is not
    left hanging. A response.create sent while it decoded is answered as
    one sent now, on the conversation as it stands (it was dropped, and a
    client waiting for its response.done hung). (The session emits
    turn.empty for it, voice/call/turn.py; real audio that passes the VAD
    and decodes to nothing cannot be picked reliably, so the event is given
    to the live call here.)"""
    async with _started_call(server, turn_detection=None) as (carrier, call):
        mark = len(carrier.events)
        await call.on_session_event({"type": "turn.empty", "turn": 1, "audio_end_ms": 900})
        await carrier.next_event("input_audio_buffer.committed", timeout=10, after=mark)
        done = await carrier.next_event("conversation.item.input_audio_transcription.completed", after=mark)
        assert done["transcript"] == ""
        await asyncio.sleep(0.3)
        assert not carrier.of("response.created") and 1 not in call.responses
        call.response_requested = True  # a response.create sent while the next one decoded
        mark = len(carrier.events)
        # The session says a turn was empty from inside that turn's own task,
        # still running: the create is answered once it is over (it was
        # deferred again, to the next spoken turn).
        winding_down = [True]
        monkeypatch.setattr(call.session, "reply_in_flight", lambda: winding_down[0])
        await call.on_session_event({"type": "turn.empty", "turn": 2, "audio_end_ms": 1900})
        await asyncio.sleep(0.2)
        assert not carrier.of("response.created")
        winding_down[0] = False
        await carrier.next_event("response.created", timeout=10, after=mark)
        answered = await carrier.next_event("response.done", timeout=60, after=mark)
        assert answered["response"]["status"] == "completed" and not call.response_requested
        # A turn whose transcription failed: the same (it was dropped).
        call.response_requested = True
        mark = len(carrier.events)
        await call.on_session_event({"type": "error", "code": "asr_failed", "message": "the decode failed"})
        failed = await carrier.next_event("conversation.item.input_audio_transcription.failed", timeout=10, after=mark)
        # As OpenAI: the item it names was committed and added first, and no error event.
        kinds = [e["type"] for e in carrier.events[mark:]]
        committed = await carrier.next_event("input_audio_buffer.committed", timeout=10, after=mark)
        added = await carrier.next_event("conversation.item.added", timeout=10, after=mark)
        assert committed["item_id"] == added["item"]["id"] == failed["item_id"], (committed, added, failed)
        failed_at = kinds.index("conversation.item.input_audio_transcription.failed")
        assert kinds.index("conversation.item.added") < failed_at, kinds
        assert "error" not in kinds, kinds
        await carrier.next_event("response.created", timeout=10, after=mark)
        answered = await carrier.next_event("response.done", timeout=60, after=mark)
        assert answered["response"]["status"] == "completed" and not call.response_requested


async def test_realtime_words_after_a_clear_are_a_new_item(server):
    """Deltas of words heard after input_audio_buffer.clear go out under a
    new item: the turn number does not move on a clear, and the cleared
    words' prefix blocked every delta of the new ones. (The partials are
    given to the live call: which words a real partial decode has at a
    given moment cannot be scripted.)"""
    async with _started_call(server) as (carrier, call):
        delta = "conversation.item.input_audio_transcription.delta"
        await call.on_session_event({"type": "transcript.partial", "turn": 1, "text": "I want to cancel"})
        first = await carrier.next_event(delta, timeout=10)
        await carrier.send({"type": "input_audio_buffer.clear"})
        await carrier.next_event("input_audio_buffer.cleared", timeout=10)
        mark = len(carrier.events)
        await call.on_session_event({"type": "transcript.partial", "turn": 1, "text": "Hello"})
        second = await carrier.next_event(delta, timeout=10, after=mark)
        assert second["delta"] == "Hello" and second["item_id"] != first["item_id"], (first, second)


async def test_realtime_speech_after_the_endpoint_is_the_next_item_with_barge_in_off(server):
    """interrupt_response false: speech that starts after speech_stopped but
    before the transcript is the next item (the turn before it goes on): its
    speech_started named the item being committed, so a client tied the new
    speech to the old turn. (Session events given to the live call: when a
    final decode lands against the next words cannot be scripted with audio.)"""
    from benchmarks.callers.realtime import SERVER_VAD

    started, stopped = "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"
    committed = "input_audio_buffer.committed"
    async with _started_call(server, turn_detection={**SERVER_VAD, "interrupt_response": False}) as (carrier, call):
        await call.on_session_event({"type": "speech.started", "audio_ms": 100, "barge_in": False})
        first = await carrier.next_event(started, timeout=10)
        await call.on_session_event({"type": "speech.stopped", "audio_end_ms": 900})
        first_stopped = await carrier.next_event(stopped, timeout=10)
        mark = len(carrier.events)
        await call.on_session_event({"type": "speech.started", "audio_ms": 1000, "barge_in": False})
        second = await carrier.next_event(started, timeout=10, after=mark)
        await call.on_session_event({"type": "turn.empty", "turn": 1, "audio_end_ms": 900})
        first_committed = await carrier.next_event(committed, timeout=10)
        assert first["item_id"] == first_stopped["item_id"] == first_committed["item_id"], (first, first_committed)
        assert second["item_id"] != first_committed["item_id"], (second, first_committed)
        mark = len(carrier.events)
        await call.on_session_event({"type": "speech.stopped", "audio_end_ms": 1800})
        await call.on_session_event({"type": "turn.empty", "turn": 2, "audio_end_ms": 1800})
        second_committed = await carrier.next_event(committed, timeout=10, after=mark)
        second_stopped = carrier.of(stopped)[-1]
        assert second["item_id"] == second_stopped["item_id"] == second_committed["item_id"], (second, second_committed)
        assert second_committed["previous_item_id"] == first_committed["item_id"]


@pytest.mark.parametrize("barge_in", [True, False])
async def test_realtime_a_turn_talked_over_before_its_transcript_is_one_item(server, barge_in):
    """The caller talks on after speech_stopped and the turn before is
    stopped before its transcript: its words lead the next transcript. With
    barge-in on, the new speech reopens the item (it was left open, never
    committed, and every later item's id was one behind); with it off, the
    new speech's item is the one committed, with its own speech_stopped (it
    was held back, and the merged words were committed under the old id)."""
    from benchmarks.callers.realtime import SERVER_VAD

    started, stopped = "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"
    detection = {**SERVER_VAD, "interrupt_response": barge_in}
    async with _started_call(server, turn_detection=detection) as (carrier, call):
        flag = {} if barge_in else {"barge_in": False}
        await call.on_session_event({"type": "speech.started", "audio_ms": 100, **flag})
        first = await carrier.next_event(started, timeout=10)
        await call.on_session_event({"type": "speech.stopped", "audio_end_ms": 900})
        await carrier.next_event(stopped, timeout=10)
        mark = len(carrier.events)
        await call.on_session_event({"type": "speech.started", "audio_ms": 1000, **flag})
        second = await carrier.next_event(started, timeout=10, after=mark)
        # Turn 1 is stopped, its words fold into turn 2: no event of its own.
        await call.on_session_event({"type": "speech.stopped", "audio_end_ms": 1800})
        second_stopped = await carrier.next_event(stopped, timeout=10, after=mark)
        await call.on_session_event({"type": "turn.empty", "turn": 2, "audio_end_ms": 1800})
        done = await carrier.next_event("input_audio_buffer.committed", timeout=10, after=mark)
        assert second["item_id"] == second_stopped["item_id"] == done["item_id"], (second, second_stopped, done)
        assert (second["item_id"] == first["item_id"]) is barge_in
        mark = len(carrier.events)
        await call.on_session_event({"type": "speech.started", "audio_ms": 2000, **flag})
        third = await carrier.next_event(started, timeout=10, after=mark)
        assert third["item_id"] not in (first["item_id"], second["item_id"]), third


async def test_realtime_a_reply_the_engine_failed_is_failed_not_cancelled(server):
    """A reply whose engine failed ended as status "cancelled" with reason
    "turn_detected", as if the caller had talked over it. (The session's
    done event is given to the live call: an engine failure of one call's
    reply cannot be caused without failing the shared engine.)"""
    from voice.transports.realtime import response as response_family

    async with _started_call(server) as (carrier, call):
        response = response_family.Response(7, user_item_id="", released=True)
        call.responses[7] = response
        response.done = {"type": "response.done", "turn": 7, "text": "", "cancelled": True,
                         "reply_end": "failed", "error_code": "llm_failed", "usage": {}}  # fmt: skip
        response.metrics = {"fallback": False}
        await response_family.finish(call, response)
        done = await carrier.next_event("response.done", timeout=10)
        assert done["response"]["status"] == "failed", done
        assert done["response"]["status_details"]["error"]["code"] == "llm_failed", done
        assert done["response"]["status_details"]["error"]["message"], done  # pipecat reads it
        # The failure line the caller heard in its place: said, still failed.
        line = ReplyPolicy.failure_line
        said = response_family.Response(8, user_item_id="", released=True)
        call.responses[8] = said
        await call.on_session_event({"type": "response.sentence", "turn": 8, "index": 0, "text": line, "first": True})
        said.done = {"type": "response.done", "turn": 8, "text": line, "cancelled": True,
                     "reply_end": "failed", "error_code": "llm_unavailable", "usage": {}}  # fmt: skip
        said.metrics = {"fallback": False}
        await response_family.finish(call, said)
        done = await carrier.next_event("response.done", timeout=10, after=carrier.events.index(done) + 1)
        assert done["response"]["status"] == "failed", done
        assert done["response"]["status_details"]["error"]["code"] == "llm_unavailable", done
        content = done["response"]["output"][0]["content"][0]
        assert line in (content.get("text"), content.get("transcript")), done


async def test_realtime_a_sentence_whose_audio_failed_leaves_the_item(server, monkeypatch):
    """The voice fails on the reply's first sentence (fault injected into
    the real TTS). The caller never heard it: the reply item the client
    keeps (its transcript, response.done's output) says what went out, as
    the server's history does; it used to keep the whole text."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm")
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            await carrier.say(np.zeros(2400, np.float32), speed=None)  # starts the call
            call = await watcher.one()
            call.session.history.system_prompt = STORY  # sentences after the one that fails
            async with asyncio.timeout(10):
                while call.playout is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            failed = fail_next_sentence_voice(call, monkeypatch)
            await carrier.say(with_silence(prompt_clip(15).load(carrier.rate), carrier.rate, 1.3), speed=None)
            done = await carrier.next_event("response.done", timeout=120)
            sentences = [e["text"] for e in watcher.of(call, "response.sentence")]
            assert failed == sentences[:1] and len(sentences) > 1, (failed, sentences)
            went_out = " ".join(sentences[1:])
            transcript = carrier.of("response.output_audio_transcript.done")[0]["transcript"]
            assert transcript == went_out, (transcript, sentences)
            assert done["response"]["output"][0]["content"][0]["transcript"] == went_out, done
            assert done["response"]["status"] in ("completed", "incomplete"), done
            replies = [m["content"] for m in call.session.history.messages_so_far if m["role"] == "assistant"]
            assert replies == [went_out], replies


async def test_realtime_a_failed_reply_not_yet_asked_for_keeps_its_error(server):
    """With create_response false the caller's turn is answered but held
    until the client's response.create. Its engine failure went out at once
    as an error for a reply the client never asked for (pipecat ends its
    session on any error); it is held with the reply's other events, and
    dropped unseen with them."""
    from voice.transports.realtime import response as response_family

    async with _started_call(server) as (carrier, call):
        response = response_family.Response(9, user_item_id="item_x")  # not released: held
        call.responses[9] = response
        failure = {"type": "error", "code": "llm_failed", "message": "the reply failed", "turn": 9}
        await call._on_session_event(failure)
        await asyncio.sleep(0.2)
        assert not carrier.of("error") and failure in response.held, carrier.of("error")
        # An error of no held reply still goes out at once.
        await call._on_session_event({"type": "error", "code": "llm_unavailable", "message": "no engine"})
        err = await carrier.next_event("error", timeout=10)
        assert err["error"]["code"] == "llm_unavailable", err


async def test_realtime_a_reply_not_yet_asked_for_is_saved_as_not_said(server):
    """A reply held for the client's response.create (create_response
    false) was saved whole, as heard, when the socket dropped: a client that
    re-attached had a model that believed it said what nobody was shown."""
    from voice.transports.realtime import response as response_family

    async with _started_call(server) as (_carrier, call):
        call.responses[9] = response_family.Response(9, user_item_id="item_x")  # held
        call.responses[10] = response_family.Response(10, user_item_id="item_y", released=True)  # shown
        heard = call.heard_so_far()
        assert heard.get(9) == "" and 10 not in heard, heard


async def test_realtime_the_servers_greeting_is_not_spoken_unseen(server, monkeypatch):
    """With --greeting set, a Realtime session generated the greeting with no
    response to carry it (never seen, never heard, yet in the history) and
    refused the client's own first response.create as already in progress.
    A Realtime client greets with response.create, as on OpenAI."""
    monkeypatch.setattr(server.runtime.config, "greeting", "Hello, thanks for calling Acme.")
    async with _started_call(server) as (carrier, call):
        await asyncio.sleep(0.5)
        assert not call.session.history.messages_so_far
        await carrier.send({"type": "response.create"})
        done = await carrier.next_event("response.done", timeout=60)
        assert done["response"]["status"] == "completed" and not carrier.of("error"), carrier.of("error")


async def test_realtime_a_reply_cancelled_before_its_first_token_leaves_the_callers_turn(server, monkeypatch):
    """The client cancels a reply before its first token (it waits for the
    one first-sentence lane, held here by another call's turn): the
    caller's words, which the client already has as an item, stay a turn
    in the history. They were carried over to lead the caller's next words,
    so a response.create was answered as if the caller had said nothing,
    and the words came back twice later."""
    first_sentences = server.runtime.first_sentences
    assert first_sentences is not None
    monkeypatch.setattr(first_sentences, "lanes", 1)
    other = object()  # another call's turn, holding the one lane
    await first_sentences.lane(other, lambda: True)
    try:
        carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
        with CallWatcher() as watcher:
            async with carrier:
                await carrier.next_event("session.updated", timeout=10)
                clip = prompt_clip(13)
                await carrier.say(with_silence(clip.load(8000), 8000, 1.3), speed=None)
                done_words = "conversation.item.input_audio_transcription.completed"
                words = (await carrier.next_event(done_words, timeout=60))["transcript"]
                await carrier.next_event("response.created", timeout=30)
                await carrier.send({"type": "response.cancel"})
                done = await carrier.next_event("response.done", timeout=30)
                assert done["response"]["status"] == "cancelled", done
                session = (await watcher.one()).session
                assert session.carry_over == "", session.carry_over
                assert {"role": "user", "content": words} in session.history.messages_so_far
    finally:
        first_sentences.leave(other)


async def test_realtime_without_interrupt_no_turn_is_prepared_while_the_reply_goes_on(server):
    """interrupt_response false: the reply being written goes on while the
    caller talks. A turn prepared at the caller's pause (preemptive) would
    be answered without that reply's exchange, which joins the history only
    when it ends; none is prepared while it goes on. (The pause is handed to
    the live session: a pause that lands while a reply is still being
    written cannot be timed with audio.)"""
    from asr.turns import Paused
    from benchmarks.callers.realtime import SERVER_VAD

    settings = {"instructions": STORY, "turn_detection": {**SERVER_VAD, "interrupt_response": False}}
    async with _started_call(server, **settings) as (carrier, call):
        await carrier.send({"type": "response.create"})
        await carrier.next_event("response.output_text.delta", timeout=60)
        session = call.session
        assert session.reply_in_flight()
        session._on_pause(Paused(np.zeros(16000, np.float32), 0.5))
        assert session._pending is None
        await carrier.send({"type": "response.cancel"})
        await carrier.next_event("response.done", timeout=30)
        session._on_pause(Paused(np.zeros(16000, np.float32), 0.5))  # no reply going on: prepared as ever
        assert session._pending is not None


async def test_realtime_response_cancel_and_truncate_barge_in(server):
    """The caller talks over the spoken reply and the client truncates the
    reply's item at what it played (the fake does on speech_started, as
    OpenAI's clients do): the truncate is answered, not refused, and the
    history keeps only what played (barge_in_call). The reply's audio may
    all be sent by then (its response.done out, "completed", as on OpenAI),
    or not (the barge-in cancels it)."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu")
    await barge_in_call(server, carrier, needs_mark=False)
    assert not carrier.of("error"), carrier.of("error")
    first = carrier.of("response.done")[0]["response"]
    assert first["status"] in ("completed", "cancelled"), first.get("status_details")
    truncated = carrier.of("conversation.item.truncated")
    assert truncated, "the client's truncate was not answered"
    assert truncated[0]["item_id"] == first["output"][0]["id"]
    assert truncated[0]["audio_end_ms"] > 0  # it had played some of it (2.5 s in)


async def test_realtime_push_to_talk_speech_does_not_stop_the_reply(server):
    """turn_detection null: the client runs its own VAD and cancels a reply
    itself (OpenAI does not interrupt with its VAD off). The server's VAD
    cut the reply anyway ("cancelled", "turn_detected", with no
    speech_started to explain it)."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, turn_detection=None,
                           instructions=STORY)  # fmt: skip
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        await carrier.say(with_silence(prompt_clip(15).load(24000), 24000, 0.5), speed=None)
        await carrier.send({"type": "input_audio_buffer.commit"})
        await carrier.send({"type": "response.create"})
        await carrier.next_event("response.output_text.delta", timeout=60)
        await carrier.say(prompt_clip(16).load(24000), speed=None)  # talks over it, no commit
        done = await carrier.next_event("response.done", timeout=60)
        assert done["response"]["status"] == "completed", done["response"].get("status_details")


async def test_realtime_response_cancel(server):
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, instructions=STORY)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        await carrier.send({"type": "response.cancel", "event_id": "evt_c0"})
        err = await carrier.next_event("error", timeout=10)
        assert err["error"]["code"] == "response_cancel_not_active"
        await carrier.say(with_silence(prompt_clip(15).load(24000), 24000, 1.3), speed=None)
        await carrier.next_event("response.output_text.delta")
        await carrier.send({"type": "response.cancel"})
        done = await carrier.next_event("response.done")
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "client_cancelled"


async def _story_call(server, carrier, watcher):
    """A call on a long spoken reply whose audio goes out at the pace of
    playback (as a carrier's does), so the reply is long in flight after
    its text is all written."""
    call = await watcher.one()
    call.session.history.system_prompt = STORY
    call.session.max_tokens = 400
    await carrier.say(with_silence(prompt_clip(15).load(carrier.rate), carrier.rate, 1.3), speed=None)
    await carrier.next_event("response.output_audio.delta", timeout=60)
    call.playout.lead_s = 0.3
    return call


async def test_realtime_without_interrupt_a_turns_response_waits_for_the_one_still_playing(server):
    """interrupt_response false: the caller speaks while the reply's audio
    still goes out (its text all written). The new turn's response.created
    went out before the playing one's response.done: two responses in
    flight, which OpenAI refuses and clients do not expect (LiveKit's closed
    the new one at the old one's done and lost its reply). It waits."""
    from benchmarks.callers.realtime import SERVER_VAD

    detection = {**SERVER_VAD, "interrupt_response": False}
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", turn_detection=detection)
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            call.session.history.system_prompt = STORY
            call.session.max_tokens = 60
            await carrier.say(with_silence(prompt_clip(15).load(carrier.rate), carrier.rate, 1.3), speed=None)
            await carrier.next_event("response.output_audio.delta", timeout=60)
            call.playout.lead_s = 0.3  # paced as a carrier's: long in flight after its text is written
            await watcher.wait_event(call, "response.done", turn=1, timeout=60)
            await carrier.say(with_silence(prompt_clip(16).load(carrier.rate), carrier.rate, 1.3), speed=None)
            await watcher.wait_event(call, "transcript.final", turn=2, timeout=60)
            assert not carrier.of("response.done"), "the first reply's audio ran out before the second turn"
            async with asyncio.timeout(120):
                while len(carrier.of("response.done")) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
    kinds = [(e["type"], (e.get("response") or {}).get("id")) for e in carrier.events]
    created = [i for i, (kind, _) in enumerate(kinds) if kind == "response.created"]
    done = [i for i, (kind, _) in enumerate(kinds) if kind == "response.done"]
    assert len(created) == 2 and len(done) == 2, kinds
    assert created[0] < done[0] < created[1] < done[1], kinds
    assert kinds[done[0]][1] == kinds[created[0]][1] and kinds[done[1]][1] == kinds[created[1]][1]
    statuses = [e["response"]["status"] for e in carrier.of("response.done")]
    assert statuses == ["completed", "completed"], statuses


async def test_realtime_response_cancel_while_the_written_reply_still_plays(server):
    """The reply's text is all written but its audio still plays (its
    response.done waits for the audio): to the client it is in progress, so
    response.cancel stops it; response.done says cancelled, and the history
    keeps only what the playout clock says was heard. A response.create
    meanwhile is refused."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu")
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await _story_call(server, carrier, watcher)
            await watcher.wait_event(call, "response.done", turn=1, timeout=60)
            assert not carrier.of("response.done"), "the reply's audio ran out before the test could cancel it"
            assert call.playing() == 1
            # A new response now would send this one's audio under its ids:
            # refused, as OpenAI's API refuses one while another is active.
            await carrier.send({"type": "response.create"})
            error = await carrier.next_event("error", timeout=10)
            assert error["error"]["code"] == "conversation_already_has_active_response", error
            await carrier.send({"type": "response.cancel"})
            done = await carrier.next_event("response.done", timeout=30)
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"]["reason"] == "client_cancelled"
            sentences = [e["text"] for e in CallWatcher.of(call, "response.sentence") if e["turn"] == 1]
            reply = call.session.history.replies.get(1)
            heard = reply["content"] if reply is not None else ""
            assert len(sentences) >= 2 and heard != " ".join(sentences), "history kept what was never played"
            assert " ".join(sentences).startswith(heard)


async def test_realtime_truncate_mid_sentence_after_a_barge_in_is_taken(server):
    """The standard client flow: speech over a reply whose audio is all
    sent (response.done out), the client stops playing and truncates where
    it stopped, mid-sentence. The barge-in left the playout only the
    sentences wholly played, and the truncate was refused as past the
    item's audio (an error, counted as malformed)."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu")
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            call.session.history.system_prompt = STORY
            call.session.max_tokens = 120
            await carrier.say(with_silence(prompt_clip(15).load(8000), 8000, 1.3), speed=None)
            await carrier.next_event("response.done", timeout=90)
            item_id = carrier.of("response.output_item.added")[0]["item"]["id"]
            turn = next(r.turn for r in call.responses.values() if r.item_id == item_id)
            assert call.playing() == turn, "the reply had played out: nothing tested"
            assert await call.cut_reply("barge-in") == turn  # what speech over the reply does
            kept_ms = 1000.0 * sum(seconds for _, seconds in call.playout.duration_s(turn))
            sent_ms = sum(len(base64.b64decode(e["delta"])) for e in carrier.of("response.output_audio.delta")) / 8
            stopped_at = kept_ms + 300  # mid-way through the sentence the caller talked over
            assert stopped_at < sent_ms, (stopped_at, sent_ms)
            await carrier.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                                "audio_end_ms": round(stopped_at)})  # fmt: skip
            truncated = await carrier.next_event("conversation.item.truncated", timeout=10)
            assert truncated["audio_end_ms"] == round(stopped_at) and not carrier.of("error"), carrier.of("error")


async def test_realtime_truncate_before_the_reply_is_written_takes(server):
    """A client stops playing a reply and truncates it (here to nothing)
    while the server is still writing it: the truncate arrives before the
    turn has written its history, and still decides what the history keeps."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu")
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            call.session.reply_policy = dataclasses.replace(call.session.reply_policy, max_sentences=0)
            call.session.history.system_prompt = STORY
            call.session.max_tokens = 400
            await carrier.say(with_silence(prompt_clip(15).load(carrier.rate), carrier.rate, 1.3), speed=None)
            await carrier.next_event("response.output_audio.delta", timeout=60)
            assert not CallWatcher.of(call, "response.done"), "the reply was written before its first audio"
            item_id = carrier.of("response.output_item.added")[0]["item"]["id"]
            await carrier.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                                "audio_end_ms": 0})  # fmt: skip
            await carrier.next_event("conversation.item.truncated", timeout=10)
            done = await watcher.wait_event(call, "response.done", turn=1, timeout=60)
            assert done["text"], done
            assert 1 not in call.session.history.replies, call.session.history.replies


async def test_realtime_malformed_events_get_error_events(server):
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu")
    bad = [
        "not json",
        "[1]",
        {"no": "type"},
        {"type": "dance", "event_id": "evt_dance"},
        {"type": "input_audio_buffer.append", "audio": "***"},
        {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}},
        {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}},
        {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "magic"}}}}},
        {"type": "session.update", "session": {"instructions": 7}},
        {"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 10},
        # Over the 1 MiB frame limit: an error event, not a closed socket.
        {"type": "input_audio_buffer.append", "audio": "A" * (1 << 20)},
        {"type": "conversation.item.create", "item": {"type": "message"}},
        {"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "{}"}},
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAAA"}]},
        },
        # A client's item id is echoed in every event about the item: bounded.
        {
            "type": "conversation.item.create",
            "item": {
                "id": "i" * 65,
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            },
        },
        {
            "type": "conversation.item.create",
            "item": {"id": 7, "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        },
    ]
    await malformed_then_call(server, carrier, bad, prompt_clip(16))
    errors = carrier.of("error")
    assert len(errors) == len(bad), [e["error"]["message"] for e in errors]
    assert all(e["error"]["type"] == "invalid_request_error" for e in errors)
    assert any(e["error"]["event_id"] == "evt_dance" and e["error"]["code"] == "invalid_event" for e in errors)
    # The format can't change once audio flows.
    async with FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False) as late:
        await late.say(np.zeros(1600, np.float32), speed=None)
        await late.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}}}}})  # fmt: skip
        err = await late.next_event("error", timeout=10)
        assert err["error"]["code"] == "session_locked"


async def test_realtime_an_error_names_only_the_event_that_caused_it(server):
    """A frame that does not parse, or a binary one, after a good event
    with an event_id: its error named the good event's id."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        for bad in ("not json", b"\x00\x01"):
            mark = len(carrier.events)
            await carrier.send({"type": "input_audio_buffer.clear", "event_id": "evt_ok"})
            await carrier.next_event("input_audio_buffer.cleared", timeout=10, after=mark)
            seen = len(carrier.events)
            await carrier.send(bad)
            error = await carrier.next_event("error", timeout=10, after=seen)
            assert error["error"]["event_id"] is None, (bad, error)


async def test_realtime_session_update_leaves_out_what_it_cannot_serve_without_an_error(server, caplog):
    """Tools, a forced tool choice, a reply speed and noise reduction are not
    served: the rest of the update takes, session.updated reports what is
    served, and no ``error`` event comes (pipecat's client ends its session
    on one, so a bot with tools lost every call); the log names the fields."""
    caplog.set_level(logging.INFO, logger="voice.transports.realtime.session")
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    tool = {"type": "function", "name": "lookup_order", "parameters": {"type": "object", "properties": {}}}
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            assert (await carrier.next_event("session.created", timeout=10))["session"]["instructions"] == ""
            await carrier.next_event("session.updated", timeout=10)
            mark = len(carrier.events)
            await carrier.send({"type": "session.update", "event_id": "evt_tools", "session": {
                "type": "realtime", "instructions": "You are Ada's assistant.", "tools": [tool],
                "tool_choice": "required", "audio": {"input": {"noise_reduction": {"type": "near_field"}},
                                                     "output": {"speed": 1.5}}}})  # fmt: skip
            updated = await carrier.next_event("session.updated", timeout=10, after=mark)
            mark = len(carrier.events)
            # Any error for the first update is on the wire before the
            # second update's answer.
            await carrier.send({"type": "session.update", "session": {"type": "realtime", "tools": [],
                                "tool_choice": "auto", "audio": {"output": {"speed": 1.0}}}})  # fmt: skip
            await carrier.next_event("session.updated", timeout=10, after=mark)
            mark = len(carrier.events)
            # Asked again, it is logged at INFO once a session (a client may
            # send updates as fast as its message allowance).
            await carrier.send({"type": "session.update", "session": {"type": "realtime", "tools": [tool]}})
            await carrier.next_event("session.updated", timeout=10, after=mark)
            assert call.malformed == 0
    assert updated["session"]["instructions"] == "You are Ada's assistant."
    assert updated["session"]["tools"] == [] and updated["session"]["audio"]["output"]["speed"] == 1.0
    assert carrier.of("error") == []
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage() and r.levelname == "INFO"]
    assert len(left_out) == 1, left_out
    for name in ("tools", "tool_choice", "audio.output.speed", "audio.input.noise_reduction"):
        assert name in left_out[0], left_out[0]
    assert "lookup_order" not in left_out[0]  # names only, never the client's values


async def test_realtime_a_response_it_cannot_give_is_refused_not_spoken(server):
    """An out-of-band response (``conversation: "none"``, a classification
    the caller must not hear), one with its own input items, or one in
    another modality than the session's is refused with an error naming
    the field, and nothing is generated or said; a create with the
    session's own modality is answered."""
    async with _started_call(server, turn_detection=None) as (carrier, call):
        refused = [
            ({"conversation": "none", "instructions": "Classify the caller's intent."}, "response.conversation"),
            ({"input": [{"type": "message", "role": "user", "content": []}]}, "response.input"),
            ({"output_modalities": ["audio"]}, "response.output_modalities"),
        ]
        for options, param in refused:
            mark = len(carrier.events)
            await carrier.send({"type": "response.create", "event_id": f"evt_{param}", "response": options})
            error = (await carrier.next_event("error", timeout=10, after=mark))["error"]
            assert (error["code"], error["param"]) == ("unsupported_parameter", param), error
            assert error["event_id"] == f"evt_{param}", error
        assert not carrier.of("response.created") and not call.session.history.replies
        mark = len(carrier.events)
        same = {"output_modalities": ["text"], "conversation": "auto"}
        await carrier.send({"type": "response.create", "response": same})
        done = await carrier.next_event("response.done", timeout=60, after=mark)
    assert done["response"]["status"] == "completed", done
    assert len(carrier.of("error")) == len(refused), carrier.of("error")


async def test_realtime_turn_detection_changes_mid_call_are_applied(server):
    """After audio started, a session.update that changes the silence
    window or interrupt_response is applied to the call (it was echoed and
    ignored), semantic_vad gives firstline's own end of turn back, and a
    switch to push-to-talk is refused with nothing changed."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)

    def td(**kw: object) -> dict[str, object]:
        return {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": kw}}}}

    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.updated", timeout=10)
            await carrier.say(np.zeros(1600, np.float32), speed=None)  # the call starts on its first audio
            session = call.session
            for _ in range(500):
                if session.started:
                    break
                await asyncio.sleep(0.01)
            assert session.asr_config.adaptive_endpoint and session._start.barge_in
            mark = len(carrier.events)
            await carrier.send(td(type="server_vad", silence_duration_ms=1500, interrupt_response=False))
            updated = await carrier.next_event("session.updated", timeout=10, after=mark)
            assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 1500
            assert not session.asr_config.adaptive_endpoint and session.asr_config.endpoint_silence_s == 1.5
            assert session._tracker.config is session.asr_config and session._tracker.endpoint_s == 1.5
            # A pause's decode or probe answering after the switch leaves the client's window alone.
            session._eot_rule = ASRConfig().endpoint_min_s
            session._set_window()
            assert session._tracker.endpoint_s == 1.5
            assert not session._start.barge_in
            mark = len(carrier.events)
            await carrier.send(td(type="semantic_vad"))
            await carrier.next_event("session.updated", timeout=10, after=mark)
            assert session.asr_config.adaptive_endpoint and session._start.barge_in
            assert session.asr_config.end_of_turn == server.runtime.config.asr.end_of_turn
            mark = len(carrier.events)
            await carrier.send({"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"turn_detection": None}}}})  # fmt: skip
            err = await carrier.next_event("error", timeout=10, after=mark)
            assert err["error"]["code"] == "session_locked" and "null" in err["error"]["message"]
            assert session.asr_config.auto_turns and session.asr_config.adaptive_endpoint
            assert call.settings.turn_detection == {"type": "semantic_vad"}


async def test_realtime_text_items_join_the_conversation(server):
    """conversation.item.create with text messages: acknowledged as items,
    and the next audio turn is answered with them in its prompt."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    crm = "The caller is Ada Lovelace, a gold member."
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            nested: object = "deep"
            for _ in range(400):
                nested = [nested]
            await carrier.send({"type": "conversation.item.create", "item": {
                "id": "item_crm", "type": "message", "role": "system",
                "content": [{"type": "input_text", "text": crm, "annotations": nested}]}})  # fmt: skip
            order = [{"type": "input_text", "text": "My order is 4471."}]
            await carrier.send({"type": "conversation.item.create",
                                "item": {"type": "message", "role": "user", "content": order}})  # fmt: skip
            added = await carrier.next_event("conversation.item.added", timeout=10)
            assert added["item"]["id"] == "item_crm" and added["item"]["role"] == "system"
            # Only the parts' type and text come back, not whatever else a client nested in them.
            assert added["item"]["content"] == [{"type": "input_text", "text": crm}]
            await carrier.next_event("conversation.item.done", timeout=10)
            clip = prompt_clip(20)
            await carrier.say(with_silence(clip.load(carrier.rate), carrier.rate, 1.3), speed=None)
            done = await carrier.next_event("response.done", timeout=60)
            assert done["response"]["status"] == "completed", done
            user_items = [e["item"] for e in carrier.of("conversation.item.added") if e["item"]["role"] == "user"]
            assert user_items[0]["content"][0]["text"] == "My order is 4471."
            assert user_items[1]["content"][0]["type"] == "input_audio"  # the spoken turn, after the text one
            messages = call.session.messages("")
            assert crm in messages[0]["content"]
            # A system item extends the server's prompt: its example turns stay.
            examples = call.session.history.examples()
            assert examples and messages[1 : 1 + len(examples)] == examples
            # The text item and the spoken turn are both the caller's: one
            # user message in the prompt (voice/call/history.py alternating).
            first = messages[1 + len(examples)]
            assert first["role"] == "user" and first["content"].startswith("My order is 4471. "), first
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_system_items_outlive_new_instructions(server):
    """The SDK's usual order: instructions in session.update, then a system
    item, then audio. The item joins the instructions when the call starts,
    and new instructions later replace the instructions, not the item."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False, instructions="You are Ada.")
    crm = "The caller is a gold member."
    with CallWatcher() as watcher:
        async with carrier:
            await carrier.next_event("session.updated", timeout=10)
            call = await watcher.one()
            await carrier.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "system", "content": [{"type": "input_text", "text": crm}]}})  # fmt: skip
            await carrier.next_event("conversation.item.done", timeout=10)
            await carrier.say(with_silence(prompt_clip(20).load(carrier.rate), carrier.rate, 1.3), speed=None)
            await carrier.next_event("response.done", timeout=60)
            system = call.session.messages("")[0]["content"]
            assert system.startswith("You are Ada.") and crm in system, system
            mark = len(carrier.events)
            update = {"type": "realtime", "instructions": "You are Bo."}
            await carrier.send({"type": "session.update", "session": update})
            await carrier.next_event("session.updated", timeout=10, after=mark)
            system = call.session.messages("")[0]["content"]
            assert system.startswith("You are Bo.") and crm in system and "Ada" not in system, system
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_context_items_are_bounded(server):
    """A client that adds items in a loop cannot grow the prompt or memory:
    system text stops at a cap with an error, user items keep the history's
    length; the call goes on. (How much of that fits a small model's context
    window is the engine's matter: long prompts get an LLM error event.)"""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            for role in ["system"] * 6 + ["user"] * 40:
                part = {"type": "input_text", "text": role[0] * 8000}
                await carrier.send({"type": "conversation.item.create",
                                    "item": {"type": "message", "role": role, "content": [part]}})  # fmt: skip
            await carrier.next_event("error", timeout=10)
            for _ in range(200):
                if len(carrier.of("conversation.item.added")) + len(carrier.of("error")) >= 46:
                    break
                await asyncio.sleep(0.05)
            answered = len(carrier.of("conversation.item.added")) + len(carrier.of("error"))
            assert answered >= 46, f"{answered} of 46 items answered: the bounds were not reached"
            errors = carrier.of("error")
            assert errors and all(e["error"]["code"] == "context_too_large" for e in errors), errors
            assert len(call.session.messages("")[0]["content"]) <= 32 * 1024
            assert len(call.session.history) <= 2 * server.runtime.config.llm.history_turns
            # The call goes on.
            await carrier.send({"type": "input_audio_buffer.clear"})
            await carrier.next_event("input_audio_buffer.cleared", timeout=10)


async def test_realtime_hangups_release_everything(server):
    clips = [prompt_clip(i) for i in (17, 18, 19)]
    # A fixed 500 ms window (server_vad's silence_duration_ms): the helper
    # sends only 0.7 s of silence after each prompt.
    vad = {"type": "server_vad", "silence_duration_ms": 500}

    def caller() -> FakeRealtime:
        return FakeRealtime(server_base(server), fmt="audio/pcmu", turn_detection=vad)

    with CallWatcher() as watcher:
        await hangups_release_everything(server, caller, clips)
    assert all(c.session.asr_config.endpoint_silence_s == 0.5 for c in watcher.calls)
    assert not any(c.session.asr_config.adaptive_endpoint for c in watcher.calls)


async def test_openai_sdk_realtime_client(server):
    """The official SDK (GA interface) parses every event we send."""
    openai = pytest.importorskip("openai")
    clip = shared_clip("librispeech_quilter.wav")
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="test")
    audio = with_silence(clip.load(24000), 24000, 1.3)
    pcm = float_to_int16(StreamResampler(24000, 24000).process(audio, last=True)).tobytes()
    with CallWatcher() as watcher:
        async with client.realtime.connect(model="firstline") as conn:
            fmt = {"type": "audio/pcm", "rate": 24000}
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "audio": {"input": {"format": fmt}}})  # fmt: skip
            for i in range(0, len(pcm), 9600):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
            seen: list[str] = []
            transcript = text = ""
            async for event in conn:
                seen.append(event.type)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    transcript = event.transcript
                elif event.type == "response.output_text.done":
                    text = event.text
                elif event.type == "response.done":
                    assert event.response.status == "completed"
                    break
            call = await watcher.one()
    assert word_error_rate(clip.reference, transcript) <= 0.2, transcript
    assert text.strip() and call.transport == "realtime"
    assert "session.created" in seen and "response.output_text.delta" in seen


async def test_openai_sdk_text_item_then_response_create_is_answered(server):
    """As OpenAI's API does: a user text item plus response.create gets a
    reply to the conversation (no audio at all), and response.create right
    after session.update, with per-response instructions, speaks first."""
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="test")

    async def reply(conn) -> tuple[str, list[str]]:
        seen: list[str] = []
        async for event in conn:
            seen.append(event.type)
            if event.type == "error":
                raise AssertionError(event.error.message)
            if event.type == "response.done":
                assert event.response.status == "completed", event.response
                return event.response.output[0].content[0].text, seen
        raise AssertionError("connection closed before response.done")

    with CallWatcher() as watcher:
        async with client.realtime.connect(model="firstline") as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await conn.response.create(response={"instructions": "Greet the caller and ask how you can help."})
            greeting, seen = await reply(conn)
            assert greeting.strip() and "response.created" in seen and "response.output_text.delta" in seen
            question = [{"type": "input_text", "text": "What time do you open?"}]
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": question})
            await conn.response.create()
            answer, _ = await reply(conn)
            assert answer.strip()
            call = await watcher.one()
            history = call.session.history.messages_so_far
    assert [m["role"] for m in history] == ["assistant", "user", "assistant"], history
    assert history[0]["content"] == greeting and history[2]["content"] == answer


async def test_realtime_response_create_without_a_caller_turn_is_rate_limited(server):
    """A client looping response.create (with a cancel each time, cheaply)
    starts an LLM generation each time and, sending no audio, never counts
    as a fast feeder: past UNSPOKEN_REPLY_BURST it gets rate_limit_exceeded,
    and the call itself goes on."""
    from voice.transports.realtime.protocol import UNSPOKEN_REPLY_BURST

    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.created", timeout=10)
            # Whole replies take seconds here; no refill meanwhile, so the
            # burst is what is checked (the refill is streaming/rate.py's).
            call.unspoken_replies.per_s = 0.0
            for _ in range(UNSPOKEN_REPLY_BURST):
                seen = len(carrier.events)
                await carrier.send({"type": "response.create"})
                await carrier.next_event("response.done", timeout=60, after=seen)
            assert not carrier.of("error"), carrier.of("error")
            await carrier.send({"type": "response.create"})
            error = await carrier.next_event("error", timeout=10)
            assert error["error"]["code"] == "rate_limit_exceeded", error
            assert not call.finished and len(carrier.of("response.created")) == UNSPOKEN_REPLY_BURST


async def test_realtime_unspoken_replies_are_kept_per_source_not_per_connection(server):
    """The allowance of replies with no caller turn was the connection's: a
    client reconnecting got a fresh burst of LLM generations each time (as
    many connections at once as the per-address cap allows). It is the
    source address's now; an exempt source (a gateway carrying many
    callers; loopback by default) keeps one per connection."""
    from tests.conftest import side_server

    async def nth_call(watcher: CallWatcher, n: int):
        async with asyncio.timeout(10):
            while len(watcher.calls) < n:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        return watcher.calls[n - 1]

    async with side_server(server, per_address_exempt=[]) as srv:
        with CallWatcher() as watcher:
            async with FakeRealtime(server_base(srv), fmt="audio/pcmu", audio_out=False) as first:
                call = await nth_call(watcher, 1)
                await first.next_event("session.created", timeout=10)
                allowance = call.unspoken_replies  # this side server's, not the shared runtime's
                allowance.per_s = 0.0  # no refill while the test runs
                while allowance.take():  # spent, as by eight quick replies
                    pass
            async with FakeRealtime(server_base(srv), fmt="audio/pcmu", audio_out=False) as second:
                again = await nth_call(watcher, 2)
                await second.next_event("session.created", timeout=10)
                assert again.unspoken_replies is allowance
                await second.send({"type": "response.create"})
                error = await second.next_event("error", timeout=10)
                assert error["error"]["code"] == "rate_limit_exceeded", error
                assert not second.of("response.created")
    # On the default (exempt loopback) server each connection has its own.
    with CallWatcher() as watcher:
        async with FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False) as one:
            await one.next_event("session.created", timeout=10)
        async with FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False) as other:
            await other.next_event("session.created", timeout=10)
        first_call, second_call = await nth_call(watcher, 1), await nth_call(watcher, 2)
    assert first_call.unspoken_replies is not second_call.unspoken_replies


async def test_realtime_a_clean_close_finishes_the_engine_session_a_dropped_one_keeps_it(server, monkeypatch):
    """A Realtime session has no stop message: a clean close is its end, and
    vllm-router's session for it (sticky routing) is finished. It was kept,
    as for a socket that may come back, and every Realtime call stayed in
    the router's table for its TTL. A dropped socket keeps it for the resume."""
    engine = server.runtime.engine
    ended: list[str] = []
    real_end = engine.end_session

    def ending(key: str) -> None:  # the real engine's, watched
        ended.append(key)
        real_end(key)

    monkeypatch.setattr(engine, "end_session", ending)

    async def released() -> None:
        # The call's count comes off after its session stopped (the registry
        # stops counting a call as soon as its socket is closed).
        async with asyncio.timeout(15):
            while server.runtime.active_calls:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def started(client: FakeRealtime, n: int):
        """The n-th call, once its first audio started it (its conversation is
        kept from then on, for a resume)."""
        await client.next_event("session.created", timeout=10)
        await client.say(np.zeros(4000, np.float32), speed=None)
        async with asyncio.timeout(10):
            while len(watcher.calls) < n or not watcher.calls[n - 1].session.started:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return watcher.calls[n - 1]

    with CallWatcher() as watcher:
        async with FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False) as client:
            call = await started(client, 1)
        await released()
        # (The test before may have left calls of its own ending meanwhile.)
        assert call.session.llm_session_key in ended, ended
        async with FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False) as client:
            dropped = await started(client, 2)
            assert client.ws is not None
            client.ws.transport.abort()  # no close frame: connection_lost
        await released()
    assert dropped.session.closed and dropped.session.llm_session_key not in ended, ended


async def test_realtime_a_response_cancelled_before_its_task_ran_still_ends(server):
    """response.create then response.cancel in one socket read: the reply
    (nobody spoke for it) is cancelled before its task's first step, so no
    reply path ran to end it; the client, which saw response.created, got
    no response.done and waited for good, and every later response.create
    was refused as one already in progress. Here the two happen with no
    await between them, as they do in one read."""
    from voice.call.turn import SpokenFirst
    from voice.transports.realtime.response import Response, start

    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.created", timeout=10)
            await call.ensure_started()
            turn = call.session.speak_first(SpokenFirst())  # what response.create does
            call.responses[turn] = response = Response(turn, released=True)
            assert call.session.cancel_reply()  # what response.cancel does, before the turn's first step
            call.session._active.cancel()  # and a second cancel (a commit, speech) in the same read
            await start(call, response)
            done = await carrier.next_event("response.done", timeout=30)
            assert done["response"]["status"] == "cancelled", done
            seen = len(carrier.events)
            await carrier.send({"type": "response.create"})
            done = await carrier.next_event("response.done", timeout=60, after=seen)
            assert done["response"]["status"] == "completed" and not carrier.of("error"), carrier.of("error")


async def test_realtime_instructions_and_system_items_are_checked_together(server):
    """Before the first audio, instructions and a system item that each fit
    the context but not together were both taken (each was checked alone,
    the item against the server's prompt): the call's start then failed on
    every append and the flood of errors closed it. Whichever comes second
    is refused (context_too_large), in either order."""
    from voice.call.history import estimate_tokens

    for second in ("instructions", "item"):
        carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False)
        with CallWatcher() as watcher:
            async with carrier:
                call = await watcher.one()
                await carrier.next_event("session.updated", timeout=10)
                budget = call.session.prompt_budget()
                text = ""
                while estimate_tokens(text) < 0.6 * budget:
                    text += "Answer in one short sentence. "
                item = {"type": "conversation.item.create", "item": {"type": "message", "role": "system",
                        "content": [{"type": "input_text", "text": text}]}}  # fmt: skip
                update = {"type": "session.update", "session": {"type": "realtime", "instructions": text}}
                first, then = (item, update) if second == "instructions" else (update, item)
                seen = len(carrier.events)
                await carrier.send(first)
                await carrier.next_event("conversation.item.added" if first is item else "session.updated", after=seen)
                await carrier.send(then)
                error = await carrier.next_event("error", after=seen, timeout=10)
                assert error["error"]["code"] == "context_too_large", (second, error)
                await carrier.say(np.zeros(4800, np.float32), speed=None)  # the call starts as set up before
                async with asyncio.timeout(10):
                    while not call.session.started:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                assert len(carrier.of("error")) == 1, carrier.of("error")


async def test_realtime_a_reply_cap_is_checked_against_the_clients_instructions(server):
    """Before the first audio, instructions that fit with the reply cap in
    force and a sampling.max_tokens that leaves them no room, in one update:
    the cap was checked against the server's short prompt and both were
    taken, so the call's start then failed on every append. Refused now
    (context_too_large), and nothing of the update is applied; the call
    starts as it was set up before."""
    from voice.call.history import estimate_tokens

    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.updated", timeout=10)
            cap = call.session.max_tokens
            budget = call.session.prompt_budget()
            text = ""
            while estimate_tokens(text) < 0.8 * budget:
                text += "Answer in one short sentence. "
            seen = len(carrier.events)
            await carrier.send({"type": "session.update", "session": {
                "type": "realtime", "instructions": text, "sampling": {"max_tokens": 1024}}})  # fmt: skip
            error = await carrier.next_event("error", after=seen, timeout=10)
            assert error["error"]["code"] == "context_too_large", error
            assert call.session.max_tokens == cap and call.settings.instructions is None
            await carrier.say(np.zeros(4800, np.float32), speed=None)
            async with asyncio.timeout(10):
                while not call.session.started:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert len(carrier.of("error")) == 1, carrier.of("error")


async def test_realtime_cleared_instructions_give_the_server_its_own_again(server):
    """instructions "" (or null) after the call started: session.updated said
    so, but the call went on with the old ones."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcm", audio_out=False, instructions=STORY)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.updated", timeout=10)
            await carrier.say(np.zeros(4800, np.float32), speed=None)
            async with asyncio.timeout(10):
                while not call.session.started:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert call.session.history.system_prompt == STORY
            for cleared in ("", None):
                seen = len(carrier.events)
                await carrier.send({"type": "session.update", "session": {"type": "realtime", "instructions": STORY}})
                await carrier.next_event("session.updated", after=seen, timeout=10)
                assert call.session.history.system_prompt == STORY
                seen = len(carrier.events)
                await carrier.send({"type": "session.update", "session": {"type": "realtime", "instructions": cleared}})
                updated = await carrier.next_event("session.updated", after=seen, timeout=10)
                assert not updated["session"].get("instructions")
                assert call.session.history.system_prompt == server.runtime.config.llm.system_prompt, cleared
    assert not carrier.of("error"), carrier.of("error")


async def test_realtime_response_create_right_after_response_done_is_a_new_response(server):
    """A reply's audio goes out as fast as it is made, so its response.done
    is on the wire while the client still plays it: a response.create then
    starts a new response, as on OpenAI. It was refused
    (conversation_already_has_active_response) for as long as the server's
    clock said the audio played."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu")
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            await carrier.next_event("session.created", timeout=10)
            await carrier.send({"type": "response.create"})
            await carrier.next_event("response.done", timeout=60)
            assert call.playing() is not None, "the reply's audio ran out by the clock: nothing tested"
            seen = len(carrier.events)
            await carrier.send({"type": "response.create"})
            done = await carrier.next_event("response.done", timeout=60, after=seen)
            assert not carrier.of("error"), carrier.of("error")
            assert len(carrier.of("response.created")) == 2 and done["response"]["status"] == "completed", done


async def test_realtime_sampling_reaches_the_engine_and_is_reported(server, monkeypatch):
    """Every sampling field set on session.update is in the request the
    engine receives, and the session object reports the values in force."""
    openai = pytest.importorskip("openai")
    engine = server.runtime.engine
    seen = []
    real_stream = engine.stream

    def spy(request):  # the real engine still answers; we only keep the request
        seen.append(request)
        return real_stream(request)

    monkeypatch.setattr(engine, "stream", spy)
    wanted = {"top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "frequency_penalty": 0.1,
              "presence_penalty": 0.2, "dry_multiplier": 0.5, "stop": ["Goodbye"], "seed": 7}  # fmt: skip
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="test")
    async with client.realtime.connect(model="firstline") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 40,
                                           "temperature": 0.3, "sampling": wanted})  # type: ignore[typeddict-unknown-key]  # fmt: skip

        async def next_of(kind: str):  # the event, or a failure: a closed socket is no answer
            async with asyncio.timeout(60):
                async for event in conn:
                    if event.type == kind:
                        return event
            raise AssertionError(f"connection closed before {kind}")

        updated = (await next_of("session.updated")).session
        reported = updated.model_extra["sampling"] if updated.model_extra else None
        assert reported is not None and reported["temperature"] == 0.3 and reported["top_p"] == 0.9, updated
        assert updated.max_output_tokens == 40
        await conn.response.create(response={"instructions": "Say hello."})
        await next_of("response.done")
        await conn.send({"type": "session.update", "session": {"type": "realtime", "sampling": {"top_p": 7}}})
        error = (await next_of("error")).error
        assert "top_p" in error.message and error.code == "invalid_value"
    request = next(r for r in seen if r.request_id.endswith("-t1"))
    got = request.sampling.as_dict()
    for key, value in {**wanted, "temperature": 0.3, "max_tokens": 40}.items():
        assert got[key] == value, (key, got[key], value)


async def test_realtime_audio_positions_count_the_whole_session_across_a_clear(server):
    """audio_start_ms / audio_end_ms are "from the start of all audio written
    to the buffer during the session" (OpenAI): an input_audio_buffer.clear
    restarted them at 0 (speech 0.5 s after a clear that followed 2 s of
    audio was reported at 544 ms, not ~2,500)."""
    clip = prompt_clip(13)
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu", audio_out=False)
    async with carrier:
        await carrier.next_event("session.created", timeout=10)
        await carrier.say(np.zeros(16000, np.float32), speed=None)  # 2 s at 8 kHz
        await carrier.send({"type": "input_audio_buffer.clear"})
        await carrier.next_event("input_audio_buffer.cleared", timeout=10)
        await carrier.say(with_silence(clip.load(8000), 8000, 1.3), speed=None)
        started = await carrier.next_event("input_audio_buffer.speech_started", timeout=30)
        stopped = await carrier.next_event("input_audio_buffer.speech_stopped", timeout=30)
        assert 2000 <= started["audio_start_ms"] < stopped["audio_end_ms"], (started, stopped)


async def test_realtime_truncate_past_the_items_audio_is_refused(server):
    """OpenAI: "If the audio_end_ms is greater than the actual audio
    duration, the server will respond with an error", and content_index is
    0. Both were accepted and echoed back (999,999 ms; index 5); a
    400-digit integer (valid JSON) overflowed the arithmetic and closed the call."""
    carrier = FakeRealtime(server_base(server), fmt="audio/pcmu")
    async with carrier:
        await carrier.next_event("session.updated", timeout=10)
        await carrier.say(with_silence(prompt_clip(12).load(8000), 8000, 1.3), speed=None)
        done = await carrier.next_event("response.done", timeout=60)
        item_id = done["response"]["output"][0]["id"]
        for bad, param in (({"audio_end_ms": 999_999}, "audio_end_ms"), ({"audio_end_ms": 10, "content_index": 5},
                           "content_index"), ({"audio_end_ms": 10**400}, "audio_end_ms")):  # fmt: skip
            seen = len(carrier.events)
            await carrier.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, **bad})
            error = await carrier.next_event("error", timeout=10, after=seen)
            assert error["error"]["param"] == param, error
        await carrier.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                            "audio_end_ms": 200})  # fmt: skip
        truncated = await carrier.next_event("conversation.item.truncated", timeout=10)
        assert truncated["audio_end_ms"] == 200 and truncated["content_index"] == 0
