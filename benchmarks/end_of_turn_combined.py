"""Would a learned combination of the end-of-turn inputs beat Whisper's marks?

Reads what each input said at every labelled pause and true end of the two
committed end-of-turn runs (``labelled_inputs`` in
benchmarks/results/end_of_turn.json, the main set, and
end_of_turn_holdout.json, the held-out recordings), fits a logistic
regression of "this is the end" on the inputs of one set and scores it on
the other, both ways:

* AUC over all pauses and ends, and over the pauses inside a sentence only
  (without the ``complete`` ones no past-only detector can tell);
* the transferred operating point: the policy "P(end) at or above t keeps
  the word rules' window, below it waits the longest", t fitted on the
  training set to the least mean delay at <= 5 % false cut-offs, then used
  on the other set (every input in at the pause; a window shorter than the
  pause cuts it; delay at an end is its window plus one 32 ms chunk, as in
  end_of_turn's fitted frontiers).

Inputs (log-odds): Whisper's sentence-end share, the LLM's P(the sentence
ends here), Smart Turn's P(done), and the word rules' window as two flags.
Nothing is computed again: no model runs here.

    python -m benchmarks.end_of_turn_combined
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from asr.config import ASRConfig
from asr.turns import CHUNK_S
from benchmarks.end_of_turn import HERE, _git_commit

RESULTS = HERE / "results"
SETS = {"main": RESULTS / "end_of_turn.json", "held-out": RESULTS / "end_of_turn_holdout.json"}
INPUTS = {
    "whisper": ("whisper_end_p",),
    "whisper+llm": ("whisper_end_p", "sentence_end_p"),
    "whisper+smart": ("whisper_end_p", "smart_p"),
    "whisper+llm+smart": ("whisper_end_p", "sentence_end_p", "smart_p"),
    "whisper+llm+smart+rules": ("whisper_end_p", "sentence_end_p", "smart_p", "rules"),
    "whisper+rules": ("whisper_end_p", "rules"),
    "llm+smart+rules": ("sentence_end_p", "smart_p", "rules"),
}
TARGET_CUTOFFS = 0.05


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(np.log(p / (1 - p)))


def features(item: dict[str, Any], names: tuple[str, ...], cfg: ASRConfig) -> list[float]:
    out: list[float] = []
    for name in names:
        if name == "rules":
            rule = item["rule_window_s"]
            out += [float(rule >= cfg.endpoint_max_s), float(cfg.endpoint_min_s < rule < cfg.endpoint_max_s)]
        else:
            out.append(_logit(item[name]))
    return out


class Logistic:
    """L2-regularised logistic regression by gradient descent on
    standardised inputs: a few inputs, a hundred-odd items."""

    def __init__(self, l2: float = 1.0, steps: int = 5000, rate: float = 0.5) -> None:
        self.l2, self.steps, self.rate = l2, steps, rate

    def fit(self, x: np.ndarray, y: np.ndarray) -> Logistic:
        self.mean, self.scale = x.mean(0), x.std(0) + 1e-9
        z = np.c_[(x - self.mean) / self.scale, np.ones(len(x))]
        w = np.zeros(z.shape[1])
        for _ in range(self.steps):
            p = 1 / (1 + np.exp(-z @ w))
            w -= self.rate * (z.T @ (p - y) + self.l2 * np.r_[w[:-1], 0.0]) / len(y)
        self.weights = w
        return self

    def probability(self, x: np.ndarray) -> np.ndarray:
        z = np.c_[(x - self.mean) / self.scale, np.ones(len(x))]
        return 1 / (1 + np.exp(-z @ self.weights))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(a random end scores above a random pause), ties half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def operating_point(items: list[dict[str, Any]], p: np.ndarray, t: float, cfg: ASRConfig) -> tuple[float, float]:
    """(false cut-off rate, mean delay s) of "P(end) >= t keeps the rules'
    window, else the longest" on these items."""
    windows = [x["rule_window_s"] if q >= t else cfg.endpoint_max_s for x, q in zip(items, p, strict=True)]
    pauses = [(x, w) for x, w in zip(items, windows, strict=True) if x["pause_s"] is not None]
    ends = [w for x, w in zip(items, windows, strict=True) if x["pause_s"] is None]
    cut = sum(w < x["pause_s"] for x, w in pauses) / len(pauses)
    return cut, statistics.fmean(ends) + CHUNK_S


