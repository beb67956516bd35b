"""Can a small head on the pause decode's own Whisper encoder states tell a
caller's end from a pause, and does what it learns carry to another voice?

The end-of-turn set (benchmarks/data/eot/pauses.json) needs a stronger
prosody input than Smart Turn (AUC ~0.8 there). The pause decode already
runs Whisper's encoder over the turn, so a linear head on those states
would cost nothing at a pause. This trains one, with nothing from the set:

* training turns: Asterisk prompts (real 8 kHz speech, one voice, through
  the same phone-line codec as the set) whose clip is not in the set and
  that share no three-word run with any of the set's texts;
* a true end: the whole prompt; a pause: the prompt cut between two words
  (Whisper's word times, as the set is built), except after a word Whisper
  ended with . ? ! (a finished sentence mid-prompt is neither);
* what follows the speech is as much silence as the pause decode sees at
  a pause event (0-0.15 s: measured on the set below and reported);
* features: the encoder states averaged over the last 0.5 s and the last
  0.16 s of speech and the 0.2 s after it; a logistic head (numpy, L2,
  classes weighted equally).

It reports the head's AUC (true ends above pauses) by five-fold
cross-validation over training prompts, then on the set split by source:
the recorded half (the same kind of speech as training) and the spoken half
(the embedded TTS voice, which training never heard), with Smart Turn's
AUC on the same audio in the same run beside it. A head that wins on the
recorded half and not on the spoken one has learned the recording, not the
caller: what a cut in fluent speech leaves behind, not how people end.

    python -m benchmarks.end_of_turn_head --output benchmarks/results/end_of_turn_head.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from asr.config import ASRConfig
from asr.end_of_turn import SmartTurn
from asr.vad import SileroVAD
from asr.whisper import WhisperDecoder
from benchmarks import end_of_turn as eot
from benchmarks.corpus import asterisk_prompts, through_phone_line

RATE = 16000
ENCODER_HZ = 50  # Whisper's encoder: one state per 20 ms
FOLDS = 5
L2 = 0.01
SEED = 0


def speech_end(audio: np.ndarray) -> int:
    """Index after the last sample that is not the inserted digital silence."""
    loud = np.nonzero(np.abs(audio) > 1e-4)[0]
    return int(loud[-1]) + 1 if len(loud) else len(audio)


class EncoderFeatures:
    """The pause decode's encoder states around the end of speech, pooled."""

    def __init__(self, decoder: WhisperDecoder) -> None:
        self.decoder = decoder

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        from faster_whisper.audio import pad_or_trim

        prepared = self.decoder._prepare(audio)
        frames = pad_or_trim(prepared.features, prepared.window * 100)
        states = np.array(self.decoder.model.encode(np.stack([frames])))[0]
        end = min(max(1, round(speech_end(audio) / RATE * ENCODER_HZ)), states.shape[0])
        last = states[max(0, end - 25) : end].mean(0)
        tail = states[max(0, end - 8) : end].mean(0)
        after = states[end : end + 10].mean(0) if end < states.shape[0] else tail
        return np.concatenate([last, tail, after]).astype(np.float32)


def training_turns(spec: dict[str, Any]) -> tuple[list[Any], int]:
    """Asterisk prompts disjoint from the set (clip and three-word runs)."""
    texts = [x["text"].replace("|", " ") for x in spec["recorded"] + spec["spoken"]]
    runs = {tuple(w[i : i + 3]) for t in texts for w in [eot._words(t)] for i in range(len(w) - 2)}
    in_set = {x["clip"] for x in spec["recorded"]}
    prompts = [u for u in asterisk_prompts(min_words=3) if u.name not in in_set]
    kept = [
        u
        for u in prompts
        if not any(tuple(w[i : i + 3]) in runs for w in [eot._words(u.reference)] for i in range(len(w) - 2))
    ]
    return kept, len(prompts)


def training_samples(features: EncoderFeatures, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    from faster_whisper import WhisperModel

    from asr.models import embedded_whisper_dir

    aligner = WhisperModel(str(embedded_whisper_dir()), device="cpu", compute_type="int8", cpu_threads=2)
    rng = np.random.default_rng(SEED)
    prompts, before_filter = training_turns(spec)
    lead = np.zeros(int(0.3 * RATE), np.float32)
    xs, ys, groups = [], [], []
    skipped_sentence_ends = 0
    for utt in prompts:
        audio = through_phone_line(utt.load(8000))
        segments, _ = aligner.transcribe(audio, language="en", word_timestamps=True, vad_filter=False)
        words = [w for s in segments for w in (s.words or [])]
        if len(words) < 3:
            continue

        def silence() -> np.ndarray:
            return np.zeros(int(rng.uniform(0.0, 0.15) * RATE), np.float32)

        xs.append(features(np.concatenate([lead, audio[: speech_end(audio)], silence()])))
        ys.append(1)
        groups.append(utt.name)
        for k in range(1, len(words)):
            if words[k - 1].word.strip().endswith((".", "?", "!")):
                skipped_sentence_ends += 1
                continue
            piece = audio[: int((words[k - 1].end + words[k].start) / 2 * RATE)]
            piece = piece[: speech_end(piece)]
            if len(piece) < 0.3 * RATE:
                continue
            xs.append(features(np.concatenate([lead, piece, silence()])))
            ys.append(0)
            groups.append(utt.name)
    about = {
        "prompts_not_in_set": before_filter,
        "prompts_used": len(set(groups)),
        "true_ends": int(sum(ys)),
        "pauses": int(len(ys) - sum(ys)),
        "boundaries_after_a_finished_sentence_skipped": skipped_sentence_ends,
    }
    return np.stack(xs), np.array(ys, dtype=float), groups, about


class LogisticHead:
    def fit(self, x: np.ndarray, y: np.ndarray, steps: int = 300, rate: float = 0.5) -> LogisticHead:
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mu) / self.sd
        # Equal weight to each class: ends are one per prompt, pauses many.
        weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
        self.w, self.b = np.zeros(z.shape[1]), 0.0
        for _ in range(steps):
            err = weight * (self.probability(x) - y)
            self.w -= rate * (z.T @ err / len(y) + L2 * self.w)
            self.b -= rate * err.sum() / len(y)
        return self

    def probability(self, x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(((x - self.mu) / self.sd) @ self.w + self.b)))


