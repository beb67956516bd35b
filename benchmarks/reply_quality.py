"""Replies a caller would accept: loops, length, endings, variety and what
they cost, for server configurations side by side in one run.

Real calls over the Twilio shape (benchmarks/loadgen.py): the 24 scripted
multi-turn calls of benchmarks/data/calls.json plus single-turn calls of
Debian's Asterisk prompts that those calls do not use, so at least 150
caller turns. Per configuration it reports:

* replies with a repeated sentence (the same words twice in one reply),
  and replies that say a sentence of the call's previous reply again (of
  four words or more: "Sure." may recur), whether or not the caller asked
  for it again: what a caller hears as the agent going round in circles;
* replies ending mid-sentence (no terminal punctuation) and at the token cap;
* median words and sentences per reply, and distinct-2 (unique word bigrams
  over all bigrams, across replies: low means the model says the same thing);
* TTFS p50 / p95 and LLM tokens generated per turn (server ``turn.metrics``).

    python -m benchmarks.reply_quality                  # before, the defaults, the defaults at 3 sentences
    python -m benchmarks.reply_quality --config "two=--reply-max-sentences 2" --config "three=--reply-max-sentences 3"

Results: benchmarks/results/reply_quality.json (with the commit).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shlex
import statistics
from pathlib import Path
from typing import Any

from benchmarks.bench import machine, run_and_save, versions
from benchmarks.corpus import ASTERISK_SOUNDS, asterisk_prompts
from benchmarks.loadgen import CallOptions, CallSpec, Segment, TurnSpec, load_calls, run_calls
from benchmarks.server_proc import firstline_server
from voice.call.reply_policy import is_complete, split_sentences, words_of

OUT = Path(__file__).resolve().parent / "results" / "reply_quality.json"
# The defaults as they were before the reply policy and the sampling
# defaults: every sentence sent, no repetition penalties
# (and the system prompt before it asked for a short first sentence).
PROMPT_BEFORE = (
    "You are a helpful voice assistant on a phone call. "
    "Answer in one or two short spoken sentences. No lists, no markdown."
)
BEFORE = "--reply-max-sentences 0 --no-loop-guard --llm-repetition-penalty 1.0 --system-prompt " + shlex.quote(
    PROMPT_BEFORE
)
SERVER_BASE = ["--max-calls", "1000", "--max-asr-queue", "0", "--log-level", "WARNING"]


def corpus(singles: int) -> list[CallSpec]:
    calls = load_calls()
    used = {seg.file for call in calls for turn in call.turns for seg in turn.segments}
    spare = [u for u in asterisk_prompts(min_words=4) if u.path.name not in used]
    for k, utt in enumerate(spare[:singles]):
        segment = Segment("asterisk", str(utt.path.relative_to(ASTERISK_SOUNDS)), utt.reference)
        calls.append(CallSpec(f"single{k:03d}", (TurnSpec((segment,), think_s=0.5),)))
    return calls


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def quality(records: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """The table's row for one configuration's turn records."""
    answered = [r for r in records if r.get("reply")]
    replies = [str(r["reply"]) for r in answered]
    repeated = 0
    for reply in replies:
        keys = [" ".join(words_of(s)) for s in split_sentences(reply)]
        keys = [k for k in keys if k]
        repeated += len(keys) != len(set(keys))
    server = [r.get("server") or {} for r in answered]
    tokens = [float(m["completion_tokens"]) for m in server if m.get("completion_tokens") is not None]
    at_cap = sum(
        1 for m in server if (m.get("completion_tokens") or 0) >= max_tokens or m.get("reply_end") == "token_cap"
    )
    bigrams: list[tuple[str, str]] = []
    for reply in replies:
        words = words_of(reply)
        bigrams.extend(itertools.pairwise(words))
    ttfs = [float(r["ttfs_ms"]) for r in records if r.get("ttfs_ms") is not None]
    # First token -> first sentence on the server: how long the first sentence takes to write.
    to_sentence = [
        float(m["first_sentence_ms"]) - float(m["llm_first_token_ms"])
        for m in server
        if m.get("first_sentence_ms") is not None and m.get("llm_first_token_ms") is not None
    ]
    n = len(replies) or 1
    again = repeats_previous(answered)
    ends: dict[str, int] = {}
    for m in server:
        if m.get("reply_end"):
            ends[m["reply_end"]] = ends.get(m["reply_end"], 0) + 1
    return {
        "turns": len(records),
        "answered": len(replies),
        "repeated_sentence_pct": round(100 * repeated / n, 1),
        "repeats_previous_reply_pct": round(100 * again / n, 1),
        "mid_sentence_end_pct": round(100 * sum(not is_complete(r) for r in replies) / n, 1),
        "token_cap_pct": round(100 * at_cap / n, 1),
        "words_p50": statistics.median(len(words_of(r)) for r in replies) if replies else None,
        "sentences_p50": statistics.median(len(split_sentences(r)) for r in replies) if replies else None,
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 3) if bigrams else None,
        "ttfs_p50_ms": _pct(ttfs, 0.5),
        "ttfs_p95_ms": _pct(ttfs, 0.95),
        "first_token_to_sentence_p50_ms": _pct(to_sentence, 0.5),
        "tokens_per_turn_mean": round(statistics.fmean(tokens), 1) if tokens else None,
        "tokens_per_turn_p50": statistics.median(tokens) if tokens else None,
        "reply_end": ends,
        "first_sentence_words_p50": _first_sentence_words(answered),
    }


REPEAT_MIN_WORDS = 4


def repeats_previous(records: list[dict[str, Any]]) -> int:
    """Replies with a sentence of REPEAT_MIN_WORDS words or more that the
    same call's previous reply (the turn before, answered) also said."""
    by_call: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_call.setdefault(str(r.get("call")), []).append(r)
    count = 0
    for turns in by_call.values():
        previous: set[str] = set()
        for r in sorted(turns, key=lambda r: int(r.get("turn") or 0)):
            sentences = (words_of(s) for s in split_sentences(str(r["reply"])))
            keys = {" ".join(w) for w in sentences if len(w) >= REPEAT_MIN_WORDS}
            count += bool(keys & previous)
            previous = keys
    return count


