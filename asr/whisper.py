"""One Whisper model, decoding whole utterances in a short padded window.

faster-whisper's ``transcribe`` always pads the mel features to 3000 frames
(30 s), so a 2 s utterance costs as much encoder work as a 30 s one. For a
phone turn that is the single largest ASR cost, so this module drives the
CTranslate2 model directly: mel features padded to the smallest window in
``ASRConfig.pad_windows_s`` that holds the audio (see
``benchmarks/asr_padding.py`` for the speed / WER trade-off behind the
default), one greedy decode, no timestamps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from asr.config import ASRConfig
from asr.models import resolve_whisper_model

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 100  # Whisper mel hop is 10 ms


@dataclass
class Decoded:
    text: str
    audio_s: float
    decode_s: float
    window_s: int


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
        self._prompt = [*self.tokenizer.sot_sequence, self.tokenizer.no_timestamps]
        self._suppress = [-1, *self.tokenizer.non_speech_tokens]

    def window_for(self, audio_s: float) -> int:
        """Smallest configured window holding the audio (Whisper's max is 30 s)."""
        for window in sorted(self.config.pad_windows_s):
            if audio_s <= window:
                return window
        return 30

    def decode(self, audio: np.ndarray) -> Decoded:
        """float32 16 kHz mono -> text."""
        from faster_whisper.audio import pad_or_trim

        audio = audio[-30 * SAMPLE_RATE :]
        audio_s = len(audio) / SAMPLE_RATE
        window = self.window_for(audio_s)
        started = time.perf_counter()
        features = self.model.feature_extractor(audio, chunk_length=window)
        features = pad_or_trim(features, window * FRAMES_PER_SECOND)
        encoded = self.model.encode(features)
        # Whisper emits roughly 3-4 tokens per second of speech; the cap keeps
        # a hallucination loop from running to the model's 448-token limit.
        max_length = min(448 // 2, len(self._prompt) + 10 + math.ceil(audio_s * 8))
        result = self.model.model.generate(
            encoded,
            [self._prompt],
            beam_size=self.config.beam_size,
            max_length=max_length,
            suppress_blank=True,
            suppress_tokens=self._suppress,
            return_scores=False,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self.tokenizer.eot]
        text = self.tokenizer.decode(tokens).strip()
        return Decoded(text, audio_s, time.perf_counter() - started, window)