def auc(pos: list[float] | np.ndarray, neg: list[float] | np.ndarray) -> float | None:
    """P(a true end scores above a pause), ties half."""
    p, n = np.asarray(pos, float), np.asarray(neg, float)
    if not len(p) or not len(n):
        return None
    return float(((p[:, None] > n[None]) + 0.5 * (p[:, None] == n[None])).mean())


def by_source_and_kind(
    rows: list[dict[str, Any]], is_end: Callable[[dict[str, Any]], bool]
) -> Iterator[tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]]:
    """(source, pause kind, true ends, pauses): the set's rows split as its
    tables are, the recorded and spoken halves apart and together."""
    for source in ("recorded", "spoken (TTS)", "all"):
        part = [r for r in rows if source in ("all", r["source"])]
        ends = [r for r in part if is_end(r)]
        pauses = [r for r in part if not is_end(r)]
        yield source, "all pauses", ends, pauses
        yield source, "after an unfinished phrase", ends, [r for r in pauses if not r["complete"]]
        yield source, "after a finished sentence", ends, [r for r in pauses if r["complete"]]


def cross_validated_auc(x: np.ndarray, y: np.ndarray, groups: list[str]) -> float | None:
    names = np.array(sorted(set(groups)))
    np.random.default_rng(SEED).shuffle(names)
    owner = np.array(groups)
    scores = np.zeros(len(y))
    for fold in np.array_split(names, FOLDS):
        held = np.isin(owner, fold)
        scores[held] = LogisticHead().fit(x[~held], y[~held]).probability(x[held])
    return auc(scores[y == 1], scores[y == 0])


def set_inputs(features: EncoderFeatures, smart: SmartTurn) -> list[dict[str, Any]]:
    """Every labelled pause and true end of the set, as the end-of-turn
    benchmark meets them (its VAD, its pause events), with the audio's
    encoder features and Smart Turn's P(done)."""

    class Capture(eot.Features):
        seen: list[np.ndarray]

        def at(self, case: eot.Case, audio: np.ndarray) -> eot.Inputs:
            self.seen.append(audio)
            return super().at(case, audio)

    capture = Capture(features.decoder, smart, None)
    vad = SileroVAD()
    rows = []
    for case in eot.build_cases(None):
        capture.seen = []
        labelled = eot.labelled_inputs(case, vad, capture)
        for item, audio in zip(labelled, capture.seen, strict=True):
            item["features"] = features(audio)
            item["silence_after_speech_s"] = (len(audio) - speech_end(audio)) / RATE
            item["source"] = "spoken (TTS)" if case.id.startswith("tts-") else "recorded"
            rows.append(item)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/end_of_turn_head.json"))
    ns = parser.parse_args()
    started = time.perf_counter()
    spec = json.loads(eot.SPEC.read_text())
    decoder = WhisperDecoder(ASRConfig())
    features = EncoderFeatures(decoder)
    x, y, groups, about = training_samples(features, spec)
    print(f"training: {about}")
    cv = cross_validated_auc(x, y, groups)
    print(f"head, 5-fold cross-validation over training prompts: AUC {cv:.3f}")
    head = LogisticHead().fit(x, y)
    rows = set_inputs(features, SmartTurn())
    silences = [r["silence_after_speech_s"] for r in rows]
    table = []
    for source, kind, ends, pauses in by_source_and_kind(rows, lambda r: r["pause_s"] is None):
        head_p = lambda rs: head.probability(np.stack([r["features"] for r in rs])) if rs else []  # noqa: E731
        row = {
            "source": source,
            "pauses": kind,
            "true_ends": len(ends),
            "non_end_pauses": len(pauses),
            "auc_head": auc(head_p(ends), head_p(pauses)),
            "auc_smart_turn": auc([r["smart_p"] for r in ends], [r["smart_p"] for r in pauses]),
        }
        table.append(row)
        head_auc, smart_auc = (float("nan") if v is None else v for v in (row["auc_head"], row["auc_smart_turn"]))
        print(
            f"{source:<14}{kind:<28} ends {row['true_ends']:>3} pauses {row['non_end_pauses']:>3}"
            f"  AUC head {head_auc:.2f}  Smart Turn {smart_auc:.2f}"
        )
    result = {
        "commit": eot._git_commit(),
        "command": "python -m benchmarks.end_of_turn_head --output " + str(ns.output),
        "training": about,
        "head": {"features": "encoder states, mean of last 0.5 s / last 0.16 s of speech / 0.2 s after", "l2": L2},
        "cross_validated_auc": cv,
        "silence_after_speech_s_at_set_pauses": {
            "p5": float(np.percentile(silences, 5)),
            "p50": float(np.percentile(silences, 50)),
            "p95": float(np.percentile(silences, 95)),
        },
        "set": table,
        "wall_s": round(time.perf_counter() - started),
    }
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {ns.output}")


if __name__ == "__main__":
    main()