def _first_sentence_words(records: list[dict[str, Any]]) -> float | None:
    firsts = [len(words_of(split_sentences(str(r["reply"]))[0])) for r in records if split_sentences(str(r["reply"]))]
    return statistics.median(firsts) if firsts else None


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    calls = corpus(ns.singles)
    opts = CallOptions(protocol="twilio", speed=ns.speed, turn_timeout_s=ns.turn_timeout)
    results: dict[str, Any] = {
        "machine": machine(),
        "versions": versions(),
        "options": {
            "concurrency": ns.concurrency,
            "speed": ns.speed,
            "singles": ns.singles,
            "max_tokens": ns.max_tokens,
            "configs": ns.config,
            "chunk": ns.chunk,
            "interleaved": True,
        },
        "configs": {},
    }
    configs = [spec.partition("=")[::2] for spec in ns.config]
    records: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    with contextlib.ExitStack() as stack:
        # Every configuration's server is up for the whole run, and the calls
        # go to them in chunks, each chunk to every server in turn (the order
        # rotating): the machine's drift falls on all of them alike. A server
        # not taking calls is idle (no audio, no decodes).
        urls = {}
        for name, args in configs:
            server_args = [*SERVER_BASE, "--max-tokens", str(ns.max_tokens), *shlex.split(args)]
            server = stack.enter_context(firstline_server(server_args))
            urls[name] = f"ws://127.0.0.1:{server.port}"
            print(f"{name}: port {server.port} ({' '.join(shlex.split(args)) or 'defaults'})")
        chunks = [calls[i : i + ns.chunk] for i in range(0, len(calls), ns.chunk)]
        for k, chunk in enumerate(chunks):
            names = list(urls)
            for name in names[k % len(names) :] + names[: k % len(names)]:
                records[name] += await run_calls(urls[name], chunk, ns.concurrency, opts)
            print(f"chunk {k + 1}/{len(chunks)} done", flush=True)
    for name, args in configs:
        row = quality(records[name], ns.max_tokens)
        results["configs"][name] = {"args": args, **row, "replies": [
            {"call": r.get("call"), "turn": r.get("turn"), "reply": r.get("reply"),
             "reply_end": (r.get("server") or {}).get("reply_end")} for r in records[name]
        ]}  # fmt: skip
        print(json.dumps({name: row}))
    return results


def table(results: dict[str, Any]) -> str:
    cols = [
        ("repeated_sentence_pct", "repeat %"),
        ("repeats_previous_reply_pct", "previous reply again %"),
        ("mid_sentence_end_pct", "mid-sentence end %"),
        ("token_cap_pct", "token cap %"),
        ("words_p50", "words p50"),
        ("sentences_p50", "sentences p50"),
        ("first_sentence_words_p50", "1st sentence words p50"),
        ("distinct_2", "distinct-2"),
        ("first_token_to_sentence_p50_ms", "1st token→sentence p50"),
        ("ttfs_p50_ms", "TTFS p50"),
        ("ttfs_p95_ms", "TTFS p95"),
        ("tokens_per_turn_mean", "tokens/turn"),
    ]
    lines = ["| config | turns | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, row in results["configs"].items():
        cells = [str(row.get(key)) for key, _ in cols]
        lines.append(f"| {name} | {row['answered']}/{row['turns']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None, help="NAME=SERVER ARGS (repeatable; same run)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--speed", type=float, default=1.0, help="audio speed (1 = real time)")
    p.add_argument("--singles", type=int, default=60, help="single-turn calls added to the 24 scripted ones")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--chunk", type=int, default=8, help="calls per chunk; chunks alternate between configurations")
    p.add_argument("--turn-timeout", type=float, default=30.0)
    p.add_argument("--out", default=str(OUT))
    ns = p.parse_args()
    # The third: the defaults with the cap they had before it was chosen (3).
    ns.config = ns.config or [f"before={BEFORE}", "after=", "after-3-sentences=--reply-max-sentences 3"]
    results = run_and_save(run(ns), ns.out)
    print(table(results))
    print(f"saved {ns.out}")


if __name__ == "__main__":
    main()
