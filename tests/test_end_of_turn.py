"""End of turn (asr/end_of_turn.py): the decision at a pause, with the real
Whisper and Smart Turn models on committed cases spoken by the embedded TTS
(benchmarks/data/eot/pauses.json), the missing-model error, and the
session's pause hook setting the tracker's window."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np
import pytest

from asr.config import ASRConfig
from asr.end_of_turn import (
    SmartTurn,
    SmartTurnMissing,
    asks_llm,
    decide_window,
    find_smart_turn_model,
    wants_marks,
    whisper_marks,
)
from asr.endpointing import endpoint_window, number_read_out, short_answer
from asr.whisper import WhisperDecoder
from benchmarks.end_of_turn import SPEC, Builder, Case
from streaming.codecs import float_to_int16

if TYPE_CHECKING:
    from voice.call.session import CallSession

RATE = 16000
CFG = ASRConfig(end_of_turn="smart_turn+rules")


def _model_path() -> str:
    try:
        return str(find_smart_turn_model())
    except SmartTurnMissing as exc:
        pytest.skip(f"Smart Turn model not on this machine: {exc}")


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    spec = json.loads(SPEC.read_text())
    builder = Builder(spec)
    # account number, last four digits, a list, "and" before the rest, a
    # finished question, "seven thirty" answering "What time would suit you?"
    wanted = {"tts-00", "tts-01", "tts-09", "tts-10", "tts-18", "tts-28"}
    return {item["id"]: builder.spoken(item) for item in spec["spoken"] if item["id"] in wanted}


@pytest.fixture(scope="module")
def smart() -> SmartTurn:
    return SmartTurn(_model_path())


@pytest.fixture(scope="module")
def decoder() -> WhisperDecoder:
    return WhisperDecoder(ASRConfig())


def _at_pause(case: Case, index: int | None, after_s: float = 0.1) -> np.ndarray:
    """The turn's audio up to a pause (or the final end) plus ``after_s`` of
    silence: 0.1 s is what the tracker hands over at ``Paused``."""
    end = case.pauses[index].start_s if index is not None else case.final_start_s + _speech_len(case)
    return case.audio[: int((end + after_s) * RATE)]


def _speech_len(case: Case) -> float:
    tail = case.audio[int(case.final_start_s * RATE) :]
    loud = np.flatnonzero(np.abs(tail) > 0.01)
    return (loud[-1] + 1) / RATE if len(loud) else 0.0


def _decide(audio: np.ndarray, smart: SmartTurn, decoder: WhisperDecoder) -> tuple[float, float, str]:
    text = decoder.decode(audio).text
    probability = smart.probability(audio)
    return decide_window(CFG.end_of_turn, endpoint_window(text, CFG), probability, CFG), probability, text


def test_digit_string_pauses_are_not_the_end(cases: dict[str, Case], smart: SmartTurn, decoder: WhisperDecoder) -> None:
    """ "my account number is | four five two nine one", "the last four
    digits are | seven seven | zero three": wherever Whisper heard the
    words said before the pause (or the first of them), the turn is held.
    A word it made up is its own mistake, not the rules': tiny.en's int8
    kernels differ by CPU, and on one without AVX-512 it hears "my account
    number is full." at the first pause. At most one of the three may be
    such a pause."""
    from asr.wer import normalize

    checked = []
    for case_id, index in (("tts-00", 0), ("tts-01", 0), ("tts-01", 1)):
        window, probability, text = _decide(_at_pause(cases[case_id], index), smart, decoder)
        said = normalize(" ".join(cases[case_id].text.split("|")[: index + 1])).split()
        heard = normalize(text).split()
        if heard != said[: len(heard)]:
            continue  # a word that was not said
        assert window == CFG.endpoint_max_s, (case_id, index, text, probability)
        checked.append((case_id, index))
    assert len(checked) >= 2, checked


def test_a_finished_question_is_the_end(cases: dict[str, Case], smart: SmartTurn, decoder: WhisperDecoder) -> None:
    window, probability, text = _decide(_at_pause(cases["tts-18"], None), smart, decoder)
    assert probability >= CFG.smart_turn_threshold, text
    assert window == CFG.endpoint_min_s, (text, probability)


def test_word_rule_windows() -> None:
    """The word rule (asr/endpointing.py): a finished sentence waits the
    least, a turn that stops on "and", a number or "can you" the most; an
    object pronoun that ends a sentence ("thank you.") does not hold it; a
    number read out in full waits the sure window (on by default)."""
    lo, mid, hi, sure = CFG.endpoint_min_s, CFG.endpoint_unsure_s, CFG.endpoint_max_s, CFG.endpoint_sure_s
    table = {
        "Please hold while we try to connect you.": lo,
        "No, that's all, thank you.": lo,
        "I would like to cancel it.": lo,
        "What time do you open tomorrow?": lo,
        "Can you": hi,
        "Hi, I was wondering if you": hi,
        "The order number is 45291": hi,  # free length: more digits may follow
        "My zip code is 941.": hi,
        "My zip code is 941-07.": sure,  # five digits complete a zip code
        "My zip code it\u2019s 94107.": sure,  # a typographic apostrophe reads as a plain one
        "The last four digits are 7703": sure,
        "My phone number is 555-212-": hi,
        "I need eggs and": hi,
        "Is it": hi,
        "You": hi,
        "Please enter your password.": mid,  # a fragment closed by Whisper's period
        "": mid,
        # Words after which a caller is not done, though Whisper wrote a period.
        "So the reason I'm.": hi,
        "So the reason I\u2019m.": hi,
        "I was wondering whether.": hi,
        "I'm calling regarding.": hi,
        "My account is seven three one.": hi,  # digits spoken as words
        "I'll take the blue one.": lo,  # a lone "one" is not a digit run
        "I was told that.": hi,  # "that" goes on ("I was told that | it shipped")
        # A question mark closes a question on any word but a conjunction,
        # filler or article.
        "Can you repeat that?": lo,
        "Who is this?": lo,
        "What is this regarding?": lo,
        "And?": hi,
        # Finished sentences that end on a word near the list's.
        "I'm two months behind.": mid,
        "Okay, let's.": mid,
    }
    assert {text: endpoint_window(text, CFG) for text in table} == table
    # Fewer words make a sentence: a short one closed by a period is done,
    # a shorter one still unsure, a continuation word still holds.
    three = dataclasses.replace(CFG, endpoint_sentence_words=3)
    assert endpoint_window("Press 0 for help.", three) == lo
    assert endpoint_window("Press 0 for help.", CFG) == mid
    assert endpoint_window("Please hold.", three) == mid
    assert endpoint_window("The number is", three) == hi


def test_a_number_read_out_in_full_ends_the_turn() -> None:
    """A fixed-length field ends at its last digit, whether Whisper wrote
    numerals or words; cut short, of free length, or trailing on, it does not."""
    done = [
        "My phone number is (555) 212-4498.",
        "my zip is 94107",
        "the last four digits are seven seven zero three",
        "Hi. My social security number is 123-45-6789.",
        "The card number is 4111 1111 1111 1111",
        "Can I come in tomorrow at 7:30?",
        "My date of birth is March 3rd, 1985.",
    ]
    not_done = [
        "My phone number is 555-212",
        "My phone number is 555-212-4498,",  # Whisper heard the line go on
        "The last four digits are 77",
        "My account number is 4445291.",  # free length
        "Press 2",
        "My zip code is",
        "94107",  # no field named
        "My zip code is 94107 and",
        "tomorrow at 7",
        "My date of birth is March 3.",
        "at 7:30 and",
        "I live at 730",  # a house number as likely as a time
    ]
    assert [t for t in done if not number_read_out(t)] == []
    assert [t for t in not_done if number_read_out(t)] == []


def test_the_agents_question_says_when_a_number_is_whole() -> None:
    """The caller answers the agent's question: the one field it names
    needs no name in an answer that names no other number, and after a
    question about when a clock time is whole without its colon; the
    question is the line's last question, else its last sentence."""
    zip_code, when = "And what's your zip code?", "When would you like to come in?"
    what_time = "What time would suit you?"
    done = [
        ("94107.", zip_code),
        ("Sure, it's 941 07.", zip_code),
        ("7703", "What are the last four digits of the card?"),
        ("It's 555-212-4498.", "What's the best number to reach you on?"),
        ("730.", what_time),
        ("Tomorrow at 730.", when),
        ("At 7 30", what_time),
        ("10.45", what_time),
        ("94107", "What's your zip code? Take your time."),  # the question, not the last sentence
        ("730", "And what's a good time for you?"),
    ]
    not_done = [
        ("941", zip_code),  # cut short
        ("94107,", zip_code),  # Whisper heard it go on
        ("My phone number is 94107", zip_code),  # the caller named another field
        ("4445291.", "Can I have your account number, please?"),  # free length
        ("7.", what_time),  # "seven | thirty"
        ("1985.", "When were you born?"),  # no clock time
        ("2019", "When did you move in?"),
        ("I live at 730", "Great. I'll book it when you're ready. What's your address?"),  # not the last sentence
        ("941", "What's your zip code? Take your time."),
        ("941", "When you're ready, what's your zip code?"),  # a field's length, whatever else it says
        ("730", "Take your time."),  # no time asked for
        ("Sure, 1045", "Take all the time you need."),
        ("It was 3 15", "When did the charge show up?"),  # the past: a date may go on
        ("The order number is 1045", "When you have it handy, what's the order number?"),
        ("room 730", what_time),  # the caller named another number
        ("The order number is 45291", zip_code),
        ("my account number is 555 123 4567", "What's your phone number?"),
        ("94107", "What are your zip code and phone number?"),  # which one is this?
        ("1" * 5000 + " 30", what_time),  # no crash on a digit run thousands long
        ("730.", None),
        ("94107.", None),
    ]
    assert [x for x in done if not number_read_out(*x)] == []
    assert [x for x in not_done if number_read_out(*x)] == []
    # Whole: the sure window (on by default) from the rules alone.
    assert endpoint_window("730.", CFG, what_time) == CFG.endpoint_sure_s < CFG.endpoint_min_s
    assert endpoint_window("730.", dataclasses.replace(CFG, endpoint_sure_s=0.0), what_time) == CFG.endpoint_min_s
    assert endpoint_window("730.", CFG) == CFG.endpoint_max_s
    # Whisper, hearing a lone number, is unsure of its end: a whole one is not held by it.
    assert whisper_marks("730.", 0.6, what_time) is None and whisper_marks("730.", 0.6) == 0.6


