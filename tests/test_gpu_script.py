"""The GPU benchmark script (benchmarks/gpu/run_h200.sh) in its dry run: the
same script, every step but the GPU (CTranslate2 and vLLM on the CPU, the
embedded models, one call per system), so whoever is lent a GPU can run it
unchanged. The GPU itself is what this machine cannot have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_dry_run_writes_the_report_with_speculation(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = {**os.environ, "OUT": str(out), "VENV": sys.prefix}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run_h200.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, tail
    assert "dry run" in proc.stdout and "on CPU" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    for name in ("firstline", "firstline-ngram"):
        system = results["systems"][name]
        assert system["status"] == "ok", (name, system.get("reason"), tail)
        summary = system["levels"][0]["summary"]
        assert summary["answered"] >= 1, (name, summary)
    assert "--engine vllm" in json.dumps(results["options"]), results["options"]
    by_stage = results["systems"]["firstline"]["levels"][0]["cost"]["cpu_s_per_turn_by_stage"]
    assert by_stage["asr"] > 0 and by_stage["llm"] > 0, by_stage  # Whisper's threads, vLLM's processes
    assert results["systems"]["firstline-ngram"]["args"] == ["--speculation", "ngram"]
    # Whether ngram (prompt lookup) finds anything to draft in one short
    # reply depends on the reply; the table reports it either way.
    report = (out / "results.md").read_text()
    assert "Speculative decoding" in report and "| firstline-ngram | 1 |" in report
    assert results["systems"]["firstline"]["levels"][0]["summary"]["spec_turns"] == 0


def test_gpu_script_refuses_an_unknown_argument() -> None:
    proc = subprocess.run(["bash", "benchmarks/gpu/run_h200.sh", "--gpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
