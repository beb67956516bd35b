"""The embedded TTS and the playout stage on their own (real hibari model)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from asr.wer import word_error_rate
from streaming.codecs import decode
from streaming.playout import KEEP_SEGMENTS, KEEP_TURNS, OutFormat, Playout
from streaming.tts import HibariTTS, TTSConfig, TTSError, build_tts, shared_tts, speakable


class Recorder:
    """A sink that keeps what a carrier would receive."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes | str]] = []

    async def send_audio(self, chunk: bytes) -> None:
        self.items.append(("audio", chunk))

    async def send_mark(self, name: str) -> None:
        self.items.append(("mark", name))


async def test_hibari_speaks_words_whisper_recovers(server):
    tts = shared_tts()
    await tts.warm()
    text = "Your appointment is on Tuesday at three in the afternoon."
    audio = await tts.synthesize(text)
    assert audio.dtype == np.float32 and tts.sample_rate == 24000
    assert 1.5 < len(audio) / 24000 < 8 and 0.05 < np.abs(audio).max() <= 1.0
    import soxr

    heard = (await server.runtime.asr.submit("tts-test", soxr.resample(audio, 24000, 16000), final=True)).text
    assert word_error_rate(text, heard) <= 0.3, heard
    assert len(await tts.synthesize("   ")) == 0


def test_unknown_engine_and_voice_fail_clearly():
    try:
        build_tts(TTSConfig(engine="nope"))
    except TTSError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("no error")
    tts = HibariTTS(TTSConfig(voice="no-such-voice"))
    try:
        asyncio.run(tts.warm())
    except TTSError as exc:
        assert "no-such-voice" in str(exc)
    else:
        raise AssertionError("no error")
    finally:
        tts.close()


def test_a_voice_that_is_not_installed_is_said_once_not_looked_for_at_every_call(monkeypatch):
    """hibari missing (a fault injected: the import fails as it does without
    the package) fails the same way each time: the second call's start gets
    the same error at once, without another import."""
    import sys

    monkeypatch.setitem(sys.modules, "hibari", None)  # import hibari raises ImportError
    tts = HibariTTS(TTSConfig())
    failures = []
    try:
        for _ in range(2):
            try:
                asyncio.run(tts.warm())
            except TTSError as exc:
                failures.append(exc)
    finally:
        tts.close()
    assert len(failures) == 2 and "not installed" in str(failures[0]), failures
    assert failures[1] is failures[0]


async def test_the_server_loads_the_voice_before_it_says_ready(server):
    """Phone calls' voice is loaded by the runtime's start (its time in
    /readyz's startup_s), not by the first call's start, whose caller
    waited for 'ready' while it loaded, with calls starting meanwhile
    queued behind it on the one TTS thread."""
    assert "tts" in server.runtime.startup_s, server.runtime.startup_s
    assert shared_tts(server.runtime.config.tts)._model is not None


async def test_playout_orders_sentences_frames_and_marks():
    sink = Recorder()
    firsts: list[tuple[int, float]] = []

    async def first(turn: int, seconds: float) -> None:
        firsts.append((turn, seconds))

    playout = Playout(shared_tts(), OutFormat("mulaw", 8000, 160), sink, on_first_audio=first)
    playout.say(1, 0, "Hello there.")
    playout.say(1, 1, "How can I help you today?")
    for _ in range(200):
        if sum(1 for k, _ in sink.items if k == "mark") == 2:
            break
        await asyncio.sleep(0.02)
    marks = [v for k, v in sink.items if k == "mark"]
    assert marks == ["t1s0", "t1s1"]
    audio = [v for k, v in sink.items if k == "audio"]
    assert all(len(c) == 160 for c in audio)
    assert sink.items.index(("mark", "t1s0")) < len(sink.items) - 1  # sentence 2's audio follows mark 1
    assert len(decode(b"".join(audio), "mulaw")) > 8000  # over a second of speech
    # Timed from the sentence's hand-over (how fast: benchmarks/ttfa.py); the
    # bound only catches a synthesis that waited on something else.
    assert firsts and firsts[0][0] == 1 and 0 < firsts[0][1] < 20.0
    assert playout.marked("t1s1") is not None  # the carrier played turn 1 (and so everything before)
    # Barge-in: queued sentences are dropped, nothing more is sent.
    playout.say(2, 0, "This sentence is long enough to still be queued when the caller talks over it.")
    playout.say(2, 1, "And this one never plays.")
    playout.interrupt()
    count = len(sink.items)
    await asyncio.sleep(0.3)
    assert len(sink.items) == count and playout.heard(2) == ""
    assert playout.heard(1) == "Hello there. How can I help you today?"
    assert playout.marked("t2s0") is None  # a late echo of flushed audio counts for nothing
    await playout.close()


