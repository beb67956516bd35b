"""The reply policy on replies the embedded model really wrote (the stored
peers benchmark's looping replies), and the policy's edges."""

from __future__ import annotations

import re

import pytest

from voice.call.reply_policy import (
    SEND,
    STOP_LENGTH,
    STOP_LOOP,
    ReplyGuard,
    ReplyPolicy,
    is_complete,
    stutters,
    words_of,
)

# Replies SmolLM2-135M gave in benchmarks/results/bench/results.json (before the guard).
LOOPING = [
    "I'm sorry for any confusion. I'm just a chatbot. I'm just a chatbot. I'm just a chatbot. I'm just a chatbot.",
    "I'm sorry for any confusion. I'm here to assist you with your business. I'm here to help you with your "
    "business. I'm just a chatbot. I'm here to help you with your business.",
    "I'm a no-nonsense no-nonsense no-nonsense no-nonsense no-nonsense assistant.",
]


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def said(policy: ReplyPolicy, reply: str, previous: str = "") -> tuple[list[str], str]:
    guard = ReplyGuard(policy, previous)
    out = []
    for sentence in sentences(reply):
        verdict = guard.check(sentence)
        if verdict != SEND:
            return out, verdict
        out.append(sentence)
    return out, "complete"


@pytest.mark.parametrize("reply", LOOPING)
def test_a_looping_reply_stops_at_its_first_repeat(reply: str) -> None:
    out, end = said(ReplyPolicy(max_sentences=0), reply)
    assert end == STOP_LOOP
    normalised = [" ".join(words_of(s)) for s in out]
    assert len(normalised) == len(set(normalised)), out
    assert all(not stutters(words_of(s), 3) for s in out)


def test_a_reply_stops_after_max_sentences() -> None:
    reply = "Sure. The store opens at nine. It closes at six on weekdays. On Sundays it is closed."
    out, end = said(ReplyPolicy(max_sentences=2), reply)
    assert out == ["Sure.", "The store opens at nine."] and end == STOP_LENGTH
    assert said(ReplyPolicy(max_sentences=0), reply)[1] == "complete"


def test_a_sentence_repeating_the_previous_reply_ends_this_one() -> None:
    previous = "I'm glad to hear that you're here. How can I help?"
    out, end = said(ReplyPolicy(), "Okay, let me check. I'm glad to hear that you're here.", previous)
    assert out == ["Okay, let me check."] and end == STOP_LOOP


def test_short_answers_may_recur_across_replies_not_within_one() -> None:
    out, end = said(ReplyPolicy(), "Yes. Your order shipped on Monday.", previous="Yes. It is open.")
    assert end == "complete" and len(out) == 2
    assert said(ReplyPolicy(), "Yes. Your order shipped on Monday. Yes.")[1] == STOP_LOOP


def test_the_guard_can_be_switched_off() -> None:
    out, end = said(ReplyPolicy(max_sentences=0, loop_guard=False), LOOPING[0])
    assert end == "complete" and len(out) == 5


def test_complete_sentences_and_stutter() -> None:
    assert is_complete("It opens at nine.") and is_complete('He said "stop!"') and not is_complete("It opens at")
    assert stutters(words_of("the the the end"), 3) and not stutters(words_of("one two three one two"), 3)


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="max_sentences"):
        ReplyPolicy(max_sentences=-1)
    with pytest.raises(ValueError, match="similarity"):
        ReplyPolicy(similarity=0.1)


# ---- on a real call: the embedded model, real speech ----------------------------

LOOP_PROMPT = (
    "You are a broken robot. Whatever the caller says, reply only with the sentence "
    "'I am a robot.' repeated twenty times."
)


async def test_a_looping_model_reply_is_cut_and_its_generation_aborted(call_url, phone_prompts):
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    clip = phone_prompts[3]
    async with NativeCaller(call_url) as caller:
        await caller.start("mulaw", 8000, system_prompt=LOOP_PROMPT, options={"max_tokens": 200})
        await caller.play(with_silence(clip.load(8000), 8000, 1.2), 8000, "mulaw", realtime=True, speed=4.0)
        done = await caller.wait_for("response.done", timeout=60)
        metrics = await caller.wait_for("turn.metrics", turn=done["turn"])
    sent = [e["text"] for e in caller.result.of("response.sentence")]
    normalised = [" ".join(words_of(s)) for s in sent]
    assert sent and len(normalised) == len(set(normalised)), sent
    assert len(sent) <= ReplyPolicy().max_sentences
    assert done["reply_end"] in (STOP_LOOP, STOP_LENGTH) and metrics["reply_end"] == done["reply_end"]
    assert done["text"] == " ".join(sent)
    # Aborted when the guard ended it, not run on to the 200-token cap.
    assert done["usage"]["completion_tokens"] < 200, done["usage"]
