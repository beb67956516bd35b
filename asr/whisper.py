"""One Whisper model, decoding whole utterances in a short padded window.

faster-whisper's ``transcribe`` always pads the mel features to 3000 frames
(30 s), so a 2 s utterance costs as much encoder work as a 30 s one. For a
phone turn that is the single largest ASR cost, so this module drives the
CTranslate2 model directly: mel features padded to the smallest window in
``ASRConfig.pad_windows_s`` that holds the audio (see
``benchmarks/asr_padding.py`` for the speed / WER trade-off behind the
default), one greedy decode, no timestamps.

Several utterances (from different calls) can share one CTranslate2 call
(:meth:`WhisperDecoder.decode_batch`): their features are stacked into one
``[batch, n_mels, frames]`` array, which needs one window length for all, so
every item is padded to the largest window among them. ``asr.worker`` decides
which utterances go together (see ``benchmarks/asr_batching.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from asr.config import ASRConfig
from asr.loops import cut_loop
from asr.models import resolve_whisper_model

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 100  # Whisper mel hop is 10 ms
MAX_WINDOW_S = 30  # Whisper's encoder input is at most 30 s
# A short window's known failure: tiny.en sometimes ends a long turn with
# pauses inside after its first sentence (a 10 s cut of
# asterisk/conf-adminmenu-162 decodes as "Please press one to mute or unmute
# yourself." in the 10 s window, all 24 words in 30 s). Such a decode has far
# fewer words than its voiced seconds hold (a look by hand, not a committed
# benchmark: the 28 Asterisk prompts and shared clips with at least 4 s of
# voice have references at 2.8-4.1 words per voiced second; two prompts over
# 20 s that stop early in the 30 s window itself, which nothing here helps,
# decode at 0.5 and 1.9). Below this rate, over at least
# CUT_SHORT_MIN_VOICED_S of voice, a final decoded in a shorter window is
# done again in the 30 s one.
CUT_SHORT_WORDS_PER_S = 2.0
CUT_SHORT_MIN_VOICED_S = 4.0
# A transcript with none of these holds no words (only punctuation).
WORD_CHAR = re.compile(r"\w")
# What Whisper may write right after its last word: a sentence end, or
# punctuation that goes on. It picks from the voice as much as the words
# (the same "Please hold" gets a full stop when the voice falls, a comma
# when it holds): benchmarks/end_of_turn_whisper_punct.py measures it.
SENTENCE_END_MARKS = (".", "?", "!")
CONTINUE_MARKS = (",", "...", "…", " ...")


def punctuation_ids(tokenizer: object) -> tuple[list[int], list[int]]:
    """Token ids of the sentence-end and the going-on marks (those that are
    one token in this vocabulary)."""

    def ids(marks: tuple[str, ...]) -> list[int]:
        encoded = (tokenizer.encode(mark) for mark in marks)  # type: ignore[attr-defined]
        return sorted({tokens[0] for tokens in encoded if len(tokens) == 1})

    return ids(SENTENCE_END_MARKS), ids(CONTINUE_MARKS)


def _on_cpu(logits: object) -> np.ndarray:
    """One step's logits as float32 numpy: on a GPU, or in float16 /
    bfloat16, a StorageView has no array interface of its own."""
    import ctranslate2

    view = logits
    if getattr(view, "dtype", ctranslate2.DataType.float32) != ctranslate2.DataType.float32:
        view = view.to(ctranslate2.DataType.float32)  # type: ignore[attr-defined]
    if getattr(view, "device", "cpu") != "cpu":
        view = view.to_device(ctranslate2.Device.cpu)  # type: ignore[attr-defined]
    return np.asarray(view)


def sentence_end_share(logits: np.ndarray, end_ids: list[int], continue_ids: list[int]) -> float | None:
    """P(. ? !) against P(. ? ! , ...) from one step's logits; None when the
    step allows none of them."""
    marks = np.asarray(logits, dtype=np.float64)[end_ids + continue_ids]
    top = marks.max()
    if not np.isfinite(top):
        return None
    weights = np.exp(marks - top)
    return float(weights[: len(end_ids)].sum() / weights.sum())


@dataclass
class Decoded:
    text: str
    audio_s: float
    # Seconds of the CTranslate2 call that produced this text (shared by every
    # item of a batch: that is how long each of them took).
    decode_s: float
    window_s: int
    # Filled in by asr.worker: how many utterances shared the call, and how
    # long this one waited in the worker's queue before it started.
    batch_size: int = 1
    queue_s: float = 0.0
    # Decoded again in the 30 s window: the first decode stopped early
    # (cut_short); redecode_s is that second decode alone, which the worker
    # charges to this item's call, not to the batch it came in.
    redecoded: bool = False
    redecode_s: float = 0.0
    # A batch item that stopped early and is to be decoded again alone
    # (decode_long): a batch returns at once, so the 30 s decode of one of
    # its items does not hold the others' words back (asr.worker does it
    # after delivering them).
    retry_alone: bool = False
    # Whisper's probability that the audio holds no speech, and its words'
    # mean log-probability (None: not measured: the filter is off, or a
    # segmented decode, which faster-whisper filters itself). no_speech: words were heard but dropped
    # as noise by ASRConfig.no_speech_threshold.
    no_speech_prob: float | None = None
    avg_logprob: float | None = None
    no_speech: bool = False
    # Whisper's P(. ? !) against P(. ? ! , ...) right after its last word
    # (sentence_end_share), where the decode asked for it (``marks``): an
    # end-of-turn input (asr/end_of_turn.py). None: not asked, no word, a
    # beam search, or a decode done with timestamps.
    sentence_end_p: float | None = None


def keep_longer(first: Decoded, again: Decoded, redo_s: float) -> Decoded:
    """The decode done again in the 30 s window is kept only if it heard more."""
    if len(again.text.split()) > len(first.text.split()):
        return dataclasses.replace(again, batch_size=first.batch_size, redecoded=True, redecode_s=redo_s)
    return dataclasses.replace(first, redecode_s=redo_s, retry_alone=False)


def window_for(audio_s: float, windows: Iterable[int]) -> int:
    """Smallest window holding the audio (Whisper's max is 30 s)."""
    for window in sorted(windows):
        if audio_s <= window:
            return window
    return MAX_WINDOW_S


@dataclass
class _Prepared:
    features: np.ndarray  # [n_mels, frames], not yet padded
    audio_s: float
    window: int
    max_length: int  # CTranslate2 ``max_length`` this item would get alone
    token_cap: int  # tokens CTranslate2 generates at most with that max_length
    audio: np.ndarray  # kept (a reference) for the stopped-early check, which needs the voice
    # All of it, when longer than Whisper's 30 s window (features hold the
    # last 30 s): a final decodes it whole (_segmented), not its tail only.
    whole: np.ndarray | None = None


def voiced_seconds(audio: np.ndarray, frame: int = SAMPLE_RATE // 50) -> float:
    """Seconds of 20 ms frames louder than a fifth of the turn's loud frames
    (the 95th percentile RMS) and than a phone line's noise floor: a rough
    count of speech, enough to see a decode that stopped early."""
    frames = len(audio) // frame
    if frames == 0:
        return 0.0
    rms = np.sqrt(np.mean(np.square(audio[: frames * frame].reshape(frames, frame), dtype=np.float64), axis=1))
    loud = max(0.005, 0.2 * float(np.percentile(rms, 95)))
    return float(np.count_nonzero(rms > loud)) * frame / SAMPLE_RATE


def cut_short(text: str, voiced_s: float) -> bool:
    """Whether a decode has far fewer words than its voice would hold."""
    return voiced_s >= CUT_SHORT_MIN_VOICED_S and len(text.split()) < CUT_SHORT_WORDS_PER_S * voiced_s


class WhisperDecoder:
    """Wraps a faster-whisper model. Not thread-safe: :class:`asr.worker.ASRWorker`
    owns it and runs every decode on its one thread."""

    def __init__(self, config: ASRConfig) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.config = config
        self.model_path = resolve_whisper_model(config.model)
        self.model = WhisperModel(
            self.model_path,
            device=config.device,
            compute_type=config.compute_type,
            cpu_threads=config.threads,
            num_workers=1,
            local_files_only=True,
        )
        multilingual = self.model.model.is_multilingual
        self.tokenizer = Tokenizer(
            self.model.hf_tokenizer,
            multilingual,
            task="transcribe",
            language=(config.language or "en") if multilingual else "en",
        )
        self._language = (config.language or "en") if multilingual else "en"
        self._prompt = [*self.tokenizer.sot_sequence, self.tokenizer.no_timestamps]
        self._suppress = [-1, *self.tokenizer.non_speech_tokens]
        # Whisper's next-token view after the last word (an end-of-turn
        # input) is read only where a decode asks (``marks``): it costs that
        # decode its logits, a vocabulary of floats per token, freed at once.
        # Greedy decoding only: a beam's steps are not one sequence's.
        self.can_mark = config.beam_size == 1
        self._end_ids, self._continue_ids = punctuation_ids(self.tokenizer)
        self._has_word: dict[int, bool] = {}
        self._marks_failed = False  # logged once

    def window_for(self, audio_s: float) -> int:
        """Smallest configured window holding the audio (Whisper's max is 30 s)."""
        return window_for(audio_s, self.config.pad_windows_s)

    def decode(self, audio: np.ndarray, retry_cut_short: bool = True, marks: bool = False) -> Decoded:
        """float32 16 kHz mono -> text. ``retry_cut_short``: a decode that
        stopped early is done again in the 30 s window (see cut_short); the
        worker asks it for finals only, whose words would otherwise be lost
        (a partial's are decoded again anyway, and a caller playing music
        must not make every partial cost a 30 s decode). ``marks``: read
        Decoded.sentence_end_p too."""
        started = time.perf_counter()
        return self._run([self._prepare(audio)], started, [retry_cut_short], marks=[marks])[0]

    def decode_batch(
        self,
        audios: Sequence[np.ndarray],
        retry_cut_short: Sequence[bool] | None = None,
        marks: Sequence[bool] | None = None,
    ) -> list[Decoded]:
        """Several utterances in one CTranslate2 call, results in input order.

        Every item is padded to the largest window among them. Any failure
        (one malformed item, an out-of-memory on the batch) raises for the
        whole batch: the caller (asr.worker) then decodes the items one by one,
        so only the bad one fails.
        """
        started = time.perf_counter()
        items = [self._prepare(audio) for audio in audios]
        return self._run(items, started, retry_cut_short, alone_later=len(items) > 1, marks=marks)

    def decode_long(self, audio: np.ndarray) -> Decoded:
        """Decode in the 30 s window, alone: the retry of a batch item that
        stopped early (Decoded.retry_alone); if it stops early there too,
        with timestamps (_segmented)."""
        started = time.perf_counter()
        return self._run([dataclasses.replace(self._prepare(audio), window=MAX_WINDOW_S)], started, [True])[0]

    def _prepare(self, audio: np.ndarray) -> _Prepared:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            # A (samples, channels) array would be read as thousands of
            # utterances and allocate gigabytes of features: refuse it early.
            raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
        whole = audio if len(audio) > MAX_WINDOW_S * SAMPLE_RATE else None
        audio = audio[-MAX_WINDOW_S * SAMPLE_RATE :]
        audio_s = len(audio) / SAMPLE_RATE
        window = self.window_for(audio_s)
        # The mel features do not depend on the window; only the padding does.
        features = self.model.feature_extractor(audio, chunk_length=window)
        # Whisper emits roughly 3-4 tokens per second of speech (a fast talker
        # 5-6); the cap, ~8 a second, keeps a hallucination loop from running
        # to the model's 448-token limit. CTranslate2's Whisper generates at
        # most min(max_length / 2, max_length - start_step) tokens, start_step
        # being the prompt minus its last token (src/models/whisper.cc): so
        # max_length is twice the tokens wanted (it was not, and the cap was
        # ~4 a second: a fast talker's last words were cut). Kept per item so
        # that a batch, which runs with its largest max_length, can cut each
        # item back to exactly what it would have produced alone.
        max_length = min(448, 2 * (len(self._prompt) + 10 + math.ceil(audio_s * 8)))
        token_cap = min(max_length // 2, max_length - (len(self._prompt) - 1))
        return _Prepared(features, audio_s, window, max_length, token_cap, audio, whole)

    @staticmethod
    def _stopped_early(text: str, item: _Prepared) -> bool:
        """cut_short on the audio's length first (voice is never longer), so
        a decode with a normal word count, nearly all of them, costs no RMS
        pass; only a suspect one counts its voice."""
        return cut_short(text, item.audio_s) and cut_short(text, voiced_seconds(item.audio))

    def _run(
        self,
        items: list[_Prepared],
        started: float,
        retry: Sequence[bool] | None = None,
        alone_later: bool = False,
        marks: Sequence[bool] | None = None,
    ) -> list[Decoded]:
        from faster_whisper.audio import pad_or_trim

        marked = [self.can_mark and marks is not None and bool(marks[i]) for i in range(len(items))]

        if len(items) == 1 and (retry is None or retry[0]) and items[0].whole is not None and not alone_later:
            # A final over 30 s alone is decoded whole (below) and nothing
            # else: its last 30 s decoded first were thrown away, a 30 s
            # encode and decode for nothing. A batch's item still gets that
            # first decode, the words it keeps if the whole one fails.
            return [self._segmented(items[0], started)]
        window = max(item.window for item in items)
        frames = window * FRAMES_PER_SECOND
        features = np.stack([pad_or_trim(item.features, frames) for item in items])
        encoded = self.model.encode(features)
        results = self.model.model.generate(
            encoded,
            [self._prompt] * len(items),
            beam_size=self.config.beam_size,
            max_length=max(item.max_length for item in items),
            suppress_blank=True,
            suppress_tokens=self._suppress,
            # Only for the no-speech filter (a softmax at the first step and a
            # score per sequence; nothing when it is off).
            return_scores=self.config.no_speech_threshold is not None,
            return_no_speech_prob=self.config.no_speech_threshold is not None,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            return_logits_vocab=any(marked),
        )
        elapsed = time.perf_counter() - started
        decoded = []
        for item, result, mark in zip(items, results, marked, strict=True):
            sequence = result.sequences_ids[0]
            tokens = [t for t in sequence[: item.token_cap] if t < self.tokenizer.eot]
            text = self.tokenizer.decode(tokens).strip()
            looped = len(sequence) >= item.token_cap
            if looped:
                # It never stopped by itself: a repetition loop cut by the cap.
                text = cut_loop(text)
            if not WORD_CHAR.search(text):
                # tiny.en writes "." or ". . ." for a breath, a click or a tone:
                # no words, so no turn to answer (the session says turn.empty).
                text = ""
            measured = self.config.no_speech_threshold is not None
            no_speech_prob = float(result.no_speech_prob) if measured else None
            avg_logprob = float(result.scores[0]) if measured else None
            noise = bool(text) and self._is_noise(no_speech_prob, avg_logprob)
            # Not for a loop cut by the cap: its last word is not where it stopped.
            end_p = self._sentence_end_p(result, sequence) if mark and text and not looped and not noise else None
            decoded.append(
                Decoded(
                    "" if noise else text,
                    item.audio_s,
                    elapsed,
                    window,
                    batch_size=len(items),
                    no_speech_prob=no_speech_prob,
                    avg_logprob=avg_logprob,
                    no_speech=noise,
                    sentence_end_p=end_p,
                )
            )
        for i, item in enumerate(items):
            if (retry is None or retry[i]) and item.whole is not None:
                # A final over 30 s (talked-over audio led a long turn): its
                # first words are outside the window; decoded whole, with
                # timestamps, they are not lost.
                if alone_later:
                    decoded[i] = dataclasses.replace(decoded[i], retry_alone=True)
                else:
                    decoded[i] = self._segmented(item, started)
                continue
            # Not for audio the noise filter blanked, nor for audio Whisper
            # wrote no word for at all ("." for hiss or music on hold): that
            # "" is no early stop, and two more passes over noise, the second
            # a whole transcribe, held every other call's final.
            words = decoded[i].text if not decoded[i].no_speech else ""
            if (retry is None or retry[i]) and words and self._stopped_early(words, item):
                # Once, alone, in the longest window (see CUT_SHORT_WORDS_PER_S),
                # or, already in it, with timestamps (below); kept only if it
                # heard more. A batch's items are done again by the worker
                # once the others have their words.
                if alone_later:
                    decoded[i] = dataclasses.replace(decoded[i], retry_alone=True)
                    continue
                redo_started = time.perf_counter()
                if window < MAX_WINDOW_S:
                    longer = dataclasses.replace(item, window=MAX_WINDOW_S)
                    again = self._run([longer], started, [True], marks=[marked[i]])[0]
                else:
                    again = self._segmented(item, started)
                decoded[i] = keep_longer(decoded[i], again, time.perf_counter() - redo_started)
        return decoded

    def _sentence_end_p(self, result: object, sequence: list[int]) -> float | None:
        """sentence_end_share at the step after the last token with a word
        character in it: what Whisper would write next, whether it wrote a
        mark there or ended. ``sequence``: the generated ids, one step each
        (the logits' index), special tokens included."""
        last = -1
        for i, token in enumerate(sequence):
            if token >= self.tokenizer.eot:
                continue  # end of text, a timestamp: no word
            has = self._has_word.get(token)
            if has is None:
                has = self._has_word[token] = bool(WORD_CHAR.search(self.tokenizer.decode([token])))
            if has:
                last = i
        if last < 0:
            return None
        try:
            steps = result.logits[0]  # type: ignore[attr-defined]
            if last + 1 >= len(steps):
                return None
            return sentence_end_share(_on_cpu(steps[last + 1]), self._end_ids, self._continue_ids)
        except Exception:
            # An input lost, not the caller's words: the word rules decide
            # this pause (a device or dtype this code has not met).
            if not self._marks_failed:
                self._marks_failed = True
                log.warning("Whisper's marks could not be read; the word rules decide pauses", exc_info=True)
            return None

    def _is_noise(self, no_speech_prob: float | None, avg_logprob: float | None) -> bool:
        """Words Whisper wrote for audio it also says holds no speech, and
        wrote unsure of (both, as faster-whisper's own filter asks: a quiet
        short answer can score a high no-speech probability and still be
        sure of its word)."""
        threshold = self.config.no_speech_threshold
        if threshold is None or no_speech_prob is None or avg_logprob is None:
            return False
        return no_speech_prob > threshold and avg_logprob < self.config.no_speech_logprob

    def _segmented(self, item: _Prepared, started: float) -> Decoded:
        """The audio decoded with timestamps, segment after segment: a turn
        of 20-28 s that Whisper stopped early in its 30 s window (7 of 59
        words of a 25 s menu prompt) has nowhere longer to go, and without
        timestamps the model ends where its first sentence ends; with them it
        goes on past it. One pass, no temperature fallback: bounded time."""
        source = item.whole if item.whole is not None else item.audio
        segments, _ = self.model.transcribe(
            source,
            language=self._language,
            beam_size=self.config.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            without_timestamps=False,
            vad_filter=False,
            suppress_tokens=self._suppress,
            no_speech_threshold=self.config.no_speech_threshold,
            log_prob_threshold=self.config.no_speech_logprob,
        )
        text = " ".join(segment.text.strip() for segment in segments).strip()
        if not WORD_CHAR.search(text):
            text = ""
        audio_s = len(source) / SAMPLE_RATE
        return Decoded(text, audio_s, time.perf_counter() - started, MAX_WINDOW_S, batch_size=1)
