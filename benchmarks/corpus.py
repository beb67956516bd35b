"""Real speech for tests and benchmarks, with reference transcripts.

Two sources, both real human speech:
* ``../shared/data/speech`` beside the project (manifest.jsonl with references);
* Debian's ``asterisk-core-sounds-en-wav`` (8 kHz phone prompts; ``.ci/run``
  and ``make test-deps`` install it with apt).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

from streaming.codecs import StreamResampler, decode, encode, float_to_int16, int16_to_float

ROOT = Path(__file__).resolve().parent.parent
SHARED_SPEECH = Path(os.environ.get("FIRSTLINE_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech"))
# Debian's asterisk-core-sounds-en-wav; settable for a machine without apt
# (benchmarks/gpu carries a subset to the lent GPU machine).
ASTERISK_SOUNDS = Path(os.environ.get("FIRSTLINE_ASTERISK_SOUNDS", "/usr/share/asterisk/sounds/en"))
ASTERISK_TRANSCRIPTS = Path(
    os.environ.get("FIRSTLINE_ASTERISK_TRANSCRIPTS", "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
)


@dataclass(frozen=True)
class Utterance:
    name: str
    path: Path
    reference: str

    def load(self, rate: int = 16000) -> np.ndarray:
        """Mono float32 at ``rate`` (first channel of a multi-channel file)."""
        return load_audio(self.path, rate)


def load_audio(path: Path, rate: int = 16000) -> np.ndarray:
    data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data[:, 0]
    if file_rate != rate:
        mono = soxr.resample(mono, file_rate, rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def shared_clips(single_speaker_only: bool = True) -> list[Utterance]:
    manifest = SHARED_SPEECH / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"speech manifest not found at {manifest} (set FIRSTLINE_SPEECH_DIR)")
    clips = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if single_speaker_only and (entry["speakers"] != 1 or entry["channels"] != 1):
            continue
        clips.append(Utterance(entry["file"], SHARED_SPEECH / entry["file"], entry["reference"]))
    return clips


def shared_clip(name: str) -> Utterance:
    for clip in shared_clips(single_speaker_only=False):
        if clip.name == name:
            return clip
    raise KeyError(name)


# Annotations in the Asterisk transcript file that are not spoken words.
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)")


def asterisk_prompts(min_words: int = 3) -> list[Utterance]:
    """Spoken Asterisk prompts with clean references (tones/silence dropped)."""
    if not ASTERISK_TRANSCRIPTS.exists():
        return []
    prompts = []
    for line in gzip.open(ASTERISK_TRANSCRIPTS, "rt", encoding="utf-8", errors="replace"):
        if ":" not in line or line.startswith(";"):
            continue
        name, text = line.split(":", 1)
        text = _ANNOTATION.sub(" ", text).strip()
        path = ASTERISK_SOUNDS / f"{name.strip()}.wav"
        if len(text.split()) >= min_words and path.exists():
            prompts.append(Utterance(f"asterisk/{name.strip()}", path, text))
    return sorted(prompts, key=lambda u: u.name)


def spoken(text: str, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """``text`` in the embedded TTS voice (hibari-tts, "heart"), float32 at
    ``rate``: a caller for a machine with no recording of the words wanted.
    One voice, loaded once per process; ``seed`` fixes its sampling."""
    global _voice
    if _voice is None:
        from hibari import Hibari

        _voice = Hibari(voice="heart", threads=1)
    audio24 = np.asarray(_voice(text, seed=seed), dtype=np.float32)
    return soxr.resample(audio24, 24000, rate).astype(np.float32)


_voice = None


def through_phone_line(audio8k: np.ndarray, encoding: str = "mulaw", rate: int = 16000) -> np.ndarray:
    """8 kHz float -> G.711 -> back -> ``rate``: what the server hears of a call."""
    pcm = decode(encode(float_to_int16(audio8k), encoding), encoding)  # type: ignore[arg-type]
    return StreamResampler(8000, rate).process(int16_to_float(pcm), last=True)
