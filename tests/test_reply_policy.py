"""The reply policy on replies the embedded model really wrote (the stored
peers benchmark's looping replies), and the policy's edges."""

from __future__ import annotations

import asyncio

import pytest

from voice.call.reply_policy import (
    SEND,
    SKIP,
    STOP_CODE,
    STOP_LENGTH,
    STOP_LOOP,
    ReplyGuard,
    ReplyPolicy,
    asks_about_it,
    asks_to_repeat,
    is_complete,
    split_sentences,
    stutters,
    without_markdown,
    words_of,
)

# Replies SmolLM2-135M gave in benchmarks/results/bench/results.json (before the guard).
LOOPING = [
    "I'm sorry for any confusion. I'm just a chatbot. I'm just a chatbot. I'm just a chatbot. I'm just a chatbot.",
    "I'm sorry for any confusion. I'm here to assist you with your business. I'm here to help you with your "
    "business. I'm just a chatbot. I'm here to help you with your business.",
    "I'm a no-nonsense no-nonsense no-nonsense no-nonsense no-nonsense assistant.",
]


def said(policy: ReplyPolicy, reply: str, previous: str = "", caller: str | None = None) -> tuple[list[str], str]:
    """What a turn sends of ``reply`` to ``caller``'s words, and why it ends
    (as voice/call/turn.py does)."""
    guard = ReplyGuard.for_turn(policy, caller, previous)
    out = []
    for sentence in split_sentences(reply):
        verdict = guard.check(sentence)
        if verdict == SKIP:
            continue
        if verdict != SEND:
            return out, verdict
        out.append(sentence)
    if not out and guard.repeated_previous is not None:
        return [guard.repeated_previous], "complete"  # rather than the fallback
    return out, STOP_LOOP if guard.said_nothing_but_loops else "complete"


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


def test_a_first_clause_is_not_counted_as_a_sentence() -> None:
    guard = ReplyGuard(ReplyPolicy(max_sentences=2))
    assert guard.check("I'm sorry for any misunderstanding,", clause=True) == SEND
    assert guard.check("but I cannot see your account.") == SEND
    assert not guard.full  # the clause and its rest are one sentence
    assert guard.check("Please call the bank.") == SEND
    assert guard.full and guard.check("Anything else?") == STOP_LENGTH


def test_the_first_clause_setting_comes_from_the_command_line() -> None:
    from voice.server.cli import build_parser, config_from_args

    def words(*flags: str) -> int:
        return config_from_args(build_parser().parse_args(["serve", *flags])).first_clause_words

    assert words() == 0 and words("--first-clause-words", "5") == 5
    with pytest.raises(SystemExit, match="first-clause-words"):
        words("--first-clause-words", "-1")


def test_a_sentence_repeating_the_previous_reply_ends_this_one() -> None:
    previous = "I'm glad to hear that you're here. How can I help?"
    out, end = said(ReplyPolicy(), "Okay, let me check. I'm glad to hear that you're here.", previous)
    assert out == ["Okay, let me check."] and end == STOP_LOOP


def test_short_answers_may_recur_across_replies_not_within_one() -> None:
    out, end = said(ReplyPolicy(), "Yes. Your order shipped on Monday.", previous="Yes. It is open.")
    assert end == "complete" and len(out) == 2
    assert said(ReplyPolicy(max_sentences=3), "Yes. Your order shipped on Monday. Yes.")[1] == STOP_LOOP


def test_the_guard_can_be_switched_off() -> None:
    out, end = said(ReplyPolicy(max_sentences=0, loop_guard=False), LOOPING[0])
    assert end == "complete" and len(out) == 5


def test_complete_sentences_and_stutter() -> None:
    assert is_complete("It opens at nine.") and is_complete('He said "stop!"') and not is_complete("It opens at")
    assert stutters(words_of("the the the end"), 3) and not stutters(words_of("one two three one two"), 3)
    # Digits read out repeat by nature: "The code is 1 1 1 4." is no stutter.
    assert not stutters(words_of("The code is 1 1 1 4, or zero zero zero seven."), 3)
    # A long phrase looping without punctuation: twice back to back is enough.
    looping = "I am here to help you with your account I am here to help you with your account I am here"
    assert stutters(words_of(looping), 3)
    assert not stutters(words_of("I can help you with your account, and your account is up to date."), 3)


