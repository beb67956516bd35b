"""Per-call audio budget: a call may not feed audio much faster than real
time. Every frame costs ASR and VAD work on the shared worker, so one client
pushing hours of audio in seconds would starve every other call.

A token bucket in seconds of audio: it refills at ``multiple`` audio-seconds
per wall second and holds ``multiple * window_s`` (a client catching up after
a network stall, or a test sending a short clip at full speed, fits in it).
A frame that does not fit is dropped; the first drop of an episode says so
(:class:`AudioOverBudget`), and a call that keeps it up (more audio dropped
within a few windows than the bucket holds) is ended (:class:`AudioFlood`).

Two buckets (:class:`AudioBudgets`): a burst one (3x over 5 s: a client
catching up) and a sustained one (1.5x over 20 s). A phone line sends at 1x;
a client that keeps feeding audio well past real time for half a minute is
an endless talker, not a line catching up, and is closed like a flood.
"""

from __future__ import annotations

import time
from collections import deque

from streaming.codecs import SAMPLE_BYTES
from voice.call.start import ProtocolError


class AudioOverBudget(ProtocolError):
    """Frames are being dropped: audio arrives faster than the budget."""

    def __init__(self, multiple: float, window_s: float) -> None:
        super().__init__(
            "audio_rate_exceeded",
            f"audio arrives faster than {multiple:g}x real time (over {window_s:g} s); frames are dropped",
        )


class AudioFlood(AudioOverBudget):
    """The excess went on: the call is ended."""


# A drop episode is over once the bucket has refilled this share of itself.
EPISODE_OVER = 0.25


class AudioBudget:
    def __init__(self, multiple: float, window_s: float = 5.0) -> None:
        self.multiple = multiple
        self.window_s = window_s
        self.capacity_s = multiple * window_s
        self.horizon_s = 4 * window_s
        self._tokens = self.capacity_s
        self._at = time.monotonic()
        self._dropping = False
        self._drops: deque[tuple[float, float]] = deque()  # (monotonic, audio s dropped)
        self._dropped_recent = 0.0

    def spend(self, audio_s: float, now: float | None = None) -> bool:
        """Take ``audio_s`` from the bucket: True to keep the frame, False to
        drop it quietly; raises on the first drop of an episode, and when the
        call must end."""
        now = time.monotonic() if now is None else now
        self._tokens = min(self.capacity_s, self._tokens + max(0.0, now - self._at) * self.multiple)
        self._at = now
        if self._tokens >= EPISODE_OVER * self.capacity_s:
            # Refilled this far: the client slowed down, and the next drop is
            # news. (A client held right at the limit keeps or drops frame by
            # frame: that is one episode, not an error per other frame.)
            self._dropping = False
        if audio_s <= self._tokens:
            self._tokens -= audio_s
            return True
        self._drops.append((now, audio_s))
        self._dropped_recent += audio_s
        while self._drops and self._drops[0][0] < now - self.horizon_s:
            self._dropped_recent -= self._drops.popleft()[1]
        if self._dropped_recent > self.capacity_s:
            raise AudioFlood(self.multiple, self.window_s)
        if not self._dropping:  # once per episode, not once per frame
            self._dropping = True
            raise AudioOverBudget(self.multiple, self.window_s)
        return False


class AudioBudgets:
    """Several buckets; a frame is kept only when every one has room for it
    (the first that has none decides: error, drop or close)."""

    def __init__(self, budgets: list[AudioBudget]) -> None:
        self.budgets = budgets

    def spend(self, audio_s: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return all(budget.spend(audio_s, now) for budget in self.budgets)


# What a frame costs the budget at least: the work per frame (decode,
# resample, VAD bookkeeping) does not shrink with its length, so a flood of
# 1-byte frames is charged like one of 2.5 ms frames (at most 600 a second
# within the sustained 1.5x). Not more: a browser's AudioWorklet sends 128
# samples a message (5.3 ms at 24 kHz, 2.7 ms at 48 kHz), and with a 10 ms
# floor such a client, in real time, was charged 1.9x: over the sustained
# 1.5x, so served last, then its frames dropped and its call ended.
MIN_FRAME_S = 0.0025


def frame_seconds(payload_bytes: int, encoding: str, sample_rate: int) -> float:
    return max(MIN_FRAME_S, payload_bytes / (SAMPLE_BYTES.get(encoding, 2) * sample_rate))