def test_a_short_answer_is_a_turn_of_its_own() -> None:
    """A short answer ("Yes.", "No, thank you.", "Tuesday.") ends a turn like any short one
    ("No." no longer waits the longest window for its "no"); words that go
    on, or more than an answer, do not count."""
    answers = ["Yes.", "No.", "no", "Okay.", "Sure.", "Tuesday.", "No, thank you.", "That's right.", "Yes, please."]
    not_answers = ["No,", "Yes, and", "No more", "You.", "Please.", "Yes I need to change my address.", "the", "All"]
    assert [t for t in answers if not short_answer(t)] == []
    assert [t for t in not_answers if short_answer(t)] == []
    assert endpoint_window("No.", CFG) == CFG.endpoint_unsure_s
    assert endpoint_window("No,", CFG) == CFG.endpoint_max_s
    assert endpoint_window("No and", CFG) == CFG.endpoint_max_s


def test_the_llm_is_asked_only_where_its_answer_could_change_the_window() -> None:
    """asks_llm, shared by the session and benchmarks/end_of_turn.py."""
    llm = dataclasses.replace(CFG, end_of_turn="smart_turn_scaled+rules+llm")
    lo, hi = CFG.endpoint_min_s, CFG.endpoint_max_s
    assert asks_llm("Please enter your password.", lo, llm)
    assert asks_llm("Please enter your password.", None, llm)  # the rule's window not in yet
    assert not asks_llm("Please enter your password.", lo, CFG)  # not an LLM policy
    assert not asks_llm("I want to pay my bill and", hi, llm)  # already the longest wait
    assert not asks_llm("My zip code is 94107.", lo, llm)  # the rule counted the digits
    assert not asks_llm("Yes.", CFG.endpoint_unsure_s, llm)  # an answer on its own
    assert asks_llm("Yes I need", CFG.endpoint_unsure_s, llm)
    assert not asks_llm("", None, llm)