def test_a_caller_who_asks_again_gets_the_last_reply_again() -> None:
    """Restating the last reply is a loop unless the caller asked for it:
    then the whole reply was left out for the fallback, "Sorry, could you
    say that again?", to a caller who had just asked the agent that."""
    previous = "Sure. Your appointment is on Friday at ten."
    restated = "Yes, your appointment is on Friday at ten."
    for caller in ("Can you repeat that?", "Sorry, what was that?", "Could you confirm the time?",
                   "I didn't catch that.", "Say that again please."):  # fmt: skip
        assert asks_to_repeat(caller), caller
        assert said(ReplyPolicy(), restated, previous, caller) == ([restated], "complete"), caller
    for caller in ("What time is it?", "I need to book a table.", None, ""):
        assert not asks_to_repeat(caller), caller


def test_a_question_about_the_last_reply_may_be_answered_with_it() -> None:
    """A question ("Is it Friday?") or a short clarifier ("What?") may get
    the last reply restated: it was left out as a loop, and the caller
    heard only the rest ("Anything else?") or, with nothing else, the
    fallback asking them to say it again."""
    previous = "Sure. Your appointment is on Friday at ten."
    answer = "Yes, your appointment is on Friday at ten. Anything else?"
    for caller in ("Is it Friday?", "Wait, which day?", "What?", "Sorry?", "Huh?", "Excuse me"):
        assert asks_about_it(caller), caller
        assert said(ReplyPolicy(), answer, previous, caller) == (split_sentences(answer), "complete"), caller
    # A statement: the restatement is left out, and the rest goes out.
    assert said(ReplyPolicy(), answer, previous, "I need to book a table.") == (["Anything else?"], "complete")


def test_a_reply_that_only_restates_the_last_one_says_it_rather_than_the_fallback() -> None:
    """All the reply had was the last reply said again ("Okay, Friday
    then." -> "Your appointment is on Friday at ten."): the caller hears it
    again, not "Sorry, could you say that again?" for an answer the model
    gave. A stutter is never said."""
    previous = "Sure. Your appointment is on Friday at ten."
    restated = "Your appointment is on Friday at ten."
    assert said(ReplyPolicy(), restated, previous, "Okay, Friday then.") == ([restated], "complete")
    guard = ReplyGuard.for_turn(ReplyPolicy(), "Okay.", "no-nonsense no-nonsense no-nonsense assistant.")
    assert guard.check("no-nonsense no-nonsense no-nonsense assistant.") == SKIP and guard.repeated_previous is None


def test_the_loop_guard_reads_words_in_any_script() -> None:
    """[a-z] saw no words in Russian or Hindi text, so their loops and
    stutters went out whole; accented words were split ("está" -> "est")."""
    assert words_of("Está bien. Я здесь!") == ["está", "bien", "я", "здесь"]
    looping = "Я здесь, чтобы помочь. Я здесь, чтобы помочь. Я здесь, чтобы помочь."
    assert said(ReplyPolicy(max_sentences=0), looping) == (["Я здесь, чтобы помочь."], STOP_LOOP)
    assert stutters(words_of("मैं मैं मैं यहाँ हूँ"), 3)


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="max_sentences"):
        ReplyPolicy(max_sentences=-1)
    with pytest.raises(ValueError, match="similarity"):
        ReplyPolicy(similarity=0.1)


# ---- on a real call: the embedded model, real speech ----------------------------

STORY_PROMPT = "You are a storyteller. Always answer with a long story of many short sentences."