def fit_threshold(items: list[dict[str, Any]], p: np.ndarray, cfg: ASRConfig) -> float:
    """The threshold with the least mean delay at <= 5 % false cut-offs on
    these items (the highest, 1.0, holds every pause and end)."""
    best = (float("inf"), float(np.nextafter(p.max(), 2.0)))
    # Every score is a threshold (the items at or above it keep the rules'
    # window); above the highest, all wait the longest.
    for t in sorted({*p.tolist(), float(np.nextafter(p.max(), 2.0))}):
        cut, delay = operating_point(items, p, t, cfg)
        if cut <= TARGET_CUTOFFS and delay < best[0]:
            best = (delay, t)
    return best[1]


def usable(path: Path, names: set[str]) -> tuple[list[dict[str, Any]], int]:
    """The labelled items with every input (one set of items for every
    row, so the rows compare), and how many were left out: a pause whose
    decode gave no marks (it looped) or no words."""
    items = json.loads(path.read_text())["labelled_inputs"]
    kept = [x for x in items if all(x.get(n) is not None for n in names if n != "rules")]
    return kept, len(items) - len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(RESULTS / "end_of_turn_combined.json"))
    ns = parser.parse_args()
    cfg = ASRConfig()
    every = {n for names in INPUTS.values() for n in names}
    loaded = {name: usable(path, every) for name, path in SETS.items()}
    data = {name: kept for name, (kept, _) in loaded.items()}
    for name, (kept, left) in loaded.items():
        print(f"{name}: {len(kept)} labelled pauses and ends with every input ({left} without one left out)")
    rows = []
    print(f"{'inputs':<26}{'train -> test':<20}{'AUC':>6}{'AUC inside':>11}{'t':>8}{'cut-offs':>10}{'mean delay':>12}")
    for label, names in INPUTS.items():
        for train, test in (("main", "held-out"), ("held-out", "main")):
            fx = np.array([features(x, names, cfg) for x in data[train]])
            fy = np.array([int(x["pause_s"] is None) for x in data[train]])
            model = Logistic().fit(fx, fy)
            t = fit_threshold(data[train], model.probability(fx), cfg)
            tx = np.array([features(x, names, cfg) for x in data[test]])
            ty = np.array([int(x["pause_s"] is None) for x in data[test]])
            p = model.probability(tx)
            inside = np.array([not (x["pause_s"] is not None and x["complete"]) for x in data[test]])
            cut, delay = operating_point(data[test], p, t, cfg)
            row = {
                "inputs": label,
                "train": train,
                "test": test,
                "auc": auc(ty, p),
                "auc_inside_sentence": auc(ty[inside], p[inside]),
                "threshold": t,
                "false_cutoff_rate": cut,
                "mean_delay_ms": delay * 1000,
                "weights": model.weights.tolist(),
            }
            rows.append(row)
            print(
                f"{label:<26}{train + ' -> ' + test:<20}{row['auc']:>6.3f}{row['auc_inside_sentence']:>11.3f}"
                f"{t:>8.3f}{cut:>10.1%}{delay * 1000:>10.0f}ms"
            )
    out = Path(ns.output)
    out.write_text(
        json.dumps(
            {
                "commit": _git_commit(),
                "command": "python -m benchmarks.end_of_turn_combined",
                "sets": {
                    name: {
                        "file": str(path.relative_to(HERE.parent)),
                        "items": len(data[name]),
                        "left_out_without_an_input": loaded[name][1],
                    }
                    for name, path in SETS.items()
                },
                "target_cutoffs": TARGET_CUTOFFS,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