def test_vary_takes_numeric_asr_fields_and_refuses_the_rest() -> None:
    import argparse

    from benchmarks.end_of_turn import parse_vary

    assert parse_vary("endpoint_sentence_words=3,4") == [("endpoint_sentence_words", 3), ("endpoint_sentence_words", 4)]
    assert parse_vary("vad_end_margin=0") == [("vad_end_margin", 0.0)]
    bad_ones = ("end_of_turn=adaptive", "preemptive=0", "no_such_field=1", "vad_end_margin=", "vad_end_margin=x")
    for bad in bad_ones:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_vary(bad)


def test_decide_window_table() -> None:
    cfg = CFG
    lo, mid, hi = cfg.endpoint_min_s, cfg.endpoint_unsure_s, cfg.endpoint_max_s
    # Before anything is known: the unsure window, as today.
    assert decide_window("smart_turn+rules", None, None, cfg) == mid
    # The model is in first: "done" waits for the words, "not done" waits long.
    assert decide_window("smart_turn+rules", None, 0.9, cfg) == mid
    assert decide_window("smart_turn+rules", None, 0.1, cfg) == hi
    # Words before the model: a veto holds, a finished sentence waits for the model.
    assert decide_window("smart_turn+rules", hi, None, cfg) == hi
    assert decide_window("smart_turn+rules", lo, None, cfg) == mid
    # A continuation word / bare number overrides a "done" model.
    assert decide_window("smart_turn+rules", hi, 0.99, cfg) == hi
    assert decide_window("smart_turn+rules", mid, 0.9, cfg) == lo
    assert decide_window("smart_turn+rules", lo, 0.1, cfg) == mid
    assert decide_window("smart_turn+rules", mid, 0.1, cfg) == hi
    # The model alone ignores the words; adaptive ignores the model.
    assert decide_window("smart_turn", hi, 0.99, cfg) == lo
    assert decide_window("adaptive", lo, 0.0, cfg) == lo
    # Scaled: the window grows with the model's doubt, under the same veto.
    assert decide_window("smart_turn_scaled+rules", mid, 1.0, cfg) == lo
    assert decide_window("smart_turn_scaled+rules", mid, 0.0, cfg) == hi
    assert decide_window("smart_turn_scaled+rules", hi, 1.0, cfg) == hi
    # +llm: the LLM's "the sentence goes on" waits long whatever else says done;
    # until it answers (or where it cannot), smart_turn_scaled+rules decides.
    llm = "smart_turn_scaled+rules+llm"
    below, above = cfg.llm_sentence_end_threshold / 2, min(1.0, cfg.llm_sentence_end_threshold * 2)
    assert decide_window(llm, lo, 1.0, cfg, below) == hi
    assert decide_window(llm, lo, 1.0, cfg, above) == lo
    assert decide_window(llm, lo, 1.0, cfg, None) == lo
    assert decide_window(llm, hi, 1.0, cfg, above) == hi  # the rules' veto stands
    assert decide_window(llm, None, None, cfg, above) == mid