async def test_a_long_model_reply_is_cut_at_the_cap_and_its_generation_aborted(call_url, phone_prompts):
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence
    from tests.fake_carrier import CallWatcher

    clip = phone_prompts[3]
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            # With a first clause sent ahead ("I'm sorry for any
            # misunderstanding,"), the clause and its rest are the one sentence.
            options = {"max_tokens": 200, "first_clause_words": 5}
            await caller.start("mulaw", 8000, system_prompt=STORY_PROMPT, options=options)
            call = await watcher.one()
            call.session.reply_policy = ReplyPolicy(max_sentences=1)  # one sentence: any story is cut
            assert call.session.first_clause_words == 5
            await caller.play(with_silence(clip.load(8000), 8000, 1.2), 8000, "mulaw", realtime=True, speed=4.0)
            done = await caller.wait_for("response.done", timeout=60)
            metrics = await caller.wait_for("turn.metrics", turn=done["turn"])
    sent = [e["text"] for e in caller.result.of("response.sentence")]
    # One sentence; its first clause may have gone out ahead of its rest,
    # which the cap does not count as a sentence.
    assert 1 <= len(sent) <= 2 and is_complete(sent[-1]), (sent, done)
    assert len(sent) == 1 or not is_complete(sent[0]), (sent, done)
    assert done["reply_end"] == STOP_LENGTH and metrics["reply_end"] == STOP_LENGTH, (sent, done)
    assert done["text"] == " ".join(sent)
    # Aborted when the policy ended it, not run on to the 200-token cap.
    assert done["usage"]["completion_tokens"] < 200, done["usage"]


async def test_a_reply_with_no_sentence_says_the_fallback(call_url, phone_prompts):
    """A 1-token cap cuts the model's first sentence: nothing of the reply
    can go out, so the caller hears the fallback, not silence; the turn
    says why (token_cap) and that it fell back."""
    from benchmarks.client import NativeCaller
    from tests.conftest import with_silence

    clip = phone_prompts[3]
    async with NativeCaller(call_url) as caller:
        await caller.start("mulaw", 8000, options={"max_tokens": 1})
        await caller.play(with_silence(clip.load(8000), 8000, 1.2), 8000, "mulaw", realtime=True, speed=4.0)
        done = await caller.wait_for("response.done", timeout=60)
        metrics = await caller.wait_for("turn.metrics", turn=done["turn"])
    sent = [e["text"] for e in caller.result.of("response.sentence")]
    assert sent == [ReplyPolicy.fallback] and done["text"] == ReplyPolicy.fallback, (sent, done)
    assert done["reply_end"] == "token_cap" and metrics["fallback"] is True, (done, metrics)
    assert done["usage"]["completion_tokens"] <= 1


def test_markdown_is_not_read_out_and_code_ends_the_reply() -> None:
    assert without_markdown("**Note:** press 1 for `billing`.") == ("Note: press 1 for billing.", False)
    assert without_markdown("## Steps\n- Open the app\n- Tap *Settings*") == ("Steps Open the app Tap Settings", False)
    assert without_markdown("To exit the menu: ```python def get_menu():") == ("To exit the menu:", True)
    assert without_markdown("```python print('hi')") == ("", True)
    assert without_markdown("~~~ ls") == ("", True)
    assert without_markdown("> Quoted, as said.") == ("Quoted, as said.", False)
    assert without_markdown("**Both *ways* at once.**") == ("Both ways at once.", False)
    # A fence closed on the same line is inline code: said, the reply goes on.
    assert without_markdown("Type ```ls``` and press enter.") == ("Type ls and press enter.", False)
    assert without_markdown("Type ~~~ls~~~, then ```python") == ("Type ls, then", True)
    assert without_markdown("* Open the app") == ("Open the app", False)
    # What a caller must hear as written stays.
    for kept in (
        "Press * to go back, or 1. to repeat.",
        "It's 5 * 3 = 15.",
        "Your username is jane__doe.",
        "Your password is abc**123.",
        "You can dial **21* and then your number.",
        "Press ** to return.",
        "* then 0 for the operator.",  # a piece cut mid-line before the keypad's star
        "Dial *67 then *82.",
        "- 5 degrees today.",
        "> 3 items are left.",
        "# of items is 3.",
        "Call 1-800-555-0199.",
        "C# is fine.",
    ):
        assert without_markdown(kept) == (kept, False), kept


