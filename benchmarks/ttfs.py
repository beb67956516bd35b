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
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from asr.wer import corpus_wer
from benchmarks.client import NativeCaller, last_voiced_s
from benchmarks.corpus import Utterance, asterisk_prompts, shared_clips

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ["endpoint_ms", "asr_decode_ms", "llm_ttft_ms", "first_sentence_ms"]


def corpus(n: int) -> list[Utterance]:
    """Shared clips first, then one-sentence Asterisk prompts, interleaved
    deterministically so any N is a fair mix."""
    clips = [c for c in shared_clips() if c.path.suffix == ".wav" or c.path.suffix == ".flac"]
    prompts = [p for p in asterisk_prompts(min_words=4) if p.reference.rstrip(".!? ").count(".") == 0]
    step = max(1, len(prompts) // max(1, n))
    return (clips + prompts[::step])[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, timeout: float) -> tuple[subprocess.Popen[bytes], float]:
    cmd = [sys.executable, "-m", "voice.cli", "serve", "--port", str(port), "--log-level", "WARNING", *args]
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


async def one_call(url: str, utt: Utterance, realtime: bool, tail_s: float) -> dict[str, Any]:
    audio8 = utt.load(8000)
    audio = np.concatenate([audio8, np.zeros(int(8000 * tail_s), np.float32)])
    voice_end = last_voiced_s(utt.load(16000))
    async with NativeCaller(url) as caller:
        await caller.start("mulaw", 8000)
        await caller.play(audio, 8000, "mulaw", realtime=realtime, last_voice_s=voice_end)
        # A clip with long pauses can be several turns; TTFS is about the
        # last one, the reply to the caller's last word.
        last_turn = max((e["turn"] for e in caller.result.of("turn.ended")), default=None)
        if last_turn is not None:
            try:
                await caller.wait_for("turn.metrics", timeout=60, turn=last_turn)
            except TimeoutError:
                pass
        finals = [e["text"] for e in caller.result.of("transcript.final")]
        metrics = next((e for e in caller.result.of("turn.metrics") if e["turn"] == last_turn), {})
        ttfs = caller.result.ttfs_s
        return {
            "utterance": utt.name,
            "reference": utt.reference,
            "transcript": " ".join(finals),
            "turns": len(finals),
            "ttfs_ms": None if ttfs is None else round(ttfs * 1000, 1),
            "first_sentence": next((e["text"] for e in caller.result.of("response.sentence")), None),
            "server": metrics,
        }


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
        "ttfs_p50_ms": pct(ttfs, 50),
        "ttfs_p95_ms": pct(ttfs, 95),
        "ttfs_mean_ms": None if not ttfs else round(statistics.fmean(ttfs), 1),
        "stage_p50_ms": stages,
        "speculative_acceptance_mean": None if not acc else round(statistics.fmean(acc), 3),
        "wer": round(corpus_wer([(c["reference"], c["transcript"]) for c in calls]), 4),
        "startup_s": round(startup_s, 1),
    }


async def run_config(
    name: str, serve_args: list[str], utts: list[Utterance], concurrency: int, realtime: bool, tail_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    port = free_port()
    proc, startup = start_server(serve_args, port, timeout=600)
    url = f"ws://127.0.0.1:{port}/v1/call"
    calls: list[dict[str, Any]] = []
    try:
        sem = asyncio.Semaphore(concurrency)

        async def guarded(u: Utterance) -> None:
            async with sem:
                calls.append(await one_call(url, u, realtime, tail_s))
                done = len(calls)
                print(f"\r  {name}: {done}/{len(utts)} calls", end="", flush=True)

        await asyncio.gather(*(guarded(u) for u in utts))
        print()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    order = {u.name: i for i, u in enumerate(utts)}
    calls.sort(key=lambda c: order[c["utterance"]])
    return summarise(name, calls, startup), calls


def parse_config(text: str) -> tuple[str, list[str]]:
    if "=" in text:
        name, args = text.split("=", 1)
        return name, shlex.split(args)
    if text in ("llamacpp", "vllm"):
        return text, ["--engine", text]
    raise SystemExit(f"--config {text!r}: use an engine name or NAME='serve args'")


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("calls", 6), ("p50", 9), ("p95", 9), ("endpt", 8), ("asr", 7), ("ttft", 7), ("1st", 8), ("WER", 7)]
    head = f"{'config':<16}" + "".join(f"{name:>{width}}" for name, width in cols) + f"{'start':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        s = r["stage_p50_ms"]
        print(
            f"{r['config']:<16}{r['answered']:>6}{r['ttfs_p50_ms'] or 0:>9.0f}{r['ttfs_p95_ms'] or 0:>9.0f}"
            f"{s['endpoint_ms'] or 0:>8.0f}{s['asr_decode_ms'] or 0:>7.0f}{s['llm_ttft_ms'] or 0:>7.0f}"
            f"{s['first_sentence_ms'] or 0:>8.0f}{r['wer']:>7.3f}{r['startup_s']:>7.1f}"
        )
    print("(ms; stage columns are server-side p50 from the caller's last voiced frame: endpoint fired,")
    print(" ASR final decode, LLM first token after ASR, first sentence. start = process start to ready, s)")


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    utts = corpus(ns.utterances)
    configs = [parse_config(c) for c in (ns.config or ["llamacpp"])]
    rows, details = [], {}
    print(f"{len(utts)} utterances, {len(configs)} configurations, concurrency {ns.concurrency}")
    for name, args in configs:
        row, calls = await run_config(name, args, utts, ns.concurrency, not ns.fast, ns.tail)
        rows.append(row)
        details[name] = calls
    print_table(rows)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    return {
        "machine": machine,
        "utterances": len(utts),
        "concurrency": ns.concurrency,
        "realtime": not ns.fast,
        "summary": rows,
        "calls": details,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="engine name or NAME='serve args' (repeatable)")
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--tail", type=float, default=1.5, help="seconds of silence after each utterance")
    parser.add_argument("--fast", action="store_true", help="send audio as fast as possible (not a TTFS figure)")
    parser.add_argument("--output", default=str(RESULTS / "ttfs.json"))
    ns = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = asyncio.run(main_async(ns))
    out = Path(ns.output)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
