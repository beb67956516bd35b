"""Time to first sentence (TTFS) on real speech, measured by the caller.

Starts `firstline serve` as a separate process for each configuration (so the
caller's own work does not share the server's event loop), waits for
/readyz, then plays each utterance as a phone call: 8 kHz mu-law, 20 ms
frames at real time, then silence until the reply. TTFS is the time from
the frame holding the last voiced sample leaving the caller to the first
complete reply sentence arriving. Server stage timings come from
``turn.metrics``.

    python -m benchmarks.ttfs                           # embedded default
    python -m benchmarks.ttfs --config llamacpp --config vllm --utterances 20
    python -m benchmarks.ttfs --config "ngram=--speculation ngram"

Each ``--config`` is ``NAME`` (an engine) or ``NAME=SERVE ARGS``. All
configurations play the same utterances in the same run; results go to
benchmarks/results/ttfs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import InvalidStatus

from asr.wer import corpus_wer
from benchmarks.client import NativeCaller, last_voiced_s
from benchmarks.corpus import Utterance, asterisk_prompts, shared_clips
from benchmarks.server_proc import free_port

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ["endpoint_ms", "asr_decode_ms", "llm_ttft_ms", "first_sentence_ms"]


def corpus(n: int) -> list[Utterance]:
    """Shared clips first, then one-sentence Asterisk prompts, interleaved
    deterministically so any N is a fair mix."""
    clips = [c for c in shared_clips() if c.path.suffix == ".wav" or c.path.suffix == ".flac"]
    prompts = [p for p in asterisk_prompts(min_words=4) if p.reference.rstrip(".!? ").count(".") == 0]
    step = max(1, len(prompts) // max(1, n))
    return (clips + prompts[::step])[:n]


def start_server(args: list[str], port: int, timeout: float) -> tuple[subprocess.Popen[bytes], float]:
    cmd = [sys.executable, "-m", "voice.server.cli", "serve", "--port", str(port), "--log-level", "WARNING", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError(f"server not ready after {timeout} s")


async def one_call(url: str, utts: list[Utterance], realtime: bool, tail_s: float) -> list[dict[str, Any]]:
    """One call; each utterance is a caller turn, the next one spoken only
    after the reply to the previous one (so history grows as in a real call)."""
    results = []
    try:
        caller_cm = await NativeCaller(url).__aenter__()
    except InvalidStatus as refused:
        # Admission control said no (HTTP 503): a result, not a crash.
        status = refused.response.status_code
        return [{"utterance": u.name, "reference": u.reference, "transcript": "", "turns": 0, "history_turns": 0,
                 "ttfs_ms": None, "first_sentence": None, "server": {}, "refused": status} for u in utts]  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(caller_cm.__aexit__)
        caller = caller_cm
        await caller.start("mulaw", 8000)
        for utt in utts:
            audio = np.concatenate([utt.load(8000), np.zeros(int(8000 * tail_s), np.float32)])
            voice_end = last_voiced_s(utt.load(16000))
            turns_before = max((e["turn"] for e in caller.result.of("turn.ended")), default=0)
            caller.result.last_voice_sent_at = None
            await caller.play(audio, 8000, "mulaw", realtime=realtime, last_voice_s=voice_end)
            # A clip with long pauses can be several turns; TTFS is about the
            # last one, the reply to the caller's last word. One that ends
            # after the tail was sent is waited for, not left out.
            await caller.settle(turns_before, timeout=60)
            last_turn = caller.result.last_turn()
            finals: list[str] = []
            for e in caller.result.of("transcript.final"):
                if e["turn"] <= turns_before:
                    continue
                # A turn talked over before its reply started is carried into
                # the next final (the words appear again there): keep the later.
                if finals and e["text"].startswith(finals[-1]):
                    finals[-1] = e["text"]
                else:
                    finals.append(e["text"])
            metrics = next((e for e in caller.result.of("turn.metrics") if e["turn"] == last_turn), {})
            ttfs = caller.result.ttfs_s if last_turn > turns_before else None
            sentence = next((e["text"] for e in caller.result.of("response.sentence") if e["turn"] == last_turn), None)
            results.append(
                {
                    "utterance": utt.name,
                    "reference": utt.reference,
                    "transcript": " ".join(finals),
                    "turns": last_turn - turns_before,
                    "history_turns": turns_before,
                    "ttfs_ms": None if ttfs is None else round(ttfs * 1000, 1),
                    "first_sentence": sentence,
                    "server": metrics,
                }
            )
    return results


def pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 1)


def summarise(name: str, calls: list[dict[str, Any]], startup_s: float) -> dict[str, Any]:
    ttfs = [c["ttfs_ms"] for c in calls if c["ttfs_ms"] is not None]
    stages = {s: pct([c["server"][s] for c in calls if c["server"].get(s) is not None], 50) for s in STAGES}
    acc = [c["server"].get("speculative_acceptance") for c in calls]
    acc = [a for a in acc if a is not None]
    return {
        "config": name,
        "calls": len(calls),
        "answered": len(ttfs),
        "refused": sum(1 for c in calls if c.get("refused")),
        "ttfs_p50_ms": pct(ttfs, 50),
        "ttfs_p95_ms": pct(ttfs, 95),
        "ttfs_mean_ms": None if not ttfs else round(statistics.fmean(ttfs), 1),
        # Warm start: the first call after the server became ready.
        "first_call_ttfs_ms": calls[0]["ttfs_ms"] if calls else None,
        "stage_p50_ms": stages,
        "speculative_acceptance_mean": None if not acc else round(statistics.fmean(acc), 3),
        # LLM first token after the final transcript, on turns with a long
        # history (where incremental prefill has the most to save).
        "llm_ttft_p50_ms_history5plus": pct(
            [
                c["server"]["llm_ttft_ms"]
                for c in calls
                if c["history_turns"] >= 5 and c["server"].get("llm_ttft_ms") is not None
            ],
            50,
        ),
        "wasted_generations_per_turn": round(
            statistics.fmean([c["server"].get("wasted_generations", 0) for c in calls]) if calls else 0.0, 3
        ),
        "wer": round(corpus_wer([(c["reference"], c["transcript"]) for c in calls]), 4) if calls else None,
        "startup_s": round(startup_s, 1),
    }


async def run_config(
    name: str, serve_args: list[str], utts: list[Utterance], ns: argparse.Namespace, concurrency: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    port = free_port()
    proc, startup = start_server(serve_args, port, timeout=600)
    url = f"ws://127.0.0.1:{port}/v1/call"
    k = ns.turns_per_call
    groups = [utts[i : i + k] for i in range(0, len(utts), k)]
    calls: list[dict[str, Any]] = []
    try:
        sem = asyncio.Semaphore(concurrency)

        async def guarded(group: list[Utterance]) -> None:
            async with sem:
                calls.extend(await one_call(url, group, not ns.fast, ns.tail))
                print(f"\r  {name} x{concurrency}: {len(calls)}/{len(utts)} turns", end="", flush=True)

        await asyncio.gather(*(guarded(g) for g in groups))
        print()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    order = {u.name: i for i, u in enumerate(utts)}
    calls.sort(key=lambda c: order[c["utterance"]])
    row = summarise(name, calls, startup)
    row["concurrency"] = concurrency
    return row, calls


# Each latency technique on its own, against everything off, in one run.
TECHNIQUES: dict[str, str] = {
    "all-off": "--no-preemptive --fixed-endpoint --no-incremental-prefill --asr-scheduler fifo",
    "+adaptive-endpoint": "--no-preemptive --no-incremental-prefill --asr-scheduler fifo",
    "+preemptive": "--fixed-endpoint --no-incremental-prefill --asr-scheduler fifo",
    "+incremental-prefill": "--no-preemptive --fixed-endpoint --asr-scheduler fifo",
    "+deadline-asr": "--no-preemptive --fixed-endpoint --no-incremental-prefill",
    "all-on": "",
}


def parse_config(text: str) -> tuple[str, list[str]]:
    if "=" in text:
        name, args = text.split("=", 1)
        return name, shlex.split(args)
    if text in ("llamacpp", "vllm"):
        return text, ["--engine", text]
    raise SystemExit(f"--config {text!r}: use an engine name or NAME='serve args'")


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("ans", 6), ("p50", 7), ("p95", 7), ("vs off", 8), ("endpt", 7), ("asr", 6), ("ttft", 6), ("1st", 6)]
    cols += [("waste", 7), ("WER", 7), ("start", 7)]
    head = f"{'config':<22}{'conc':>5}" + "".join(f"{name:>{width}}" for name, width in cols)
    print(head)
    print("-" * len(head))
    base: dict[int, float] = {}
    for r in rows:
        s = r["stage_p50_ms"]
        p50 = r["ttfs_p50_ms"] or 0.0
        base.setdefault(r["concurrency"], p50)
        ratio = p50 / base[r["concurrency"]] if base[r["concurrency"]] else float("nan")
        print(
            f"{r['config']:<22}{r['concurrency']:>5}{r['answered']:>6}{p50:>7.0f}{r['ttfs_p95_ms'] or 0:>7.0f}"
            f"{ratio:>8.2f}{s['endpoint_ms'] or 0:>7.0f}{s['asr_decode_ms'] or 0:>6.0f}{s['llm_ttft_ms'] or 0:>6.0f}"
            f"{s['first_sentence_ms'] or 0:>6.0f}{r['wasted_generations_per_turn']:>7.2f}{r['wer']:>7.3f}"
            f"{r['startup_s']:>7.1f}"
        )
    print("(ans: calls answered. ms. p50/p95: caller-side TTFS, last voiced frame sent -> first sentence received;")
    print(" vs off: p50 over the first row at the same concurrency. Server-side p50s: endpt = endpoint fired")
    print(" after speech end, asr = final decode time, ttft = LLM first token after the final transcript,")
    print(" 1st = first sentence sent after speech end.")
    print(" waste = aborted preemptive generations per turn. start = process start to ready, s)")


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    utts = corpus(ns.utterances)
    if ns.techniques:
        configs = [(name, shlex.split(args)) for name, args in TECHNIQUES.items()]
    else:
        configs = [parse_config(c) for c in (ns.config or ["llamacpp"])]
    configs = [(name, [*args, *shlex.split(ns.serve_args)]) for name, args in configs]
    rows, details = [], {}
    print(f"{len(utts)} utterances, {ns.turns_per_call} per call, {len(configs)} configurations")
    for concurrency in ns.concurrency:
        for name, args in configs:
            row, calls = await run_config(name, args, utts, ns, concurrency)
            rows.append(row)
            details[f"{name} x{concurrency}"] = calls
    print_table(rows)
    from benchmarks.bench import machine

    return {
        "machine": machine(),
        "utterances": len(utts),
        "turns_per_call": ns.turns_per_call,
        "realtime": not ns.fast,
        "summary": rows,
        "calls": details,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="engine name or NAME='serve args' (repeatable)")
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1], help="one or more levels, e.g. 1 2 4 8")
    parser.add_argument("--techniques", action="store_true", help="compare each latency technique on/off")
    parser.add_argument("--turns-per-call", type=int, default=1, help="utterances spoken in one call, in turn")
    parser.add_argument("--serve-args", default="", help="extra `firstline serve` args for every configuration")
    parser.add_argument("--tail", type=float, default=1.5, help="seconds of silence after each utterance")
    parser.add_argument("--fast", action="store_true", help="send audio as fast as possible (not a TTFS figure)")
    parser.add_argument("--output", default=str(RESULTS / "ttfs.json"))
    ns = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = asyncio.run(main_async(ns))
    from benchmarks.bench import provenance

    report = {**provenance("benchmarks.ttfs"), **report}
    out = Path(ns.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