async def _greeting_said(call_url: str, greeting: str) -> tuple[list[str], dict]:
    """A fixed reply on the real reply path (a greeting: the model's own
    words depend on its sampling): the sentences sent, and response.done."""
    from benchmarks.client import NativeCaller

    async with NativeCaller(call_url) as caller:
        await caller.start("pcm16", 16000, options={"greeting": greeting})
        done = await caller.wait_for("response.done", timeout=30, turn=1)
    return [e["text"] for e in caller.result.of("response.sentence")], done


async def test_a_reply_that_turns_to_code_stops_before_it_on_the_wire(call_url):
    """A fixed reply (a greeting, as the model's words depend on its
    sampling) with markdown and then a code block: its marks are not sent,
    the code is not, and the reply ends there (reply_end "code")."""
    markdown = "**Sure.** Here is how: ```python\nprint('hi')\n``` Anything else?"
    sent, done = await _greeting_said(call_url, markdown)
    assert sent == ["Sure.", "Here is how:"], sent
    assert done["reply_end"] == STOP_CODE and done["text"] == " ".join(sent), done


async def test_a_fixed_greeting_is_no_llm_request(server, call_url):
    """An operator's fixed greeting never reaches the engine: it was counted
    as an LLM request (firstline_llm_requests_total{purpose="spoken_first"}),
    one per call, inflating what operators tune preemption by."""

    def spoken_first_requests() -> float:
        for line in server.runtime.metrics.render().decode().splitlines():
            if line.startswith('firstline_llm_requests_total{purpose="spoken_first"}'):
                return float(line.split()[-1])
        return 0.0

    before = spoken_first_requests()
    sent, _ = await _greeting_said(call_url, "Hello, thanks for calling Acme.")
    assert sent == ["Hello, thanks for calling Acme."], sent
    await asyncio.sleep(0.2)  # the turn reports its LLM work as it ends
    assert spoken_first_requests() == before


async def test_a_looping_reply_is_cut_on_the_wire(call_url):
    """The same guard on the real reply path, with a reply that loops for
    sure (a fixed greeting; the model's loops depend on its sampling)."""
    looping = "Welcome to Acme. I'm just a chatbot. I'm just a chatbot. I'm just a chatbot."
    sent, done = await _greeting_said(call_url, looping)
    assert sent == ["Welcome to Acme.", "I'm just a chatbot."], sent
    assert done["reply_end"] == STOP_LOOP and done["text"] == " ".join(sent)


async def test_a_reply_that_only_restates_the_last_one_is_said_on_the_wire(call_url):
    """On the real reply path (a fixed reply, as a greeting is: the
    model's words depend on its sampling): its only sentence restates the
    reply the caller last heard, and it goes out, not the fallback."""
    from benchmarks.client import NativeCaller
    from tests.fake_carrier import CallWatcher
    from voice.call.turn import SpokenFirst

    restated = "Your appointment is on Friday at ten."
    with CallWatcher() as watcher:
        async with NativeCaller(call_url) as caller:
            await caller.start("pcm16", 16000)
            call = await watcher.one()
            call.session.history.remember(0, "Okay, Friday then.", restated)
            turn = call.session.speak_first(SpokenFirst(text=restated))
            done = await caller.wait_for("response.done", timeout=30, turn=turn)
            metrics = await caller.wait_for("turn.metrics", timeout=30, turn=turn)
    assert done["text"] == restated and metrics["fallback"] is False, (done, metrics)


async def test_bad_call_sampling_is_refused_at_start_by_field(call_url):
    from benchmarks.client import NativeCaller

    async with NativeCaller(call_url) as caller:
        await caller.send_json({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000},
                                "options": {"sampling": {"top_p": 3}}})  # fmt: skip
        error = await caller.wait_for("error", timeout=10)
        assert error["code"] == "invalid_sampling" and "top_p" in error["message"]
    # A start refused part-way leaves nothing behind: the client's next start
    # (text only, adaptive endpoint) got the refused one's reply audio and
    # fixed 100 ms window.
    async with NativeCaller(call_url) as caller:
        await caller.send_json({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000},
                                "options": {"reply_audio": True, "endpoint_silence_ms": 100,
                                            "sampling": {"top_p": 3}}})  # fmt: skip
        await caller.wait_for("error", timeout=10)
        ready = await caller.start("mulaw", 8000)
        assert ready["adaptive_endpoint"] is True and ready["reply_audio"] is None, ready
    async with NativeCaller(call_url) as caller:
        await caller.send_json({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000},
                                "options": {"sampling": {"repeat_penalty": 1.2}}})  # fmt: skip
        error = await caller.wait_for("error", timeout=10)
        # The hint names the right field.
        assert error["code"] == "invalid_sampling" and "repetition_penalty" in error["message"]


