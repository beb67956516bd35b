#!/usr/bin/env bash
# Batched Whisper across calls on one NVIDIA GPU: the real ASR worker
# (asr/worker.py through benchmarks.asr_batching) with CTranslate2 on CUDA,
# at batch sizes 1 to 64, 16 and 64 concurrent calls. Made for a lent GPU
# machine that has PyTorch's CUDA stack but no package index and a 64 MiB
# transfer limit, so the parts travel packed:
#
#   bash benchmarks/gpu/asr_cuda.sh --pack        # here (needs PyPI): fills .gpucarry/
#   bash benchmarks/gpu/asr_cuda.sh               # there (carry .gpucarry): writes $OUT
#
# What the pack holds (.gpucarry/ is git-ignored), and why:
#   wheels/     faster-whisper and the few packages the benchmark imports that the machine lacks
#   ct2/        the CTranslate2 4.8.5 wheel unpacked, its two large libraries (150 MB) xz-compressed
#   tiny-en-int8/  the embedded tiny.en re-saved with int8 weights (benchmarks/gpu/shrink_whisper.py,
#               39 MB, xz-compressed like the libraries): loaded with compute type float16, so the GPU does float16
#               arithmetic on weights that carry int8 rounding
#   speech/, asterisk/  the shared clips and every 8th Asterisk prompt (benchmarks/corpus.py)
# Stand-ins on that machine, named here because they are not the real thing:
#   * PyAV is not carried (40 MB); faster-whisper imports it for file decoding,
#     which the worker never uses, so an empty `av` module satisfies the import.
#   * CTranslate2 4.8.5 dlopens cuBLAS 12 by name; the machine has cuBLAS 13, whose
#     functions it calls (cublasGemmEx, cublasGemmStridedBatchedEx, ...) keep their
#     names and signatures, so libcublas.so.12 is a link to it. A GPU user installs
#     the CUDA 12 cuBLAS wheel instead (run_h200.sh).
# Settings: CARRY (default .gpucarry), OUT (default benchmarks/results/asr-cuda),
# LEVELS (default "64 16"), BATCHES (default "1 4 16 64"), TURNS (default 2), VARIANTS (default none; see
# benchmarks.asr_batching --variants), PY (default python3).
# DEVICE=cpu rehearses the same steps on a CPU (a Python 3.12 with numpy, tokenizers,
# onnxruntime, huggingface_hub, tqdm, uvloop, prometheus-client, psutil and click, as that
# machine has): DEVICE=cpu LEVELS=2 BATCHES="1 2" TURNS=1 PY=/tmp/py312/bin/python bash benchmarks/gpu/asr_cuda.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=${CARRY:-.gpucarry}

if [ "${1:-}" = "--pack" ]; then
  PY=${PY:-.venv/bin/python}
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/ct2" "$CARRY/speech" "$CARRY/asterisk"
  dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "${@:2}"; }
  for pkg in faster-whisper==1.2.1 soxr==1.1.0 websockets==17.4 jiwer==4.0.0 rapidfuzz==3.14.6 \
             num2words==0.5.14 soundfile==0.14.0 cffi==2.1.1; do dl "$CARRY/wheels" "$pkg"; done
  # docopt (num2words' need) is published as an sdist only: its one module.
  "$PY" -c "import docopt, shutil, sys; shutil.copy(docopt.__file__, sys.argv[1])" "$CARRY/wheels"
  dl "$CARRY" ctranslate2==4.8.5
  (cd "$CARRY/ct2" && unzip -q ../ctranslate2-*.whl && rm ../ctranslate2-*.whl)
  "$PY" -m benchmarks.gpu.shrink_whisper \
    "$("$PY" -c 'from asr.models import resolve_whisper_model; print(resolve_whisper_model(None))')" \
    "$CARRY/tiny-en-int8"
  # Every large file that is not compressed already (the libraries, the weights, the tokenizer).
  find "$CARRY/ct2" "$CARRY/tiny-en-int8" -type f -size +256k -print0 | xargs -0 xz -9 -T2
  cp -r "$("$PY" -c 'from benchmarks.corpus import SHARED_SPEECH; print(SHARED_SPEECH)')"/. "$CARRY/speech/"
  "$PY" - "$CARRY/asterisk" <<'PYEOF'
