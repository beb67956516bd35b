"""False cut-offs vs endpoint delay, fixed silence windows vs adaptive.

Real speech with a natural mid-sentence pause: each one-sentence Asterisk
prompt is split at a word boundary in its middle (word times from Whisper)
and a pause of 0.35-0.9 s is inserted there, then 2 s of silence. A policy
*falsely cuts off* the caller if it ends the turn inside that pause; its
*endpoint delay* is the time from the last voiced sample to the turn's end.

The adaptive policy runs exactly as in the server: the turn is decoded at
the start of each pause (real Whisper, on this machine), and the window
chosen from those words applies only once that decode would have finished
(its measured duration, in audio time).

    python -m benchmarks.endpointing [--prompts 48]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from asr.config import ASRConfig
from asr.endpointing import endpoint_window
from asr.turns import CHUNK_S, Paused, Resumed, TurnEnded, TurnTracker
from asr.vad import SileroVAD
from asr.whisper import WhisperDecoder
from benchmarks.bench import write_rows
from benchmarks.corpus import Utterance, asterisk_prompts, through_phone_line

RATE = 16000
FRAME = 320  # 20 ms
PAUSES_S = (0.35, 0.5, 0.7, 0.9)


@dataclasses.dataclass
class Case:
    name: str
    audio: np.ndarray
    pause_start_s: float
    pause_end_s: float
    voice_end_s: float


def build_cases(utts: list[Utterance], n: int) -> list[Case]:
    from faster_whisper import WhisperModel

    from asr.models import embedded_whisper_dir

    aligner = WhisperModel(str(embedded_whisper_dir()), device="cpu", compute_type="int8", cpu_threads=2)
    cases = []
    for i, utt in enumerate(utts):
        if len(cases) >= n:
            break
        audio = through_phone_line(utt.load(8000))
        segments, _ = aligner.transcribe(audio, language="en", word_timestamps=True, vad_filter=False)
        words = [w for s in segments for w in (s.words or [])]
        if len(words) < 5:
            continue
        k = len(words) // 2
        cut = (words[k - 1].end + words[k].start) / 2
        pause = PAUSES_S[i % len(PAUSES_S)]
        cut_i = int(cut * RATE)
        stitched = np.concatenate(
            [audio[:cut_i], np.zeros(int(pause * RATE), np.float32), audio[cut_i:], np.zeros(2 * RATE, np.float32)]
        )
        voice_end = words[-1].end + pause
        cases.append(Case(utt.name, stitched, cut, cut + pause, voice_end))
    return cases


def run_policy(
    case: Case, cfg: ASRConfig, vad: SileroVAD, decoder: WhisperDecoder | None
) -> dict[str, float | bool | list[str]]:
    tracker = TurnTracker(cfg, vad.stream())
    pending_window: tuple[float, float] | None = None  # (apply at stream position, window)
    ends: list[float] = []
    heard: list[str] = []  # the words decoded at each pause, for checking a rule change offline
    for start in range(0, len(case.audio), FRAME):
        position = (start + FRAME) / RATE
        if pending_window is not None and position >= pending_window[0]:
            tracker.set_endpoint(pending_window[1])
            pending_window = None
        for ev in tracker.feed(case.audio[start : start + FRAME]):
            if isinstance(ev, Paused) and decoder is not None and cfg.adaptive_endpoint:
                decoded = decoder.decode(ev.audio)
                heard.append(decoded.text)
                pending_window = (position + decoded.decode_s, endpoint_window(decoded.text, cfg))
            elif isinstance(ev, Resumed):
                pending_window = None
            elif isinstance(ev, TurnEnded):
                ends.append(tracker.position_s)
    first_end = ends[0] if ends else float("inf")
    cut_off = first_end < case.pause_end_s + CHUNK_S
    final_end = next((e for e in ends if e >= case.voice_end_s), None)
    delay = (final_end - case.voice_end_s) if final_end is not None else float("nan")
    return {"cut_off": cut_off, "delay_s": delay, "heard_at_pauses": heard}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "endpointing.json"))
    ns = parser.parse_args()
    started = time.time()
    # One short sentence each (menus read with their own pauses would blur
    # the one pause under test).
    utts = [
        u
        for u in asterisk_prompts(min_words=6)
        if len(u.reference.split()) <= 12 and not any(p in u.reference.rstrip(".!? ") for p in ".,;")
    ]
    cases = build_cases(utts, ns.prompts)
    vad = SileroVAD()
    decoder = WhisperDecoder(ASRConfig())
    policies: dict[str, tuple[ASRConfig, WhisperDecoder | None]] = {
        f"fixed {w:.1f}s": (ASRConfig(endpoint_silence_s=w, adaptive_endpoint=False), None)
        for w in (0.3, 0.5, 0.7, 1.0, 1.2)
    }
    policies["adaptive 0.3/0.5/1.2s"] = (ASRConfig(endpoint_unsure_s=0.5), decoder)
    policies["adaptive 0.3/0.7/1.2s (the word rules)"] = (ASRConfig(), decoder)
    rows = []
    print(f"{len(cases)} turns with a mid-sentence pause of {'/'.join(map(str, PAUSES_S))} s")
    print(f"{'policy':<34}{'false cut-offs':>16}{'mean delay ms':>15}{'p95 delay ms':>14}")
    for name, (cfg, dec) in policies.items():
        results = [run_policy(c, cfg, vad, dec) for c in cases]
        cut = sum(bool(r["cut_off"]) for r in results) / len(results)
        delays = [float(r["delay_s"]) for r in results if not np.isnan(float(r["delay_s"]))]
        mean = statistics.fmean(delays) * 1000 if delays else float("nan")
        p95 = float(np.percentile(delays, 95)) * 1000 if delays else float("nan")
        rows.append({"policy": name, "false_cutoff_rate": cut, "mean_delay_ms": mean, "p95_delay_ms": p95,
                     "cut_off": [c.name for c, r in zip(cases, results, strict=True) if r["cut_off"]],
                     "heard_at_pauses": {c.name: r["heard_at_pauses"] for c, r in zip(cases, results, strict=True)
                                         if r["heard_at_pauses"]}})  # fmt: skip
        print(f"{name:<34}{cut:>15.1%}{mean:>15.0f}{p95:>14.0f}")
    write_rows(Path(ns.output), started, {"turns": len(cases), "pauses_s": PAUSES_S}, rows)


if __name__ == "__main__":
    main()