def test_decide_window_whisper_table() -> None:
    """whisper+rules: the rules' window unless Whisper's share of a
    sentence end is below its threshold (or the rules already wait the
    longest); +llm adds the LLM's veto. (The sure tier, on by default,
    shortens the rules' shortest window: test_sure_tier_and_short_answer_window.)"""
    cfg = dataclasses.replace(CFG, endpoint_sure_s=0.0)
    lo, mid, hi = cfg.endpoint_min_s, cfg.endpoint_unsure_s, cfg.endpoint_max_s
    sure, unsure = 0.99, cfg.whisper_sentence_end_threshold - 0.1
    assert decide_window("whisper+rules", lo, None, CFG, None, sure) == CFG.endpoint_sure_s  # the default
    assert decide_window("whisper+rules", None, None, cfg) == mid  # the pause decode is not in
    assert decide_window("whisper+rules", lo, None, cfg, None, sure) == lo
    assert decide_window("whisper+rules", mid, None, cfg, None, sure) == mid  # a short sentence waits as the rules say
    assert decide_window("whisper+rules", lo, None, cfg, None, unsure) == hi  # a voice that goes on
    # A hold threshold splits the doubt: below it the longest window, above
    # it (still under the sentence-end threshold) at least the unsure one.
    middle = dataclasses.replace(cfg, whisper_hold_threshold=unsure + 0.05)
    assert decide_window("whisper+rules", lo, None, middle, None, unsure + 0.05) == mid
    assert decide_window("whisper+rules", hi, None, middle, None, unsure + 0.05) == hi  # the rules' veto stands
    assert decide_window("whisper+rules", lo, None, middle, None, unsure) == hi
    assert decide_window("whisper+rules", lo, None, middle, None, sure) == lo
    with pytest.raises(ValueError, match="whisper_hold_threshold"):
        dataclasses.replace(cfg, whisper_hold_threshold=cfg.whisper_sentence_end_threshold + 0.01)
    assert decide_window("whisper+rules", hi, None, cfg, None, sure) == hi  # the rules' veto stands
    assert decide_window("whisper+rules", lo, None, cfg, None, None) == lo  # no marks read: the rules alone
    assert decide_window("whisper+rules", lo, 0.0, cfg, 0.0, sure) == lo  # neither Smart Turn nor the LLM counts
    below = cfg.llm_sentence_end_threshold / 2
    assert decide_window("whisper+rules+llm", lo, None, cfg, below, sure) == hi
    assert decide_window("whisper+rules+llm", None, None, cfg, below, None) == hi
    assert decide_window("whisper+rules+llm", lo, None, cfg, 0.9, sure) == lo
    llm = dataclasses.replace(CFG, end_of_turn="whisper+rules+llm")
    assert asks_llm("Please enter your password.", lo, llm)
    assert asks_llm("Please enter your password.", lo, llm, sure)
    assert not asks_llm("Please enter your password.", lo, llm, unsure)  # the marks already hold it
    # Marks are read only where a pause can end the turn, under a policy that reads them.
    assert wants_marks(dataclasses.replace(CFG, end_of_turn="whisper+rules"))
    assert not wants_marks(dataclasses.replace(CFG, end_of_turn="whisper+rules", auto_turns=False))  # push-to-talk
    assert not wants_marks(dataclasses.replace(CFG, end_of_turn="whisper+rules", adaptive_endpoint=False))
    assert not wants_marks(dataclasses.replace(CFG, end_of_turn="adaptive"))
    # A short answer or a number read out in full is complete by the rules:
    # Whisper's doubt about one word does not hold it.
    assert whisper_marks("Yes.", unsure) is None
    assert whisper_marks("My zip code is 94107.", unsure) is None
    assert whisper_marks("I need eggs.", unsure) == unsure
    assert whisper_marks("I need eggs.", None) is None


