"""The benchmark's report: JSON, a markdown table and PNG plots from one
results dict (what benchmarks/bench.py collects). Pure: no servers, no
clocks, so it can be re-run on a saved ``results.json``:

    python -m benchmarks.bench_report benchmarks/results/bench/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from asr.wer import corpus_wer

# Client-side milestones of a turn, ms after the caller's last voiced frame left.
MILESTONES = [
    ("asr_final_ms", "final transcript"),
    ("first_token_ms", "first token"),
    ("ttfs_ms", "first sentence"),
    ("ttfa_ms", "first audio"),
]
# Server-side (turn.metrics), ms after the server received the last voiced frame.
SERVER_STAGES = [
    ("endpoint_ms", "endpoint"),
    ("asr_final_ms", "ASR final"),
    ("llm_first_token_ms", "LLM 1st token"),
    ("first_sentence_ms", "1st sentence"),
]


def pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 1)


def _p95_of_plan(ttfs: list[float], planned: int) -> float | None:
    """numpy's linear p95 over ``planned`` turns, the unanswered ones last;
    None where it reaches one of them."""
    missing = max(0, planned - len(ttfs))
    if not ttfs or math.ceil(0.95 * (len(ttfs) + missing - 1)) >= len(ttfs):
        return None
    # The interpolation reads answered turns only: the unanswered ones stand
    # in at the top as the slowest answered (no infinities through numpy).
    return pct(ttfs + [max(ttfs)] * missing, 95)


def _vals(turns: list[dict[str, Any]], key: str) -> list[float]:
    return [float(t[key]) for t in turns if t.get(key) is not None]


# Speaking rate against which a later sentence counts as late: 150 words a
# minute, an unhurried phone voice (the server's own hold, llm/yielding.py,
# assumes a brisker 200, so it errs early).
HEARD_S_PER_WORD = 0.4


# What a reply's LLM work was for (voice/server/metrics.py, Metrics.llm_used).
LLM_PURPOSES = ("answered", "premature", "preemptive_aborted", "prefill", "spoken_first")


def llm_work_table(levels: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """LLM tokens per answered turn by purpose: prompt tokens computed (not
    from the prefix cache) + tokens generated, each cell "computed + generated"."""
    rows = [(n, lv) for n, lv in levels if lv["cost"].get("llm_tokens_per_turn")]
    if not rows:
        return []
    lines = ["", "LLM tokens per answered turn by what they were for, prompt computed + generated "
             "(the server's /metrics; premature: replies taken back when the caller went on, "
             "preemptive_aborted: replies to a pause the caller talked through; prefill: the prompt "
             "warmed from a partial transcript, which the answer then reads from the cache):", ""]  # fmt: skip
    lines.append("| system | calls | " + " | ".join(LLM_PURPOSES) + " | premature + aborted, share of all |")
    lines.append("|---|---|" + "---|" * (len(LLM_PURPOSES) + 1))
    for name, lv in rows:
        by = lv["cost"]["llm_tokens_per_turn"]
        cells, total, unheard = [], 0.0, 0.0
        for purpose in LLM_PURPOSES:
            x = by.get(purpose) or {}
            computed, generated = x.get("prompt_computed", 0.0), x.get("generated", 0.0)
            cells.append(f"{computed:.0f} + {generated:.0f}" if x else "–")
            total += computed + generated
            if purpose in ("premature", "preemptive_aborted"):
                unheard += computed + generated
        share = f"{unheard / total * 100:.0f} %" if total else "–"
        lines.append(f"| {name} | {lv['concurrency']} | " + " | ".join(cells) + f" | {share} |")
    return lines


def late_sentences(turn: dict[str, Any]) -> int:
    """Sentences of a reply that reached the wire after the caller would
    have heard every sentence before them (said from the first's arrival):
    a gap in the reply's speech."""
    at, words = turn.get("sentences_ms") or [], turn.get("sentence_words") or []
    late, said_by = 0, None
    for ms, n in zip(at, words, strict=False):
        if said_by is not None and ms > said_by:
            late += 1
        starts = ms if said_by is None else max(ms, said_by)
        said_by = starts + n * HEARD_S_PER_WORD * 1000
    return late


def failed_reply(turn: dict[str, Any]) -> bool:
    """The server's reply failed (its engine), though the caller heard the
    failure line (--reply-failure-line): a sentence on the wire that is no
    answer, and fast when the engine refuses at once."""
    return (turn.get("server") or {}).get("reply_end") == "failed"


def summarise(turns: list[dict[str, Any]], planned: int | None = None) -> dict[str, Any]:
    """One system at one concurrency level, from its per-turn records.
    ``planned``: the caller turns the level set out to place. A call that
    failed comes back as one error record and a call hung up on stops
    adding records, so the records alone undercount what was lost; the
    answered share is judged against the plan (``capacity``)."""
    placed = [t for t in turns if not t.get("refused") and not t.get("error")]
    answered = [t for t in placed if t.get("ttfs_ms") is not None and not failed_reply(t)]
    ttfs = _vals(answered, "ttfs_ms")
    pairs = [(t["reference"], t.get("transcript") or "") for t in placed if t.get("reference")]
    barge = [t for t in placed if t.get("barge_in")]
    server = [t.get("server") or {} for t in answered]
    return {
        "turns": len(turns),
        "planned": max(planned or 0, len(turns)),
        "answered": len(answered),
        "refused": sum(1 for t in turns if t.get("refused")),
        "errors": sum(1 for t in turns if t.get("error")),
        "timeouts": sum(1 for t in placed if t.get("timed_out")),
        "failed_replies": sum(1 for t in placed if failed_reply(t)),
        "ttfs_p50_ms": pct(ttfs, 50),
        "ttfs_p90_ms": pct(ttfs, 90),
        "ttfs_p95_ms": pct(ttfs, 95),
        # Over the turns the level planned, one never answered counting as
        # the slowest there is: None when the p95 reaches an unanswered turn.
        "ttfs_p95_planned_ms": _p95_of_plan(ttfs, max(planned or 0, len(turns))),
        "ttfs_mean_ms": None if not ttfs else round(statistics.fmean(ttfs), 1),
        # TTFS counts the reply's first piece, which may be a clause
        # (--first-clause-words); this is the first piece that ends a sentence,
        # and first_clause_turns counts the turns whose first piece did not.
        "whole_sentence_p50_ms": pct(_vals(answered, "whole_sentence_ms"), 50),
        "whole_sentence_p95_ms": pct(_vals(answered, "whole_sentence_ms"), 95),
        "first_clause_turns": sum(1 for t in answered if t.get("first_is_clause")),
        **{f"{k[:-3]}_p50_ms": pct(_vals(answered, k), 50) for k, _ in MILESTONES if k != "ttfs_ms"},
        "ttfa_p95_ms": pct(_vals(answered, "ttfa_ms"), 95),
        "sentence_audio_p50_ms": pct(_vals(answered, "sentence_audio_ms"), 50),
        "wer": None if not pairs else round(corpus_wer(pairs), 4),
        # Answered as more than one turn: the server turns, less those it
        # took back when the caller went on (turn.resumed).
        "split_turns": sum(1 for t in placed if (t.get("server_turns") or 0) - (t.get("resumed_turns") or 0) > 1),
        "endpoints_inside_turns": sum(max(0, (t.get("server_turns") or 0) - 1) for t in placed),
        "resumed_turns": sum(t.get("resumed_turns") or 0 for t in placed),
        # Preemptive generations started at a pause and thrown away when the
        # caller went on, per answered turn (turn.metrics).
        "wasted_preemptive_per_turn": None
        if not server
        else round(statistics.fmean(float(s.get("wasted_generations") or 0) for s in server), 2),
        # Replies that stepped aside for other calls' first sentences
        # (llm/yielding.py), and sentences that came after the caller had
        # heard the ones before them (a gap in the reply).
        "yields_per_turn": None
        if not server
        else round(statistics.fmean(float(s.get("yields") or 0) for s in server), 2),
        "late_sentences": sum(late_sentences(t) for t in answered),
        "later_sentences": sum(max(0, len(t.get("sentences_ms") or []) - 1) for t in answered),
        "barge_in_turns": len(barge),
        "barge_in_p50_ms": pct(_vals(barge, "barge_in_ms"), 50),
        "barge_in_missed": sum(1 for t in barge if t.get("barge_in_ms") is None),
        "server_p50_ms": {k: pct([float(s[k]) for s in server if s.get(k) is not None], 50) for k, _ in SERVER_STAGES},
        **speculation(server),
    }


def speculation(server: list[dict[str, Any]]) -> dict[str, Any]:
    """Speculative decoding per answered turn (turn.metrics): the drafter's
    acceptance rate, p50 over the turns that drafted, and the pooled rate."""
    drafted = [s for s in server if s.get("draft_tokens")]
    rates = [float(s["speculative_acceptance"]) for s in drafted if s.get("speculative_acceptance") is not None]
    draft = sum(int(s["draft_tokens"]) for s in drafted)
    accepted = sum(int(s.get("accepted_tokens") or 0) for s in drafted)
    return {
        "spec_turns": len(drafted),
        "spec_acceptance_p50": None if not rates else round(float(np.percentile(rates, 50)), 3),
        "spec_acceptance_pooled": None if not draft else round(accepted / draft, 3),
        "completion_tokens_mean": None
        if not server
        else round(statistics.fmean(int(s.get("completion_tokens") or 0) for s in server), 1),
        # Prompt tokens the reply's engine had to compute (not in its prefix
        # cache) and the share it found cached: what incremental prefill and
        # the engine's routing leave to the end of the turn.
        **_prefill_summary(server),
    }


def _prefill_summary(server: list[dict[str, Any]]) -> dict[str, float | None]:
    prompts = [(int(s["prompt_tokens"]), int(s.get("cached_tokens") or 0)) for s in server if s.get("prompt_tokens")]
    if not prompts:
        return {"uncached_prompt_tokens_p50": None, "uncached_prompt_tokens_p95": None, "cached_prompt_share": None}
    uncached = [max(0, p - c) for p, c in prompts]
    return {
        "uncached_prompt_tokens_p50": round(float(np.percentile(uncached, 50)), 1),
        "uncached_prompt_tokens_p95": round(float(np.percentile(uncached, 95)), 1),
        "cached_prompt_share": round(sum(c for _, c in prompts) / sum(p for p, _ in prompts), 3),
    }


def planned_turns(summary: dict[str, Any]) -> int:
    """The turns a level set out to place (results written before "planned"
    have only the records that came back)."""
    return int(summary.get("planned", summary["turns"]))


def capacity(
    levels: list[dict[str, Any]], target_ms: float, min_answered: float = 0.9, key: str = "ttfs_p95_ms"
) -> int | None:
    """Most concurrent calls whose p95 TTFS (or ``key``) met the target (and most turns answered)."""
    best = None
    for level in sorted(levels, key=lambda lv: lv["concurrency"]):
        s = level["summary"]
        ok = s.get(key) is not None and s[key] <= target_ms
        ok = ok and planned_turns(s) > 0 and s["answered"] >= min_answered * planned_turns(s)
        if key == "ttfs_p95_ms" and "ttfs_p95_planned_ms" in s:
            # The answered turns' p95 left out the ones never answered: up to
            # a tenth of the plan could time out and the level still pass.
            ok = ok and s["ttfs_p95_planned_ms"] is not None and s["ttfs_p95_planned_ms"] <= target_ms
        if not ok:
            break
        best = level["concurrency"]
    return best


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict[str, Any]) -> str:
    opts = results.get("options", {})
    target = opts.get("target_p95_ms", 1500)
    systems = results.get("systems", {})
    ok = {n: s for n, s in systems.items() if s.get("status") == "ok" and s.get("levels")}
    lines = ["# firstline latency benchmark", ""]
    m = results.get("machine", {})
    lines.append(
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gb', '?')} GB RAM, "
        f"GPU: {m.get('gpu') or 'none'}. Started {results.get('started', '?')}, "
        f"took {results.get('duration_s', '?')} s."
    )
    v = results.get("versions", {})
    lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".")
    imp = opts.get("impairments") or {}
    lines.append(
        f"Calls: {opts.get('protocol', 'twilio')} protocol, 8 kHz μ-law in 20 ms frames at "
        f"{'real time' if opts.get('speed', 1.0) == 1.0 else str(opts.get('speed')) + 'x real time'}, "
        f"{opts.get('turns', '?')} turns per call, {opts.get('calls_per_level', '?')}+ calls per level; "
        f"network: jitter {imp.get('jitter_ms', 0)} ms, late {imp.get('late_prob', 0)} x {imp.get('late_ms', 0)} ms, "
        f"drop {imp.get('drop_prob', 0)}. Target: p95 TTFS ≤ {target:.0f} ms, with 90 % of the planned "
        "turns answered (turns: answered / planned; TTFS percentiles are over the answered turns)."
    )
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`.")
    lines += ["", "## Per turn, lowest load", ""]
    lines.append(
        "| system | calls | turns | TTFS p50 | TTFS p95 | final transcript p50 | first token p50 | "
        "first audio p50 | WER | split turns | wasted preemptive / turn | barge-in p50, all levels (missed/turns) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in ok.items():
        level = min(s["levels"], key=lambda lv: lv["concurrency"])
        x = level["summary"]
        barge = [t for lv in s["levels"] for t in lv.get("turns", []) if t.get("barge_in")]
        barge_ms = pct(_vals(barge, "barge_in_ms"), 50)
        missed = sum(1 for t in barge if t.get("barge_in_ms") is None)
        lines.append(
            f"| {name} | {level['concurrency']} | {x['answered']}/{planned_turns(x)} | "
            f"{_fmt(x['ttfs_p50_ms'])} | "
            f"{_fmt(x['ttfs_p95_ms'])} | {_fmt(x['asr_final_p50_ms'])} | {_fmt(x['first_token_p50_ms'])} | "
            f"{_fmt(x['ttfa_p50_ms'])} | {_fmt(x['wer'], 3)} | {x['split_turns']} | "
            f"{_fmt(x.get('wasted_preemptive_per_turn'), 2)} | {_fmt(barge_ms)} ({missed}/{len(barge)}) |"
        )
    levels = sorted({lv["concurrency"] for s in ok.values() for lv in s["levels"]})
    if levels:
        lines += ["", "## TTFS p50 / p95 (ms) by concurrent calls", ""]
        lines.append("| system | " + " | ".join(str(c) for c in levels) + f" | capacity at p95 ≤ {target:.0f} ms |")
        lines.append("|---|" + "---|" * (len(levels) + 1))
        for name, s in ok.items():
            by = {lv["concurrency"]: lv["summary"] for lv in s["levels"]}
            cells = [f"{_fmt(by[c]['ttfs_p50_ms'])} / {_fmt(by[c]['ttfs_p95_ms'])}" if c in by else "" for c in levels]
            cap = s.get("capacity")
            cap_text = str(cap) if cap is not None else f"< {levels[0]}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {cap_text} |")
        clause_first = {
            name: s for name, s in ok.items() if any(lv["summary"].get("first_clause_turns") for lv in s["levels"])
        }
        if clause_first:
            lines += [
                "",
                "## First whole sentence p50 / p95 (ms) by concurrent calls, where a first piece was not one",
                "",
                "(TTFS above counts the reply's first piece; with --first-clause-words that may be a clause. Here, "
                "the first piece that ends a sentence; in brackets, the turns whose first piece did not: a clause, a "
                "run-on cut at its word cap, a reply with no full stop.)",
                "",
            ]
            lines.append("| system | " + " | ".join(str(c) for c in levels) + f" | capacity at p95 ≤ {target:.0f} ms |")
            lines.append("|---|" + "---|" * (len(levels) + 1))
            for name, s in clause_first.items():
                by = {lv["concurrency"]: lv["summary"] for lv in s["levels"]}
                cells = [
                    f"{_fmt(by[c].get('whole_sentence_p50_ms'))} / {_fmt(by[c].get('whole_sentence_p95_ms'))} "
                    f"({by[c].get('first_clause_turns', 0)}/{by[c]['answered']})"
                    if c in by
                    else ""
                    for c in levels
                ]
                cap = capacity(s["levels"], target, key="whole_sentence_p95_ms")
                cap_text = str(cap) if cap is not None else f"< {levels[0]}"
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {cap_text} |")
        lines += ["", "## Cost as calls grow", ""]
        lines.append(
            "| system | calls | CPU cores busy | CPU s per answered turn | RSS MB | refused | timeouts | "
            "replies stepping aside / turn | later sentences late (of all) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, s in ok.items():
            for lv in s["levels"]:
                cost = lv.get("cost") or {}
                x = lv["summary"]
                lines.append(
                    f"| {name} | {lv['concurrency']} | {_fmt(cost.get('cores_busy'), 2)} | "
                    f"{_fmt(cost.get('cpu_s_per_turn'), 2)} | {_fmt(cost.get('rss_mb'))} | {x['refused']} | "
                    f"{x['timeouts']} | {_fmt(x.get('yields_per_turn'), 2)} | "
                    f"{x.get('late_sentences', '–')} ({x.get('later_sentences', '–')}) |"
                )
        staged = [
            (n, lv)
            for n, s in ok.items()
            for lv in s["levels"]
            if (lv.get("cost") or {}).get("cpu_s_per_turn_by_stage")
        ]
        if staged:
            names = list(staged[0][1]["cost"]["cpu_s_per_turn_by_stage"])
            lines += ["", "## CPU seconds per answered turn, by stage (server threads and engine processes)", ""]
            lines.append("| system | calls | " + " | ".join(names) + " | all |")
            lines.append("|---|---|" + "---|" * (len(names) + 1))
            for name, lv in staged:
                by = lv["cost"]["cpu_s_per_turn_by_stage"]
                cells = " | ".join(_fmt(by.get(k), 2) for k in names)
                total = _fmt(lv["cost"].get("cpu_s_per_turn"), 2)
                lines.append(f"| {name} | {lv['concurrency']} | {cells} | {total} |")
            decoded = [(n, lv) for n, lv in staged if lv["cost"].get("asr_decode_s_per_turn")]
            if decoded:
                lines += ["", "Whisper decode seconds per answered turn, by kind (the server's /metrics):", ""]
                lines += ["| system | calls | final (pause and turn end) | partial |", "|---|---|---|---|"]
                for name, lv in decoded:
                    by = lv["cost"]["asr_decode_s_per_turn"]
                    lines.append(f"| {name} | {lv['concurrency']} | {_fmt(by.get('final'), 2)} | "
                                 f"{_fmt(by.get('partial'), 2)} |")  # fmt: skip
            redone = [(n, lv) for n, lv in staged if lv["cost"].get("asr_redecodes_per_turn")]
            if redone:
                lines += ["", "Finals decoded again in the 30 s window because the first stopped early, "
                          "per answered turn (`firstline_asr_redecodes_total`):", ""]  # fmt: skip
                lines += ["| system | calls | re-decodes / turn |", "|---|---|---|"]
                for name, lv in redone:
                    by = lv["cost"]["asr_redecodes_per_turn"]
                    lines.append(f"| {name} | {lv['concurrency']} | {_fmt(by.get('final'), 3)} |")
            lines += llm_work_table(staged)
        lines += ["", "## Server stage timings, p50 ms after speech end (turn.metrics; lowest load)", ""]
        lines.append("| system | " + " | ".join(label for _, label in SERVER_STAGES) + " |")
        lines.append("|---|" + "---|" * len(SERVER_STAGES))
        for name, s in ok.items():
            x = min(s["levels"], key=lambda lv: lv["concurrency"])["summary"]["server_p50_ms"]
            lines.append(f"| {name} | " + " | ".join(_fmt(x.get(k)) for k, _ in SERVER_STAGES) + " |")
        # Systems run with speculation, and any other whose turns drafted.
        spec = {
            n: s
            for n, s in ok.items()
            if "--speculation" in s.get("args", []) or any(lv["summary"].get("spec_turns") for lv in s["levels"])
        }
        if spec:
            lines += ["", "## Speculative decoding, per answered turn (turn.metrics)", ""]
            lines.append("| system | calls | turns that drafted | acceptance p50 | pooled | tokens per turn |")
            lines.append("|---|---|---|---|---|---|")
            for name, s in spec.items():
                for lv in s["levels"]:
                    x = lv["summary"]
                    lines.append(
                        f"| {name} | {lv['concurrency']} | {x.get('spec_turns', 0)}/{x['answered']} | "
                        f"{_fmt(x.get('spec_acceptance_p50'), 3)} | {_fmt(x.get('spec_acceptance_pooled'), 3)} | "
                        f"{_fmt(x.get('completion_tokens_mean'), 1)} |"
                    )
    missing = {n: s for n, s in systems.items() if n not in ok}
    skipped = {n: s["skipped_levels"] for n, s in ok.items() if s.get("skipped_levels")}
    if missing or skipped:
        lines += ["", "## Not measured", ""]
        for name, s in missing.items():
            lines.append(f"- **{name}**: {s.get('reason') or s.get('status')}")
        for name, cs in skipped.items():
            lines.append(f"- **{name}** at {', '.join(map(str, cs))} calls: skipped (time budget)")
    lines += ["", "## Systems", ""]
    for name, s in systems.items():
        lines.append(f"- **{name}**: {s.get('description', '')}")
    lines += [
        "",
        "Definitions: all latencies are measured at the caller, from the moment the 20 ms frame holding the turn's "
        "last voiced sample was sent. TTFS = first reply sentence received (firstline and the naive cascade: "
        "the `response.sentence` event on the Twilio side channel; pipecat: its `sentence:` mark); a system run "
        "with --first-clause-words may send a clause first, and then the first whole sentence is reported beside "
        "it. First audio = first "
        "reply `media` byte. Barge-in = first voiced frame of the interruption sent -> `clear` received (includes the "
        "server's 200 ms minimum-speech check). WER is pooled over turns against the recordings' transcripts. "
        "Split turns: caller turns the server answered as more than one turn (an endpoint inside a pause whose "
        "reply the server did not take back when the caller went on: `turn.resumed`). "
        "CPU cores busy: CPU time of the server's process tree / wall time of the level.",
        "",
    ]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: s for n, s in results.get("systems", {}).items() if s.get("status") == "ok" and s.get("levels")}
    target = results.get("options", {}).get("target_p95_ms", 1500)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in ok.items():
        level = min(s["levels"], key=lambda lv: lv["concurrency"])
        vals = sorted(_vals(level["turns"], "ttfs_ms"))
        if vals:
            frac = np.arange(0, len(vals) + 1) / len(vals)
            ax.step([vals[0], *vals], frac, where="post", label=f"{name} (x{level['concurrency']})")
    ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("time to first sentence (ms, caller side)")
    ax.set_ylabel("fraction of turns")
    ax.set_ylim(0, 1.02)
    ax.set_title("TTFS CDF, lowest load")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "ttfs_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, s) in enumerate(ok.items()):
        lv = sorted(s["levels"], key=lambda x: x["concurrency"])
        cs = [x["concurrency"] for x in lv]
        color = f"C{i % 10}"
        p50 = [x["summary"]["ttfs_p50_ms"] for x in lv]
        p95 = [x["summary"]["ttfs_p95_ms"] for x in lv]
        ax.plot(cs, [np.nan if v is None else v for v in p50], "o-", color=color, label=f"{name} p50")
        ax.plot(cs, [np.nan if v is None else v for v in p95], "s--", color=color, alpha=0.7, label=f"{name} p95")
    ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    levels = sorted({lv["concurrency"] for s in ok.values() for lv in s["levels"]})
    if levels:
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("TTFS (ms)")
    ax.set_title("TTFS vs concurrent calls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(out / "ttfs_vs_calls.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(ok)
    width = 0.8 / max(1, len(MILESTONES) + 1)
    x = np.arange(len(names))
    bars = [("endpoint", "server endpoint")] + [(k, label) for k, label in MILESTONES]
    for j, (key, label) in enumerate(bars):
        heights = []
        for name in names:
            level = min(ok[name]["levels"], key=lambda lv: lv["concurrency"])
            if key == "endpoint":
                v = level["summary"]["server_p50_ms"].get("endpoint_ms")
            else:
                v = pct(_vals(level["turns"], key), 50)
            heights.append(np.nan if v is None else v)
        ax.bar(x + (j - len(bars) / 2 + 0.5) * width, heights, width, label=label)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ms after the caller's last voiced frame (p50)")
    ax.set_title("Where the time goes (milestones overlap when work is preemptive)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "stages.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """results.json, results.md and the plots under ``out``. Fills in each
    level's summary and each system's capacity when missing."""
    out.mkdir(parents=True, exist_ok=True)
    target = results.get("options", {}).get("target_p95_ms", 1500)
    for s in results.get("systems", {}).values():
        for level in s.get("levels", []):
            level.setdefault("summary", summarise(level.get("turns", [])))
        if s.get("status") == "ok" and "capacity" not in s:
            s["capacity"] = capacity(s.get("levels", []), target)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown(results))
    for p in plots(results, out):
        paths[p.stem] = p
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results.json written by benchmarks.bench")
    parser.add_argument("--out", default=None, help="folder (default: the results file's)")
    ns = parser.parse_args()
    src = Path(ns.results)
    results = json.loads(src.read_text())
    for p in write_report(results, Path(ns.out) if ns.out else src.parent).values():
        print(p)


if __name__ == "__main__":
    main()
