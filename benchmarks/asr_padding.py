"""Whisper decode window: speed vs WER, on real speech through a phone line.

faster-whisper pads every decode to 30 s of mel frames. asr.whisper pads to
the smallest window in ``ASRConfig.pad_windows_s`` instead. This compares
window policies on the same utterances in the same run:

    python -m benchmarks.asr_padding [--every 6]

Writes benchmarks/results/asr_padding.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from asr.config import ASRConfig
from asr.wer import corpus_wer
from asr.whisper import WhisperDecoder
from benchmarks.corpus import asterisk_prompts, shared_clips, through_phone_line

POLICIES: dict[str, tuple[int, ...]] = {
    "30s (faster-whisper default)": (30,),
    "10/20/30s (firstline default)": (10, 20, 30),
    "15/30s": (15, 30),
    "5/10/20/30s": (5, 10, 20, 30),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=int, default=6, help="take every Nth Asterisk prompt")
    parser.add_argument("--rounds", type=int, default=2, help="decode each utterance this many times per policy")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "asr_padding.json"))
    ns = parser.parse_args()
    utts = shared_clips() + asterisk_prompts(min_words=2)[:: ns.every]
    audio = [(u, through_phone_line(u.load(8000))) for u in utts]
    decoders = {name: WhisperDecoder(ASRConfig(pad_windows_s=w)) for name, w in POLICIES.items()}
    for dec in decoders.values():
        dec.decode(audio[0][1])  # warm
    times: dict[str, list[float]] = {n: [] for n in POLICIES}
    texts: dict[str, list[str]] = {n: [] for n in POLICIES}
    # Interleave policies per utterance so machine noise hits all alike.
    for _u, a in audio:
        for name, dec in decoders.items():
            best = min((dec.decode(a) for _ in range(ns.rounds)), key=lambda d: d.decode_s)
            times[name].append(best.decode_s)
            texts[name].append(best.text)
    rows = []
    print(f"{len(audio)} utterances ({sum(len(a) for _, a in audio) / 16000:.0f} s of speech), mu-law 8 kHz")
    print(f"{'policy':<32}{'WER':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for name in POLICIES:
        wer = corpus_wer([(u.reference, t) for (u, _), t in zip(audio, texts[name], strict=True)])
        p50 = statistics.median(times[name]) * 1000
        p95 = float(np.percentile(times[name], 95)) * 1000
        rows.append({"policy": name, "windows_s": POLICIES[name], "wer": wer, "p50_ms": p50, "p95_ms": p95})
        print(f"{name:<32}{wer:>8.3f}{p50:>9.0f}{p95:>9.0f}")
    out = Path(ns.output)
    out.parent.mkdir(exist_ok=True)
    from benchmarks.bench import provenance

    report = {**provenance("benchmarks.asr_padding"), "utterances": len(audio), "rows": rows}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