def test_sure_tier_and_short_answer_window() -> None:
    """A finished sentence that Whisper closes at or above
    whisper_sure_threshold ends after endpoint_sure_s; below it, or a
    sentence the rules do not call finished, keeps its window. A short
    answer waits endpoint_answer_s."""
    cfg = dataclasses.replace(CFG, end_of_turn="whisper+rules", endpoint_sure_s=0.2, whisper_sure_threshold=0.98)
    lo, mid, hi = cfg.endpoint_min_s, cfg.endpoint_unsure_s, cfg.endpoint_max_s
    assert decide_window("whisper+rules", lo, None, cfg, None, 0.99) == 0.2
    assert decide_window("whisper+rules", lo, None, cfg, None, 0.98) == 0.2
    assert decide_window("whisper+rules", lo, None, cfg, None, 0.97) == lo  # sure enough to end, not to hurry
    assert decide_window("whisper+rules", lo, None, cfg, None, None) == lo  # no marks: no agreement to act on
    assert decide_window("whisper+rules", mid, None, cfg, None, 0.99) == mid  # a short fragment: the rules' window
    assert decide_window("whisper+rules", hi, None, cfg, None, 0.99) == hi
    assert decide_window("adaptive", lo, None, cfg, None, 0.99) == lo  # the rules alone read no marks
    # Off (0), a shortest window set above 0.2 s stays the shortest; on by
    # default, at 0.2 s for a share of 0.95.
    slower = dataclasses.replace(CFG, end_of_turn="whisper+rules", endpoint_min_s=0.5, endpoint_sure_s=0.0)
    assert decide_window("whisper+rules", 0.5, None, slower, None, 0.99) == 0.5
    assert (ASRConfig().endpoint_sure_s, ASRConfig().whisper_sure_threshold) == (0.2, 0.95)
    # A short answer reads no marks, so never the sure tier; a number read
    # out in full reads none either, and is sure by the rules alone.
    for words, window in (("Yes.", mid), ("My zip code is 94107.", 0.2)):
        marks = whisper_marks(words, 0.99)
        assert decide_window("whisper+rules", endpoint_window(words, cfg), None, cfg, None, marks) == window
    # The LLM's veto beats it; before the LLM answers, it stands.
    llm = dataclasses.replace(cfg, end_of_turn="whisper+rules+llm")
    assert decide_window("whisper+rules+llm", lo, None, llm, 0.01, 0.99) == hi
    assert decide_window("whisper+rules+llm", lo, None, llm, None, 0.99) == 0.2
    shorter = dataclasses.replace(cfg, endpoint_min_s=0.15)
    assert decide_window("whisper+rules", 0.15, None, shorter, None, 0.99) == 0.15  # never longer for being sure
    assert endpoint_window("Yes.", CFG) == CFG.endpoint_unsure_s  # 0: as unsure, and follows it
    assert endpoint_window("Yes.", dataclasses.replace(CFG, endpoint_unsure_s=0.6)) == 0.6
    with pytest.raises(ValueError, match="endpoint_answer_s"):
        ASRConfig(endpoint_answer_s=-1)
    from voice.server.cli import build_parser, config_from_args

    def asr(*flags: str) -> ASRConfig:
        return config_from_args(build_parser().parse_args(["serve", *flags])).asr

    assert (asr().endpoint_sure_s, asr().endpoint_answer_s) == (0.2, 0.0)  # the sure tier on, the answer one off
    assert asr("--endpoint-sure-ms", "0").endpoint_sure_s == 0.0
    tuned = asr("--endpoint-sure-ms", "200", "--whisper-sure-threshold", "0.97", "--endpoint-answer-ms", "400")
    assert (tuned.endpoint_sure_s, tuned.whisper_sure_threshold, tuned.endpoint_answer_s) == (0.2, 0.97, 0.4)
    with pytest.raises(ValueError, match="whisper_sure_threshold"):
        ASRConfig(whisper_sure_threshold=1.5)
    assert endpoint_window("No, thank you.", dataclasses.replace(CFG, endpoint_answer_s=0.3)) == 0.3
    assert endpoint_window("No, and", dataclasses.replace(CFG, endpoint_answer_s=0.3)) == hi  # goes on