import shutil, sys
from pathlib import Path
from benchmarks.corpus import ASTERISK_TRANSCRIPTS, asterisk_prompts
out = Path(sys.argv[1])
for u in asterisk_prompts(min_words=3)[::8]:
    shutil.copy(u.path, out / u.path.name)
shutil.copy(ASTERISK_TRANSCRIPTS, out / ASTERISK_TRANSCRIPTS.name)
PYEOF
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-benchmarks/results/asr-cuda}
LEVELS=${LEVELS:-"64 16"}
BATCHES=${BATCHES:-"1 4 16 64"}
TURNS=${TURNS:-2}
VARIANTS=${VARIANTS:-}  # e.g. "mix": also the default batch with partials beside finals flipped
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then COMPUTE=float16; else COMPUTE=int8; fi
mkdir -p "$OUT"
SITE=/tmp/firstline-site
PY=${PY:-python3}
rm -rf "$SITE" && mkdir -p "$SITE/av"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/wheels/*.whl
cp "$CARRY"/wheels/docopt.py "$SITE/"
cp -r "$CARRY"/ct2/. "$SITE/"
echo '"""Stand-in: PyAV is not on this machine; the ASR worker never decodes files."""' > "$SITE/av/__init__.py"
MODEL=/tmp/tiny-en-int8
rm -rf "$MODEL" && cp -r "$CARRY/tiny-en-int8" "$MODEL"
find "$SITE" "$MODEL" -name '*.xz' -print0 | xargs -0 xz -d -T4
if [ "$DEVICE" = cuda ]; then
  CUBLAS=$(find /opt /usr -name 'libcublas.so.13*' 2>/dev/null | head -1)
  [ -n "$CUBLAS" ] || { echo "no cuBLAS 13 library found" >&2; exit 2; }
  mkdir -p /tmp/cublas12 && ln -sf "$CUBLAS" /tmp/cublas12/libcublas.so.12
  export LD_LIBRARY_PATH="/tmp/cublas12:$(dirname "$CUBLAS")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export PYTHONPATH="$SITE:$PWD" DEVICE COMPUTE
export FIRSTLINE_SPEECH_DIR="$PWD/$CARRY/speech" FIRSTLINE_ASTERISK_SOUNDS="$PWD/$CARRY/asterisk"
export FIRSTLINE_ASTERISK_TRANSCRIPTS="$PWD/$CARRY/asterisk/core-sounds-en.txt.gz" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# Preflight: CTranslate2 sees the GPU and one real clip decodes on it.
"$PY" - "$MODEL" <<'PYEOF'
import os, sys, time
import ctranslate2
from asr.config import ASRConfig
from asr.whisper import WhisperDecoder
from benchmarks.corpus import shared_clips, through_phone_line
device = os.environ["DEVICE"]
print("ctranslate2", ctranslate2.__version__, "cuda devices", ctranslate2.get_cuda_device_count(),
      "compute types", sorted(ctranslate2.get_supported_compute_types(device)))
clip = shared_clips()[0]
audio = through_phone_line(clip.load(8000))
for compute in ("float16", "int8_float16") if device == "cuda" else ("int8",):
    dec = WhisperDecoder(ASRConfig(device=device, compute_type=compute, model=sys.argv[1]))
    dec.decode(audio)
    t = time.perf_counter(); out = dec.decode(audio); dt = time.perf_counter() - t
    print(f"{compute}: {dt * 1000:.1f} ms for {len(audio) / 16000:.1f} s: {out.text!r} (ref {clip.reference!r})")
PYEOF

for calls in $LEVELS; do
  DMON=""
  if [ "$DEVICE" = cuda ]; then nvidia-smi dmon -s u -d 1 > "$OUT/dmon_$calls.txt" 2>&1 & DMON=$!; fi
  # shellcheck disable=SC2086  # the batch list splits on purpose
  "$PY" -m benchmarks.asr_batching --device "$DEVICE" --compute-type "$COMPUTE" --model "$MODEL" --partial-budget 0 \
    --calls "$calls" --turns "$TURNS" --batch-sizes $BATCHES ${VARIANTS:+--variants $VARIANTS} \
    --burst 64 --burst-repeats 2 --every 1 \
    --output "$OUT/asr_batching_${DEVICE}_$calls.json" || echo "level $calls failed (rc $?)" >&2
  [ -z "$DMON" ] || kill "$DMON" 2>/dev/null || true
done