class TurnLabels(Recorder):
    """A sink that labels each chunk with the turn the playout says it is
    sending, as the Realtime transport names its response."""

    def __init__(self) -> None:
        super().__init__()
        self.playout: Playout | None = None
        self.labels: list[int | None] = []

    async def send_audio(self, chunk: bytes) -> None:
        assert self.playout is not None
        self.labels.append(self.playout.sending_turn)
        await super().send_audio(chunk)


async def test_audio_still_going_out_is_labelled_with_its_own_turn():
    """A reply queued while the last one's audio still goes out (Realtime
    with interrupt_response off): the rest of the earlier reply's audio went
    out under the newer turn's ids (labelled by current_turn, the newest
    queued)."""
    sink = TurnLabels()
    playout = Playout(shared_tts(), OutFormat("mulaw", 8000, 160), sink, lead_s=0.2)
    sink.playout = playout
    playout.say(1, 0, "Your order shipped this morning and should arrive on Thursday.")
    for _ in range(500):
        if sink.labels:
            break
        await asyncio.sleep(0.01)
    playout.say(2, 0, "Anything else?")  # queued while turn 1 is paced out
    await wait_marks(sink, 2)
    marks = [v for k, v in sink.items if k == "mark"]
    assert marks == ["t1s0", "t2s0"]
    first_of_two = sink.items.index(("mark", "t1s0"))
    audio_before = sum(1 for k, _ in sink.items[:first_of_two] if k == "audio")
    assert sink.labels[:audio_before] == [1] * audio_before, sink.labels[:audio_before]
    assert set(sink.labels[audio_before:]) == {2}
    await playout.close()


async def spied_synthesis(tts: object, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the shared voice's thread synthesizes from now on, in order."""
    assert isinstance(tts, HibariTTS)
    await tts.warm()
    ran: list[str] = []
    synthesize = tts._synthesize

    def spied(text: str) -> np.ndarray:
        ran.append(text)
        return synthesize(text)

    monkeypatch.setattr(tts, "_synthesize", spied)
    return ran


async def wait_marks(sink: Recorder, n: int) -> None:
    for _ in range(1500):
        if sum(1 for k, _ in sink.items if k == "mark") >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} marks")


async def test_a_sentence_cut_by_a_barge_in_is_not_synthesized_behind_other_calls(monkeypatch):
    """Every call's synthesis goes through one TTS thread. A barge-in while a
    sentence waited there for another call's left the job queued, run and
    thrown away, ahead of the next call's sentences; it is cancelled now,
    and the playout goes on with the next turn."""
    tts = shared_tts()
    ran = await spied_synthesis(tts, monkeypatch)
    sink = Recorder()
    playout = Playout(tts, OutFormat("mulaw", 8000, 160), sink)
    release = threading.Event()
    other_call = asyncio.get_running_loop().run_in_executor(tts._executor, release.wait, 10.0)  # holds the thread
    playout.say(1, 0, "The caller talks over this sentence before it is made.")
    await asyncio.sleep(0.2)
    playout.interrupt()
    # The cancel reaches the thread pool's job on the loop's next turn (an
    # asyncio future's done callbacks are scheduled, not run at once): a
    # release before it races the thread to the job, as another call's
    # sentence ending at that very moment would.
    await asyncio.sleep(0.05)
    release.set()
    await other_call
    playout.say(2, 0, "Yes.")
    await wait_marks(sink, 1)
    assert ran == ["Yes."], ran
    assert [v for k, v in sink.items if k == "mark"] == ["t2s0"]
    await playout.close()


async def test_a_stall_moves_what_was_queued_by_the_stall_and_what_came_after_by_the_queue():
    """A transport's writer stalled from 10.0 to 10.4 s with a sentence
    queued (9.9-10.2 s by the clock) and the playout, waking first (just
    before the writer, at 10.39 s), sent the next one on a clock that
    counted the stall as played: the first now ends at 10.6 s, the second
    follows it, and the clock's end moves by what the transport still has
    queued (0.21 s)."""
    from streaming.playout import Segment

    playout = Playout(shared_tts(), OutFormat("mulaw", 8000, 160), Recorder())
    playout.segments.extend([Segment(1, 0, "a", "t1s0", 9.9, 10.2, sent_at=9.8),
                             Segment(1, 1, "b", "t1s1", 10.39, 10.59, sent_at=10.39)])  # fmt: skip
    playout._clock_end = 10.59
    playout.delay(since=10.0, stall=0.4, late=0.21)
    assert [v for s in playout.segments for v in (s.start_s, s.end_s)] == pytest.approx([9.9, 10.6, 10.6, 10.8])
    assert playout.clock_end == pytest.approx(10.8)
    await playout.close()