def test_a_first_sentence_that_repeats_the_previous_reply_is_left_out_not_the_whole_reply() -> None:
    previous = "Could you please repeat your account number for me?"
    reply = "Could you please repeat your account number for me? I need it to find your order."
    out, end = said(ReplyPolicy(), reply, previous)
    assert out == ["I need it to find your order."] and end == "complete"


def _pieces(policy: ReplyPolicy, reply: str, max_words: int = 25) -> list[str]:
    """What a turn sends of ``reply`` streamed through the segmenter (its
    word cap cuts long sentences), as voice/call/turn.py does."""
    from streaming.sentences import SentenceSegmenter

    guard, segmenter, out = ReplyGuard(policy), SentenceSegmenter(max_words=max_words), []
    for piece in [*segmenter.push(reply), *segmenter.flush()]:
        verdict = guard.check(piece)
        if verdict == SKIP:
            continue
        if verdict != SEND:
            break
        out.append(piece)
    return out


def test_a_long_sentence_cut_at_the_word_cap_is_not_counted_twice() -> None:
    """The segmenter cuts a sentence past 25 words; its first part counted
    as a sentence, so with two allowed the reply stopped mid-sentence,
    on a comma, and the history kept it so."""
    reply = (
        "Sure. Your appointment is booked for Monday at three in the afternoon with doctor Patel at our "
        "downtown clinic on the second floor, and please bring your insurance card and a photo ID with you. "
        "Anything else?"
    )
    out = _pieces(ReplyPolicy(max_sentences=2), reply)
    assert len(out) == 3 and out[-1].endswith("with you."), out
    assert " ".join(out).endswith("photo ID with you.")


def test_a_loop_of_a_long_phrase_is_stopped() -> None:
    """A 13-word or longer phrase looped back to back was past stutters'
    reach (5-12 words), and cut over word-capped pieces no two pieces were
    alike: the caller heard the loop."""
    phrase = "please let me know if there is anything else that I can help you with today"
    guard = ReplyGuard(ReplyPolicy(max_sentences=0))
    assert guard.check(f"{phrase} {phrase}") in (SKIP, STOP_LOOP)
    out = _pieces(ReplyPolicy(max_sentences=0), " ".join([phrase + " and"] * 4))
    heard = " ".join(out).split()
    assert len(heard) < 2 * len(phrase.split()), out
    # Digits and spelled letters read back twice are no loop.
    code = "Your code is A B 7 2 9 4 4 1 and again A B 7 2 9 4 4 1."
    assert ReplyGuard(ReplyPolicy()).check(code) == SEND


def test_letters_spelled_out_are_not_a_stutter() -> None:
    """ "A A A 7 2" and "w w w dot" are read-backs: they got the fallback."""
    for sentence in ("Your code is A A A 7 2.", "That's w w w dot example dot com."):
        assert ReplyGuard(ReplyPolicy()).check(sentence) == SEND, sentence
    assert stutters(words_of("the the the the cat"), 3)  # words still do


def test_a_piece_with_no_words_is_neither_said_nor_counted() -> None:
    """ "---" between two lines filled the two-sentence cap ahead of the
    answer; a reply of only "..." stood for the reply and kept the
    fallback out, so the caller heard silence."""
    out = _pieces(ReplyPolicy(max_sentences=2), "Sure!\n---\nYour order 4471 shipped on Monday.")
    assert out[0] == "Sure!" and out[-1].endswith("shipped on Monday."), out
    assert "---" not in " ".join(out)
    guard = ReplyGuard(ReplyPolicy())
    assert guard.check("...") == SKIP and guard.sent == 0 and not guard.said_nothing_but_loops
