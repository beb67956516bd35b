"""Whisper's no-speech filter: how much speech it drops against how much noise.

Whisper puts words to audio that holds none: tiny.en writes "you" for a
hiss, a tone or a cough, and a call that sends such a sound past the VAD
gets a reply to "you". asr.whisper drops a decode whose no-speech
probability is above ``ASRConfig.no_speech_threshold`` while its mean token
log-probability is below ``no_speech_logprob`` (faster-whisper's rule, whose
0.6 / -1.0 this run moved to 0.7 / -1.0). This decodes, with the server's
decoder and windows, through a mu-law phone line:

* speech: every recorded Asterisk prompt (one word and up), the shared
  clips, and short answers spoken by the embedded TTS voice ("Yes.",
  "No.", "Seven."), the turns a filter would most likely drop;
* noise: the Asterisk tones (beeps, two-tone signals) and synthetic line
  sounds (white, brown and burst noise, hum, DTMF, clicks, a cough-like
  burst) at several levels, each also run through Silero VAD to say
  whether it would reach the decoder in a call at all.

and reports, for a grid of thresholds, speech dropped and noise dropped:

    python -m benchmarks.asr_no_speech [--output benchmarks/results/asr_no_speech.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from asr.config import ASRConfig
from asr.vad import CHUNK, SileroVAD
from asr.whisper import WhisperDecoder
from benchmarks.corpus import (
    ASTERISK_SOUNDS,
    asterisk_prompts,
    load_audio,
    shared_clips,
    spoken,
    through_phone_line,
)

# Short answers a caller gives alone; spoken by the embedded TTS voice.
SHORT_ANSWERS = (
    "Yes.", "No.", "Okay.", "Yeah.", "Sure.", "Nope.", "Thanks.", "Hello?", "Seven.", "Tuesday.",
    "Uh-huh.", "Right.", "Correct.", "Maybe.", "Hi.", "Bye.",
)  # fmt: skip
ASTERISK_TONES = ("beep", "beeperr", "ascending-2tone", "descending-2tone")
# (no-speech probability above, mean log-probability below): the grid.
GRID = [(p, lp) for p in (0.4, 0.5, 0.6, 0.7, 0.8) for lp in (-0.5, -1.0, -1.5, -2.0)]


@dataclass
class Sample:
    kind: str  # speech or noise
    name: str
    audio: np.ndarray  # 16 kHz, as the server hears it


def noise_samples(seconds: float = 2.0, seed: int = 1) -> list[Sample]:
    rng = np.random.default_rng(seed)
    n = int(16000 * seconds)
    t = np.arange(n) / 16000
    white = rng.standard_normal(n).astype(np.float32)
    brown = np.cumsum(rng.standard_normal(n)).astype(np.float32)
    brown -= np.convolve(brown, np.ones(400) / 400, "same").astype(np.float32)
    brown /= float(np.abs(brown).max())
    decay = np.exp(-np.arange(n) / 1500).astype(np.float32)
    raw: dict[str, np.ndarray] = {}
    for level in (0.01, 0.05, 0.2):
        raw[f"white {level}"] = white * level
        raw[f"brown {level}"] = brown * level * 3
        raw[f"cough-like burst {level}"] = white * decay * level * 3
    raw["hum 60 Hz"] = 0.2 * np.sin(2 * np.pi * 60 * t)
    raw["DTMF 5"] = 0.2 * (np.sin(2 * np.pi * 770 * t) + np.sin(2 * np.pi * 1336 * t))
    clicks = np.zeros(n, np.float32)
    clicks[::4000] = 0.9
    raw["clicks"] = clicks
    samples = []
    for name, audio in raw.items():
        audio8k = soxr.resample(audio.astype(np.float32), 16000, 8000)
        samples.append(Sample("noise", name, through_phone_line(np.clip(audio8k, -1, 1))))
    for name in ASTERISK_TONES:
        path = ASTERISK_SOUNDS / f"{name}.wav"
        if path.exists():
            samples.append(Sample("noise", f"asterisk/{name}", through_phone_line(load_audio(path, 8000))))
    return samples


def speech_samples() -> list[Sample]:
    samples = [Sample("speech", u.name, through_phone_line(u.load(8000))) for u in asterisk_prompts(min_words=1)]
    samples += [Sample("speech", u.name, through_phone_line(u.load(8000))) for u in shared_clips()]
    samples += [Sample("speech", f"tts/{text}", through_phone_line(spoken(text, 8000))) for text in SHORT_ANSWERS]
    return samples


def vad_fires(vad: SileroVAD, audio: np.ndarray, threshold: float) -> bool:
    """Whether Silero calls at least 0.2 s of the clip speech (the server's min_speech_s)."""
    probs = vad.stream().process(audio)
    return float(np.count_nonzero(probs > threshold)) * CHUNK / 16000 >= ASRConfig.min_speech_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "asr_no_speech.json"))
    ns = parser.parse_args()
    # Measured but never dropped (no probability is over 1): the rule is applied below.
    config = ASRConfig(no_speech_threshold=1.0)
    decoder = WhisperDecoder(config)
    vad = SileroVAD()
    rows = []
    for sample in speech_samples() + noise_samples():
        decoded = decoder.decode(sample.audio)
        rows.append(
            {
                "kind": sample.kind,
                "name": sample.name,
                "text": decoded.text,
                "no_speech_prob": round(float(decoded.no_speech_prob or 0.0), 4),
                "avg_logprob": round(float(decoded.avg_logprob or 0.0), 4),
                "vad_fires": vad_fires(vad, sample.audio, config.vad_threshold),
            }
        )
    worded = [r for r in rows if r["text"]]
    speech = [r for r in worded if r["kind"] == "speech"]
    noise = [r for r in worded if r["kind"] == "noise"]
    reaching = [r for r in noise if r["vad_fires"]]

    def dropped(group: list[dict], p: float, lp: float) -> list[dict]:
        return [r for r in group if r["no_speech_prob"] > p and r["avg_logprob"] < lp]

    grid = []
    print(f"{len(speech)} speech clips with words, {len(noise)} noise clips Whisper put words to "
          f"({len(reaching)} of them past the VAD)")  # fmt: skip
    print(f"{'no-speech >':>12}{'logprob <':>11}{'speech dropped':>16}{'noise dropped':>15}{'past VAD':>10}")
    for p, lp in GRID:
        ds, dn, dr = dropped(speech, p, lp), dropped(noise, p, lp), dropped(reaching, p, lp)
        grid.append(
            {
                "no_speech_threshold": p,
                "logprob_threshold": lp,
                "speech_dropped": len(ds),
                "speech_dropped_names": [r["name"] for r in ds],
                "noise_dropped": len(dn),
                "noise_past_vad_dropped": len(dr),
            }
        )
        counts = f"{len(ds):>9} / {len(speech):<5}{len(dn):>8} / {len(noise):<5}{len(dr):>5} / {len(reaching)}"
        print(f"{p:>12}{lp:>11}{counts}")
    speech_ns = sorted(r["no_speech_prob"] for r in speech)
    print(f"speech no-speech probability: max {speech_ns[-1]}, p99 {np.percentile(speech_ns, 99):.3f}; "
          f"noise min {min((r['no_speech_prob'] for r in noise), default=None)}")  # fmt: skip
    out = Path(ns.output)
    out.parent.mkdir(exist_ok=True)
    from benchmarks.bench import provenance

    report = {
        **provenance("benchmarks.asr_no_speech"),
        "default": {
            "no_speech_threshold": ASRConfig.no_speech_threshold,
            "logprob_threshold": ASRConfig.no_speech_logprob,
        },
        "speech_with_words": len(speech),
        "noise_with_words": len(noise),
        "noise_with_words_past_vad": len(reaching),
        "grid": grid,
        "clips": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