def test_whisper_marks_hear_a_voice_go_on(cases: dict[str, Case], decoder: WhisperDecoder) -> None:
    """Whisper's share of a sentence end after its last word, read from the
    decode itself: "I want to pay my bill and | check my balance" and "I
    need eggs, | milk..." at the pause (TTS pieces said with the comma's
    rising voice) fall below the threshold, their true ends and a finished
    question do not. The words alone do not tell these pauses: tiny.en
    writes "I need eggs." with a full stop, which the rules take for an end."""
    threshold = CFG.whisper_sentence_end_threshold
    for case_id, index in (("tts-10", 0), ("tts-09", 0)):
        decoded = decoder.decode(_at_pause(cases[case_id], index), marks=True)
        assert decoded.sentence_end_p is not None and decoded.sentence_end_p < threshold, (case_id, decoded)
    for case_id in ("tts-10", "tts-09", "tts-18"):
        decoded = decoder.decode(_at_pause(cases[case_id], None), marks=True)
        assert decoded.sentence_end_p is not None and decoded.sentence_end_p >= threshold, (case_id, decoded)
    # Read only where asked, per item of a batch too.
    audios = [_at_pause(cases["tts-18"], None), _at_pause(cases["tts-10"], 0)]
    assert decoder.decode(audios[0]).sentence_end_p is None
    both = decoder.decode_batch(audios, [True, True], [False, True])
    assert both[0].sentence_end_p is None and both[1].sentence_end_p is not None


def test_marks_read_half_precision_logits() -> None:
    """A float16 decode's logits have no array interface of their own (nor
    does a GPU's: that path cannot run on this machine); both go through
    float32 on the CPU. The share is the full stop's mass among the marks."""
    import ctranslate2

    from asr.whisper import _on_cpu, sentence_end_share

    half = ctranslate2.StorageView.from_array(np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float16))
    logits = _on_cpu(half)
    assert logits.dtype == np.float32 and list(logits) == [0.0, 1.0, 2.0, 3.0]
    share = sentence_end_share(logits, [3], [1])
    assert share == pytest.approx(np.e**2 / (1 + np.e**2))
    assert sentence_end_share(np.array([-np.inf, -np.inf]), [0], [1]) is None


def test_missing_model_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(SmartTurnMissing, match="--fetch"):
        find_smart_turn_model("/nonexistent/smart-turn.onnx")
    from voice.server.cli import build_parser, config_from_args

    argv = ["serve", "--end-of-turn", "smart_turn", "--smart-turn-model", "/nonexistent.onnx"]
    args = build_parser().parse_args(argv)
    with pytest.raises(SystemExit, match=r"smart-turn-v3\.2-cpu\.onnx not found"):
        config_from_args(args)
    # The default never needs the model.
    assert config_from_args(build_parser().parse_args(["serve"])).asr.end_of_turn == "whisper+rules"


@contextlib.asynccontextmanager
async def _fed_session(
    server: object, audio: np.ndarray, greeting: bool = True, agent: str | None = None, **asr: object
) -> AsyncIterator[CallSession]:
    """A call on the shared server with these ASR settings, ``audio`` fed at
    once as 20 ms frames; stopped on the way out. No silent-line filler: the
    test decides how much silence the tracker hears. ``agent``: a line the
    agent said before the audio (as a greeting or a reply would)."""
    from voice.call.session import CallSession
    from voice.call.start import Start

    async def emit(event: dict[str, object]) -> None:
        return None

    session = CallSession(server.runtime, emit)  # type: ignore[attr-defined]
    session.asr_config = dataclasses.replace(
        server.runtime.config.asr,  # type: ignore[attr-defined]
        silent_line_s=0.0,
        **asr,
    )
    await session.start(Start(encoding="pcm16", sample_rate=RATE, server_greeting=greeting))
    if agent is not None:
        session.history.remember(0, "", agent)
    try:
        pcm = float_to_int16(audio).tobytes()
        for i in range(0, len(pcm), 640):
            await session.audio(pcm[i : i + 640])
        yield session
    finally:
        await session.stop()


async def _window_at(
    server: object, audio: np.ndarray, policy: str, wait_llm: bool = False
) -> tuple[float, float | None]:
    """The tracker's window once the pause's inputs are in (the decode's
    words, Smart Turn, and with ``wait_llm`` the LLM's answer), and the LLM's
    P(the sentence ends here) (None where it was not asked)."""
    model = _model_path()
    async with _fed_session(server, audio, end_of_turn=policy, smart_turn_model=model) as session:
        # Up to 20 s: a child started without --end-of-turn ...+llm reads the
        # GGUF's chat template at its first probe (seconds on 2 busy cores).
        for _ in range(400):
            if session._eot_rule is not None and session._eot_prob is not None:
                if not wait_llm or session._eot_llm is not None:
                    break
            await asyncio.sleep(0.05)
        assert session._eot_rule is not None and session._eot_prob is not None
        assert session._tracker is not None
        return session._tracker.endpoint_s, session._eot_llm