class StallingSink(Recorder):
    """A carrier socket whose write buffer is full at frame ``at`` (a
    stand-in for the carrier: that send waits until the test lets it go)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.stalled = asyncio.Event()
        self.release = asyncio.Event()

    async def send_audio(self, chunk: bytes) -> None:
        if sum(1 for kind, _ in self.items if kind == "audio") == self.at and not self.release.is_set():
            self.stalled.set()
            await self.release.wait()
        await super().send_audio(chunk)


async def test_a_barge_in_during_a_stalled_send_sends_no_mark_after_the_clear():
    """The caller talks while a frame's send waits on a full socket: after
    the clear, nothing of that sentence follows (its mark went out after the
    clear, the carrier echoed it, and the flushed sentence counted as heard).
    The stall is on the sentence's last frame, where nothing after the send
    looked at the interrupt."""
    text = "This sentence is cut while its last frame goes out."
    whole = Recorder()
    playout = Playout(shared_tts(), OutFormat("mulaw", 8000, 160), whole)
    playout.say(1, 0, text)
    for _ in range(500):
        if ("mark", "t1s0") in whole.items:
            break
        await asyncio.sleep(0.02)
    await playout.close()
    frames = sum(1 for kind, _ in whole.items if kind == "audio")
    sink = StallingSink(at=frames - 1)
    playout = Playout(shared_tts(), OutFormat("mulaw", 8000, 160), sink)
    try:
        playout.say(1, 0, text)
        await asyncio.wait_for(sink.stalled.wait(), 30)
        playout.interrupt(by_clock=True)
        sink.items.append(("clear", ""))
        sink.release.set()
        for _ in range(50):
            await asyncio.sleep(0.02)
        after = sink.items[sink.items.index(("clear", "")) + 1 :]
        assert all(kind == "audio" for kind, _ in after) and len(after) <= 1, after  # at most the frame in flight
        assert playout.heard_so_far(1, by_clock=True) == "" and not playout.segments
        assert playout.marked("t1s0") is None  # a late echo of a mark that never went out
    finally:
        await playout.close()


async def test_a_cut_reply_says_nothing_more_and_its_long_history_is_kept():
    """After a barge-in the cut turn's later sentences (its generation stops a
    moment later, and the transport's clear may wait on a full socket) are
    dropped, not played over the caller; the next turn plays. A turn of
    more sentences than the playout keeps for older turns (a long greeting)
    keeps all of its own, so what was heard starts at its first sentence.
    Per-turn records stay bounded over many turns."""
    sink = Recorder()
    playout = Playout(shared_tts(), OutFormat("mulaw", 8000, 160), sink)
    playout.say(1, 0, "One.")
    await wait_marks(sink, 1)
    playout.interrupt(by_clock=True)
    playout.say(1, 1, "A sentence the reply wrote after the caller cut in.")
    playout.say(2, 0, "Yes.")
    await wait_marks(sink, 2)
    assert [v for k, v in sink.items if k == "mark"] == ["t1s0", "t2s0"]
    words = [f"Word {n}." for n in range(KEEP_SEGMENTS + 6)]
    for n, sentence in enumerate(words):
        playout.say(3, n, sentence)
    await wait_marks(sink, 2 + len(words))
    assert playout.marked(f"t3s{len(words) - 1}") is not None  # the carrier played it all
    playout.interrupt()
    assert playout.heard(3) == " ".join(words)
    for turn in range(4, 4 + 3 * KEEP_TURNS):
        playout.say(turn, 0, "Ok.")
    await wait_marks(sink, 2 + len(words) + 3 * KEEP_TURNS)
    assert len(playout._said_at) <= KEEP_TURNS + 1 and len(playout._first_audio_sent) <= KEEP_TURNS + 1
    await playout.close()


async def test_a_long_number_is_read_digit_by_digit():
    """An account or card number in a reply is read digit by digit, as on
    the phone: hibari reads a run of digits as one number (a 16-digit card
    number: "four quadrillion...") and fails outright from 37 digits on, so
    that sentence went out as silence while the history counted it said."""
    assert speakable("Card 4111111111111111, order 45291, year 2024.") == (
        "Card 4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1, order 45291, year 2024."
    )
    # A code however short, after a word that names one ("one hundred
    # twenty-three thousand..." for a code), and a card in groups of four;
    # not an amount, nor a number no such word names.
    assert speakable("Your code is 123456. Your PIN is 4321, zip code 94107.") == (
        "Your code is 1 2 3 4 5 6. Your PIN is 4 3 2 1, zip code 9 4 1 0 7."
    )
    assert speakable("The confirmation number is 482193, order number 45291, ext. 204.") == (
        "The confirmation number is 4 8 2 1 9 3, order number 4 5 2 9 1, ext. 2 0 4."
    )
    assert speakable("The card ending in 4242, or 4111 1111 1111 1111.") == (
        "The card ending in 4 2 4 2, or 4 1 1 1, 1 1 1 1, 1 1 1 1, 1 1 1 1."
    )
    for amount in ("Your claim is 500 dollars.", "Your order total is 450.", "Your account has 300 points.",
                   "Your code is 12.5 wide.", "The minimum order is 250.", "The deductible on your policy is 500.",
                   "I can order 100 pizzas.", "In case 200 guests attend.", "Account is 1200 USD.",
                   "In 2019 2020 2021 2022 we grew."):  # fmt: skip
        assert speakable(amount) == amount, speakable(amount)
    # With thousands separators it is an amount, unless past the trillions
    # (13 groups of 123 made hibari raise as 37 plain digits do).
    assert speakable("That is 1,250,000 dollars.") == "That is 1,250,000 dollars."
    # Money is an amount too, with a currency sign or decimals, up to the trillions.
    assert speakable("It costs $2500000, or 1234567.89 euros.") == "It costs $2500000, or 1234567.89 euros."
    assert speakable("$1,000,000,000,000 and ref 12345678.") == "$1,000,000,000,000 and ref 1 2 3 4 5 6 7 8."
    assert speakable("$" + "7" * 16) == "$" + " ".join("7" * 16)
    # A phone number with dashes, digit by digit in its groups; ranges and codes are left alone.
    assert speakable("Reach us at 555-212-4498.") == "Reach us at 5 5 5, 2 1 2, 4 4 9 8."
    # Without an area code the same shape is also a range: a phone number
    # unless the words around it make it one.
    assert speakable("The front desk is 555-0142.") == "The front desk is 5 5 5, 0 1 4 2."
    assert speakable("Sure, it is 555-2123.") == "Sure, it is 5 5 5, 2 1 2 3."
    assert speakable("You'll get a text from 555-2123.") == "You'll get a text from 5 5 5, 2 1 2 3."
    for ranged in ("It usually costs $500-1000.", "Take 200-1000 mg daily.", "Between 100-2500 people came.",
                   "It takes from 100-2000 hours.", "Your deductible is usually 500-1000."):  # fmt: skip
        assert speakable(ranged) == ranged
    assert speakable("Call (415) 555-0100 or 1-800-555-0100.") == (
        "Call 4 1 5, 5 5 5, 0 1 0 0 or 1, 8 0 0, 5 5 5, 0 1 0 0."
    )
    assert speakable("Open 9-5, 2023-2024, order ABC-555-1234.") == "Open 9-5, 2023-2024, order ABC-555-1234."
    # Dots, a plus sign, or spaces after a phone word: a phone number too
    # (each went to the voice as amounts: "four hundred fifteen point...").
    assert speakable("Call 415.555.0100 now.") == "Call 4 1 5, 5 5 5, 0 1 0 0 now."
    assert speakable("Dial +44 20 7946 0958.") == "Dial plus 4 4, 2 0, 7 9 4 6, 0 9 5 8."
    assert speakable("Call us at 415 555 0100.") == "Call us at 4 1 5, 5 5 5, 0 1 0 0."
    assert speakable("Call +1 800 555 0100 24 hours a day.") == "Call plus 1, 8 0 0, 5 5 5, 0 1 0 0 24 hours a day."
    assert speakable("Dial +49 30 12345678.") == "Dial plus 4 9, 3 0, 1 2 3 4 5 6 7 8."
    # Not phone numbers: a version, decimals, numbers with no phone word.
    for kept in ("Update to 1.2.3 today.", "It is 3.14 or 2.71.", "We had 100 200 3000 visitors.", "Score +5 now.",
                 "That is +12.50 dollars.", "Up +12 50 points."):  # fmt: skip
        assert speakable(kept) == kept, speakable(kept)
    grouped = ",".join(["123"] * 13)
    assert speakable(f"Ref {grouped}.") == "Ref " + " ".join("123" * 13) + "."
    tts = shared_tts()
    await tts.warm()
    for text in ("Your reference is " + "7" * 40 + ".", f"Your reference is {grouped}."):
        audio = await tts.synthesize(text)
        assert len(audio) > 0, text


async def test_a_barge_in_cuts_an_earlier_reply_still_playing_ahead_of_the_new_one(server):
    """A Realtime client may create a response once the last one's text is
    done, its audio still going out: both replies are in the playout when
    the caller talks. The clear stops both, and only the newest turn's
    history was cut to what was heard: the earlier one stayed whole, as if
    the caller had heard all of it."""
    from voice.transports.native.call import NativeCall

    call = NativeCall(None, server.runtime)  # no socket: what it sends is recorded
    sent: list[object] = []

    async def record(frame: object) -> None:
        sent.append(frame)

    call.send_frame = record  # type: ignore[method-assign]
    call.playout = Playout(shared_tts(), OutFormat("mulaw", 8000, 160), call)
    earlier = "The ferry leaves at nine. It takes about two hours. Bring your ticket."
    try:
        call.session.history.remember(1, "When does the ferry leave?", earlier)
        await call._on_session_event({"type": "response.done", "turn": 1})  # its text is done
        for index, sentence in enumerate(earlier.split(". ")):
            call.playout.say(1, index, sentence.rstrip(".") + ".")
        call.playout.say(2, 0, "Anything else?")  # the next response, queued behind it
        async with asyncio.timeout(60):  # every sentence sent; turn 1 still plays by the clock
            while len(call.playout.segments) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert call.playing() == 2
        assert await call.cut_reply("barge-in") == 2
        said = [m["content"] for m in call.session.history.messages_so_far if m["role"] == "assistant"]
        assert said != [earlier], said  # cut to what the clock says was heard, not kept whole
    finally:
        call.finished = True  # its settle timer does nothing now
        await call.playout.close()


def test_the_voice_thread_runs_the_job_due_soonest_and_skips_cancelled_ones() -> None:
    from streaming.priority_worker import PriorityWorker

    worker = PriorityWorker("test-due")
    release = threading.Event()
    ran: list[str] = []
    now = time.monotonic()
    try:
        holding = worker.submit(release.wait, 10.0)  # another call's sentence on the thread
        later = [worker.submit_due(now + 2.0, ran.append, "c-due-in-2s"), worker.submit_due(now + 1.0, ran.append,
                 "b-due-in-1s")]  # fmt: skip
        dropped = worker.submit_due(now, ran.append, "cut-by-barge-in")
        first = worker.submit_due(now, ran.append, "a-due-now")
        assert dropped.cancel()
        release.set()
        for job in (holding, *later, first):
            job.result(timeout=10)
        assert ran == ["a-due-now", "b-due-in-1s", "c-due-in-2s"], ran
        assert dropped.cancelled()
    finally:
        worker.shutdown(cancel_futures=True)
    # A shutdown that does not cancel runs what waits, and leaves nothing pending.
    worker = PriorityWorker("test-due")
    release = threading.Event()
    holding = worker.submit(release.wait, 10.0)
    waiting = worker.submit(ran.append, "after-shutdown")
    stopper = threading.Thread(target=worker.shutdown)
    stopper.start()
    release.set()
    stopper.join(10)
    assert waiting.result(timeout=0) is None and ran[-1] == "after-shutdown" and holding.done()


async def test_a_replys_first_sentence_goes_ahead_of_other_calls_later_ones(monkeypatch):
    """One TTS thread for every call: a first sentence (the caller waits in
    silence) queued behind other replies' later sentences, which had audio
    still playing ahead of them; it goes ahead of them now."""
    tts = shared_tts()
    ran = await spied_synthesis(tts, monkeypatch)
    release = threading.Event()
    holding = asyncio.get_running_loop().run_in_executor(tts._executor, release.wait, 10.0)
    playing_until = time.monotonic() + 3.0  # those calls have 3 s of audio ahead of their next sentence
    later = [asyncio.ensure_future(tts.synthesize(f"Sentence {n} of a reply already playing.", due=playing_until))
             for n in (2, 3)]  # fmt: skip
    first = asyncio.ensure_future(tts.synthesize("Hello, how can I help?"))  # due now: a caller waits in silence
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(holding, *later, first)
    assert ran == ["Hello, how can I help?", "Sentence 2 of a reply already playing.",
                   "Sentence 3 of a reply already playing."], ran  # fmt: skip
