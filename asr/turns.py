"""Per-call turn tracking: VAD over the incoming audio decides when the caller
starts speaking, when a partial transcript is due, and when the turn ends.

Pure and synchronous: :meth:`TurnTracker.feed` takes 16 kHz audio and
returns events; the call session acts on them (decodes, barge-in). All
durations are in *audio* time, so behaviour does not depend on how fast the
client sends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from asr.config import ASRConfig
from asr.vad import CHUNK, VADStream

RATE = 16000
CHUNK_S = CHUNK / RATE
UNCONFIRMED_CAP_S = 3.0


@dataclass
class SpeechStarted:
    """The caller is talking (confirmed: at least ``min_speech_s`` of voice)."""

    audio_s: float  # stream position of the first voiced chunk


@dataclass
class PartialDue:
    audio: np.ndarray


@dataclass
class Paused:
    """The caller went quiet (``pause_s`` of silence) mid-turn. ``audio`` is
    the turn so far; if no voice follows, it is exactly what the turn holds
    at its end, so work started on it now is work the endpoint need not wait for."""

    audio: np.ndarray
    speech_end_audio_s: float


@dataclass
class Resumed:
    """Voice again after a :class:`Paused`: the pause was not the end."""


@dataclass
class TurnEnded:
    audio: np.ndarray
    speech_end_audio_s: float  # stream position just after the last voiced chunk
    forced: bool = False  # ended by the client (commit) or the length cap, not by silence


Event = SpeechStarted | PartialDue | Paused | Resumed | TurnEnded


class TurnTracker:
    def __init__(self, config: ASRConfig, vad: VADStream) -> None:
        self.config = config
        self.vad = vad
        self._pre_chunks = max(1, round(config.pre_speech_pad_s / CHUNK_S))
        self._pre: deque[np.ndarray] = deque(maxlen=self._pre_chunks)
        self._pending = np.zeros(0, dtype=np.float32)
        self._position_chunks = 0
        # Where (in chunks) the length cap last cut a turn mid-speech: voice
        # again within the endpoint window of it is the same speech going on.
        self._cut_at: int | None = None
        self._reset_turn()

    def _reset_turn(self) -> None:
        self.endpoint_s = self._initial_window()
        self._paused = False
        self._chunks: list[np.ndarray] = []
        self._in_turn = False
        self._confirmed = False
        self._voiced_chunks = 0
        self._silent_run = 0
        # In-between chunks since the last voiced one (vad_soft_hold_max_s).
        self._soft_held = 0
        self._first_voiced = 0
        self._last_voiced_end = 0
        self._partial_at_chunks = 0
        # Push-to-talk: silent chunks past the endpoint window, not kept.
        self._held_silence = 0

    @property
    def in_speech(self) -> bool:
        return self._confirmed

    @property
    def position_s(self) -> float:
        return self._position_chunks * CHUNK_S

    def feed(self, samples: np.ndarray) -> list[Event]:
        audio = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n = len(audio) // CHUNK
        self._pending = audio[n * CHUNK :].copy()
        if n == 0:
            return []
        chunks = audio[: n * CHUNK].reshape(n, CHUNK)
        probs = self.vad.process(chunks.reshape(-1))
        events: list[Event] = []
        for chunk, prob in zip(chunks, probs, strict=True):
            event = self._step(chunk, float(prob))
            if event is not None:
                events.append(event)
        partial = self._partial_if_due()
        if partial is not None:
            events.append(partial)
        return events

    def _step(self, chunk: np.ndarray, prob: float) -> Event | None:
        cfg = self.config
        self._position_chunks += 1
        voiced = prob >= cfg.vad_threshold
        # Hysteresis: once in a turn, a chunk counts as silence only well
        # below the threshold (vad_end_margin), so soft word endings don't
        # start the clock.
        silent = prob < max(cfg.vad_threshold - cfg.vad_end_margin, 0.05)
        if not voiced and not silent and self._in_turn:
            # ...for a while: a run of them that long is the line's noise
            # sitting in the band, not a word's tail (real speech held at
            # most 320 ms in 1,563 gaps, benchmarks/vad_soft_runs.py), and
            # holding for ever would end the turn only at the length cap.
            self._soft_held += 1
            silent = self._soft_held * CHUNK_S > cfg.vad_soft_hold_max_s + 1e-9
        if not self._in_turn:
            if not voiced:
                self._pre.append(chunk)
                return None
            self._in_turn = True
            self._chunks = list(self._pre)
            self._pre.clear()
            self._first_voiced = self._position_chunks - 1
        self._chunks.append(chunk)
        event: Event | None = None
        if voiced:
            self._voiced_chunks += 1
            self._silent_run = 0
            self._soft_held = 0
            self._held_silence = 0
            self._last_voiced_end = self._position_chunks
            if self._paused:
                self._paused = False
                self.endpoint_s = self._initial_window()
                event = Resumed()
        elif silent:
            self._silent_run += 1
        if not self._confirmed and (self._voiced_chunks * CHUNK_S >= cfg.min_speech_s or self._goes_on_after_cut()):
            self._confirmed = True
            event = SpeechStarted(self._first_voiced * CHUNK_S)
        if self._confirmed and not self._paused and self._silent_run * CHUNK_S >= cfg.pause_s - 1e-9:
            self._paused = True
            event = Paused(self._turn_audio(), self._last_voiced_end * CHUNK_S)
        if self._silent_run * CHUNK_S >= self.endpoint_s - 1e-9:
            if self._confirmed and cfg.auto_turns:
                return self._end_turn(forced=False)
            if self._confirmed or not cfg.auto_turns:
                # Push-to-talk: the turn lasts until the client commits, but
                # not its silence: kept, minutes of it grew the buffer without
                # bound, and the length cap then fired on the next word with
                # a turn whose last 30 s (all Whisper hears) were silence.
                # Also a turn shorter than min_speech_s: the client, not the
                # window, says what was speech ("Yes" is 0.2 s of voice, and
                # was dropped before a commit 0.8 s later found it).
                self._chunks.pop()
                self._held_silence += 1
                return event
            self._reset_turn()  # a click or a breath: never became speech
            return None
        if self._confirmed and len(self._chunks) * CHUNK_S >= cfg.max_utterance_s:
            # Reached in a pause, the turn's words are the pause's: not forced,
            # so the work started at the pause is kept, not thrown away.
            forced = not self._paused
            ended = self._end_turn(forced=forced)
            # Cut mid-speech: the words right after are the same speech, a
            # turn however short (a last word under min_speech_s was dropped).
            self._cut_at = self._position_chunks if forced else None
            return ended
        if not self._confirmed and len(self._chunks) * CHUNK_S >= UNCONFIRMED_CAP_S:
            # VAD hovering just under the threshold for seconds: noise, not a
            # turn. Drop it so the buffer cannot grow without bound.
            self._reset_turn()
            return None
        return event

    def _goes_on_after_cut(self) -> bool:
        """This turn's voice began within the endpoint window of a cut by
        the length cap: it is the speech that was cut, going on."""
        if self._cut_at is None:
            return False
        return (self._first_voiced - self._cut_at) * CHUNK_S < self._initial_window()

    def _partial_if_due(self) -> PartialDue | None:
        cfg = self.config
        if not (cfg.partials and self._confirmed and self._silent_run == 0):
            return None
        total = len(self._chunks)
        new_s = (total - self._partial_at_chunks) * CHUNK_S
        if self._partial_at_chunks and new_s < cfg.partial_interval_s:
            return None
        if new_s < cfg.partial_min_new_audio_s:
            return None
        self._partial_at_chunks = total
        return PartialDue(np.concatenate(self._chunks))

    def _initial_window(self) -> float:
        # Adaptive: until the pause's words are decoded, wait as long as when
        # unsure; the decode (~0.1 s) normally lands well inside it.
        cfg = self.config
        return cfg.endpoint_unsure_s if cfg.adaptive_endpoint else cfg.endpoint_silence_s

    def reconfigure(self, config: ASRConfig) -> None:
        """New settings from the next chunk on (a client changed its end of
        turn mid-call). A pause already timing keeps the window chosen for
        it; otherwise the window is the new settings' own."""
        self.config = config
        if not self._paused:
            self.endpoint_s = self._initial_window()

    def set_endpoint(self, seconds: float) -> None:
        """Change this turn's silence window (adaptive endpointing). Takes
        effect on the next chunk; resets when the turn ends or voice resumes."""
        self.endpoint_s = seconds

    def _turn_audio(self) -> np.ndarray:
        # Up to pause_s of trailing silence (Whisper likes to hear the end of
        # the last word) but not the whole endpoint window. Paused and
        # TurnEnded cut at the same place, so their audio is identical when
        # no voice came in between.
        keep_after = max(1, round(self.config.pause_s / CHUNK_S))
        trailing = self._position_chunks - self._last_voiced_end - self._held_silence
        voiced_end_index = len(self._chunks) - trailing
        return np.concatenate(self._chunks[: voiced_end_index + keep_after])

    def _end_turn(self, forced: bool) -> TurnEnded:
        ended = TurnEnded(self._turn_audio(), self._last_voiced_end * CHUNK_S, forced)
        self._reset_turn()
        return ended

    def commit(self) -> TurnEnded | None:
        """The client says the turn is over now (push-to-talk, end of file)."""
        if not self._in_turn or not self._voiced_chunks:
            self._reset_turn()
            return None
        if len(self._pending):
            # The turn's audio ends with the samples short of a chunk; they
            # stay pending too, so the stream position, counted in whole
            # chunks, still counts them once the next chunk is full: dropped,
            # each commit set every later position up to 32 ms early.
            self._chunks.append(self._pending.copy())
        return self._end_turn(forced=True)