async def test_pause_hook_sets_the_window(server: object, cases: dict[str, Case]) -> None:
    # 0.25 s of silence: enough for Paused, short of every window, so the
    # turn is still open when the window is read.
    window, _ = await _window_at(server, _at_pause(cases["tts-00"], 0, after_s=0.25), "smart_turn+rules")
    assert window == CFG.endpoint_max_s
    window, _ = await _window_at(server, _at_pause(cases["tts-18"], None, after_s=0.25), "smart_turn+rules")
    assert window == CFG.endpoint_min_s


async def _rule_window_without_preemption(
    server: object, audio: np.ndarray, expected: float, policy: str = "adaptive"
) -> str:
    """The window once the pause's words are in, on a call with no
    preemptive turn, fed at once; the words that chose it."""
    async with _fed_session(server, audio, greeting=False, end_of_turn=policy, preemptive=False) as session:
        assert session._pending is None and session._tracker is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                while session._tracker.endpoint_s != expected:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        return f"{session._tracker.endpoint_s} from {session._last_partial!r}"


async def test_without_a_preemptive_turn_the_pause_s_own_words_choose_the_window(
    server: object, cases: dict[str, Case]
) -> None:
    """With no preemptive turn at the pause (preemption off, its budget
    spent), the window came from the last partial, which can be a second
    behind the caller (here, fed at once, there was none): "my account
    number is" and "is the pharmacy open right now?" both got the unsure
    window. The pause is decoded itself, as a preemptive turn's is."""
    # 0.25 s of silence: the pause is heard, no window has passed.
    got = await _rule_window_without_preemption(server, _at_pause(cases["tts-00"], 0, after_s=0.25), CFG.endpoint_max_s)
    assert got.startswith(f"{CFG.endpoint_max_s} "), got
    got = await _rule_window_without_preemption(
        server, _at_pause(cases["tts-18"], None, after_s=0.25), CFG.endpoint_min_s
    )
    assert got.startswith(f"{CFG.endpoint_min_s} "), got
    # Under Whisper's marks the pause's own decode reads them too: "I want to
    # pay my bill and" (heard as a finished "...and check.") is held.
    got = await _rule_window_without_preemption(
        server, _at_pause(cases["tts-10"], 0, after_s=0.25), CFG.endpoint_max_s, "whisper+rules"
    )
    assert got.startswith(f"{CFG.endpoint_max_s} "), got


async def test_the_llm_hears_a_sentence_go_on(server: object, cases: dict[str, Case]) -> None:
    """smart_turn_scaled+rules+llm through the server's own engine (the
    supervised child, over its sentence-end route): "I want to pay my bill
    and" is not over; "is the pharmacy open right now?" is."""
    policy = "smart_turn_scaled+rules+llm"
    threshold = CFG.llm_sentence_end_threshold
    window, p = await _window_at(server, _at_pause(cases["tts-10"], 0, after_s=0.25), policy, wait_llm=True)
    assert p is not None and p < threshold and window == CFG.endpoint_max_s
    window, p = await _window_at(server, _at_pause(cases["tts-18"], None, after_s=0.25), policy, wait_llm=True)
    assert p is not None and p >= threshold and window < CFG.endpoint_unsure_s


async def test_whisper_marks_choose_the_window_in_the_session(server: object, cases: dict[str, Case]) -> None:
    """whisper+rules through the server's own ASR worker (its decoder
    process): the preemptive turn's pause decode asks for Whisper's marks
    and the session's window reads them. "I want to pay my bill and" (heard
    as a finished "...and check.", which the rules alone end in 0.3 s) waits
    the longest window; the finished question the shortest."""

    async def window_at(audio: np.ndarray, agent: str | None = None) -> tuple[float, float | None]:
        async with _fed_session(server, audio, greeting=False, agent=agent, end_of_turn="whisper+rules") as session:
            async with asyncio.timeout(20):
                while session._eot_rule is None or session._eot_whisper is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert session._tracker is not None
            return session._tracker.endpoint_s, session._eot_whisper

    window, share = await window_at(_at_pause(cases["tts-10"], 0, after_s=0.25))
    assert window == CFG.endpoint_max_s, share
    window, share = await window_at(_at_pause(cases["tts-18"], None, after_s=0.25))
    assert share is not None and share >= CFG.whisper_sure_threshold and window == CFG.endpoint_sure_s, share
    # "Seven thirty." answering "What time would suit you?" is a whole answer;
    # the same words with no question before them may be a house number going on.
    # (With the question, Whisper's marks are not read for a whole number:
    # the window is waited for, as the marks never come.)
    seven_thirty = _at_pause(cases["tts-28"], None, after_s=0.25)
    async with _fed_session(
        server, seven_thirty, greeting=False, agent=cases["tts-28"].agent, end_of_turn="whisper+rules"
    ) as session:
        assert session._tracker is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                while session._tracker.endpoint_s != CFG.endpoint_sure_s:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        assert session._tracker.endpoint_s == CFG.endpoint_sure_s, (session._last_partial, session._eot_whisper)
    window, share = await window_at(seven_thirty)
    assert window == CFG.endpoint_max_s, share


def test_a_past_run_is_checked_against_todays_word_rules() -> None:
    """benchmarks.word_rules_check names the recorded pauses whose window a
    rule change moves (here one recorded under the old "that" rule)."""
    from benchmarks.word_rules_check import changed_windows

    recorded = {
        "labelled_inputs": [
            {"case": "a", "label": "END:question", "text": "Can you repeat that?", "rule_window_s": 1.2},
            {"case": "b", "label": "mid-sentence", "text": "My number is", "rule_window_s": 1.2},
        ]
    }
    assert [x["case"] for x in changed_windows(recorded, CFG)] == ["a"]


def test_holdout_labels_come_from_the_transcript() -> None:
    """The held-out set's pauses: one inside a sentence at a boundary the
    transcript leaves unpunctuated, one at a sentence end (complete), none
    where Whisper's words and the transcript disagree."""
    from benchmarks.make_eot_holdout import holdout_item

    ref = "That agent is already logged on.  Please enter your agent number followed by the pound key."
    item = holdout_item("x", ref, ref.split())
    assert item is not None
    kinds = [(p["after_words"], p["kind"], p.get("complete", False)) for p in item["pauses"]]
    assert (6, "between-sentences", True) in kinds
    inside = [k for k in kinds if not k[2]]
    assert len(inside) == 1 and inside[0][0] not in (6, 16)
    assert item["text"].replace(" |", "").split() == ref.split()
    # Whisper heard other words: no item (its labels could be wrong).
    assert holdout_item("x", ref, ref.replace("agent number", "agent numbers").split()) is None
    # Punctuation Whisper writes is ignored: labels are the transcript's.
    heard = "Please enter a new extension followed by pound".split()
    item = holdout_item("y", "Please enter a new extension, followed by pound.", heard)
    assert item is not None and all(p["kind"] != "between-sentences" for p in item["pauses"])
    assert "extension, |" not in item["text"]
    # Three sentences: no place to pause that the labels can name.
    assert (
        holdout_item(
            "z",
            "One two three. Four five six. Seven eight nine.",
            "One two three. Four five six. Seven eight nine.".split(),
        )
        is None
    )


def test_combined_probe_scores_and_fits() -> None:
    """The combination probe's AUC counts ties as half and its regression
    ranks a separable input the right way round (it fits one set and
    scores the other: a sign error would read as "no gain")."""
    from benchmarks.end_of_turn_combined import Logistic, auc

    assert auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(0.875)
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-2, 1, 50), rng.normal(2, 1, 50)][:, None]
    y = np.r_[np.zeros(50), np.ones(50)]
    p = Logistic().fit(x, y).probability(x)
    assert auc(y, p) > 0.95 and p[:50].mean() < 0.5 < p[50:].mean()


def test_every_labelled_pause_of_a_two_sentence_turn_is_read(decoder: WhisperDecoder) -> None:
    """Where a recording pauses on its own between two sentences and the
    set inserts its pause there, the inputs are read at that pause (the
    last pause event before the inserted silence ends), not dropped as a
    gap inside the speech: every labelled pause and the end get one entry,
    in order (6 of 14 such pauses of the held-out set were missing)."""
    from asr.vad import SileroVAD
    from benchmarks.end_of_turn import Features, labelled_inputs
    from benchmarks.make_eot_holdout import HOLDOUT

    spec = json.loads(HOLDOUT.read_text())
    builder = Builder(spec)
    two = [x for x in spec["recorded"] if any(p["kind"] == "between-sentences" for p in x["pauses"])]
    assert two, "the held-out set has no two-sentence turn"
    features = Features(decoder, None, None)
    vad = SileroVAD()
    for item in two:
        try:
            case = builder.recorded(item)
        except StopIteration:
            pytest.skip("asterisk-core-sounds-en-wav not installed")
        got = [x["label"] for x in labelled_inputs(case, vad, features)]
        assert got == [p["kind"] for p in item["pauses"]] + ["END:statement"], (item["clip"], got)
