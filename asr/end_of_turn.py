"""End-of-turn decisions at a pause: how long to keep listening.

The word rules (asr/endpointing.py) read only the pause decode's words, and
Whisper punctuates fragments as if they were finished, so a caller reading
out an account number gets cut off. Smart Turn v3.2 (pipecat's BSD-2 audio
end-of-turn model, 8.7 MB ONNX, Whisper-tiny encoder + classifier) hears the
*prosody* of the last up to 8 s and says whether the speaker sounds done.

Policies (``ASRConfig.end_of_turn``), each choosing the endpoint window at a
pause:

* ``adaptive``: the word rules alone (0.3 / 0.7 / 1.2 s; a number read
  out in full ``endpoint_sure_s``).
* ``smart_turn``: the model alone: done -> ``endpoint_min_s``, else
  ``endpoint_max_s``.
* ``smart_turn+rules``: a word that cannot end a sentence (conjunction,
  filler, article, bare digit) still waits the long window whatever the
  model says; otherwise the model decides.
* ``smart_turn_scaled+rules``: the same veto, otherwise the window grows
  with the model's doubt: ``min + (1 - P(done)) * (max - min)``.
* ``smart_turn_scaled+rules+llm``: that, and the loaded LLM's probability
  that the sentence ends after the caller's words (llm/sentence_end.py)
  below ``llm_sentence_end_threshold`` waits the longest window too.
* ``whisper+rules``: the word rules, and Whisper's own punctuation after
  the words it heard at the pause (asr/whisper.py ``sentence_end_share``:
  P(. ? !) against P(. ? ! , ...), read from the pause decode itself, so
  free) below ``whisper_sentence_end_threshold`` waits the longest window.
  Whisper picks its mark from the voice as well as the words: "Please
  hold" cut in fluent speech gets a comma, said as a whole turn a full stop.
  A finished sentence Whisper closes with a share of at least
  ``whisper_sure_threshold`` ends after ``endpoint_sure_s`` (``sure_end``).
* ``whisper+rules+llm``: that, and the LLM's veto as above.

Measured side by side by benchmarks/end_of_turn.py on
benchmarks/data/eot/pauses.json.

The model is not committed: it is one file inside the ``pipecat-ai`` wheel,
found in an installed pipecat, in ``FIRSTLINE_SMART_TURN_MODEL``, or in the
cache that ``python -m asr.end_of_turn --fetch`` fills from PyPI.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np

from asr.config import LLM_END_OF_TURN_POLICIES, SMART_TURN_POLICIES, WHISPER_END_OF_TURN_POLICIES, ASRConfig
from asr.endpointing import number_read_out, short_answer

MODEL_NAME = "smart-turn-v3.2-cpu.onnx"
# The wheel that ships the file, pinned so the model (and the preprocessing
# below, copied from that version) cannot change under us.
PIPECAT_WHEEL = "pipecat-ai==1.14.0"
_WHEEL_MEMBER = f"pipecat/audio/turn/smart_turn/data/{MODEL_NAME}"
CACHE_DIR = Path(os.environ.get("FIRSTLINE_CACHE_DIR", Path.home() / ".cache" / "firstline"))

RATE = 16000
WINDOW_S = 8  # Smart Turn v3 sees the last 8 s, left-padded with zeros


class SmartTurnMissing(RuntimeError):
    """The Smart Turn ONNX file is not on this machine."""


def _candidates(explicit: str | None) -> list[Path]:
    paths: list[Path] = []
    if explicit:
        return [Path(explicit)]
    env = os.environ.get("FIRSTLINE_SMART_TURN_MODEL")
    if env:
        paths.append(Path(env))
    # An installed pipecat-ai (e.g. benchmarks/peers/pipecat's venv is not
    # ours, but a user's may have it): find_spec does not import pipecat.
    spec = importlib.util.find_spec("pipecat")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            paths.append(Path(root) / "audio" / "turn" / "smart_turn" / "data" / MODEL_NAME)
    paths.append(CACHE_DIR / MODEL_NAME)
    peer = Path(__file__).resolve().parent.parent / "benchmarks" / "peers" / "pipecat" / ".venv"
    paths.extend(sorted(peer.glob(f"lib/python*/site-packages/{_WHEEL_MEMBER}")))
    return paths


def find_smart_turn_model(explicit: str | None = None) -> Path:
    """The ONNX file's path, or :class:`SmartTurnMissing` saying how to get it."""
    tried = _candidates(explicit)
    for path in tried:
        if path.is_file():
            return path
    raise SmartTurnMissing(
        f"Smart Turn model {MODEL_NAME} not found (tried: {', '.join(map(str, tried))}). "
        f"Fetch it from PyPI with `python -m asr.end_of_turn --fetch` (extracts it from {PIPECAT_WHEEL} "
        f"into {CACHE_DIR}), or pass its path (--smart-turn-model / FIRSTLINE_SMART_TURN_MODEL)."
    )


def fetch_smart_turn_model(cache_dir: Path = CACHE_DIR) -> Path:
    """pip-download the pipecat wheel (no deps) and extract the one ONNX file."""
    target = cache_dir / MODEL_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", PIPECAT_WHEEL, "--no-deps", "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("pipecat_ai-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            partial = target.with_suffix(".part")
            partial.write_bytes(zf.read(_WHEEL_MEMBER))
            partial.rename(target)  # atomic: a half-written model is never found
    return target


# ---- Whisper log-mel features exactly as pipecat computes them ------------
# pipecat/audio/turn/smart_turn/_whisper_features.py (1.14.0): transformers'
# WhisperFeatureExtractor(chunk_length=8) with do_normalize=True. The model
# was trained on these, so any drift (faster-whisper's extractor does not
# normalise the waveform and pads to 30 s) moves its probabilities.
_N_FFT = 400
_HOP = 160
_N_MELS = 80


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    freq = np.atleast_1d(np.asarray(freq, dtype=np.float64))
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.atleast_1d(np.asarray(mels, dtype=np.float64))
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - 15.0))
    return freq


def _mel_filters() -> np.ndarray:
    bins = _N_FFT // 2 + 1
    mel_freqs = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([RATE / 2]))[0], _N_MELS + 2)
    filter_freqs = _mel_to_hz(mel_freqs)
    fft_freqs = np.linspace(0, RATE // 2, bins)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= (2.0 / (filter_freqs[2 : _N_MELS + 2] - filter_freqs[:_N_MELS]))[None, :]  # Slaney area norm
    return filters


_MEL = _mel_filters()
_HANN = np.hanning(_N_FFT + 1)[:-1]  # periodic, like torch.hann_window


def log_mel(audio: np.ndarray) -> np.ndarray:
    """(80, 800) float32 features of exactly 8 s of 16 kHz audio."""
    x = np.asarray(audio, dtype=np.float32)[: RATE * WINDOW_S]
    x = np.pad(x, (0, RATE * WINDOW_S - x.size))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # before the STFT, in float32, as the reference does
    padded = np.pad(x.astype(np.float64), (_N_FFT // 2, _N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]
    power = (np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2).T
    spec = np.log10(np.maximum(1e-10, _MEL.T @ power))[:, :-1]
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


class SmartTurn:
    """Smart Turn v3.2: P(the speaker is done) from the turn's audio."""

    def __init__(self, model_path: str | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = find_smart_turn_model(model_path)
        so = ort.SessionOptions()
        # pipecat's settings: one sequential thread, so a pause decision never
        # takes a second core from Whisper or the LLM.
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()  # one inference at a time per session keeps the cost per pause flat

    def probability(self, audio: np.ndarray) -> float:
        """``audio``: the turn so far, 16 kHz float, ending at the pause."""
        window = np.asarray(audio, dtype=np.float32)[-RATE * WINDOW_S :]
        window = np.pad(window, (RATE * WINDOW_S - window.size, 0))  # zeros in front, as pipecat does
        features = log_mel(window)[None]
        with self._lock:
            out = self._session.run(None, {"input_features": features})
        return float(np.asarray(out[0]).reshape(-1)[0])


_shared_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _shared(path: str | None) -> SmartTurn:
    return SmartTurn(path)


def shared_smart_turn(model_path: str | None = None) -> SmartTurn:
    """One model per process (the ONNX session is ~30 MB), loaded on first use;
    keyed by the file it resolves to, so None and its explicit path share it."""
    with _shared_lock:
        return _shared(_resolved(model_path))


@functools.lru_cache(maxsize=8)
def _resolved(model_path: str | None) -> str:
    # Cached: a call asks at every pause, and finding the file searches disk.
    return str(find_smart_turn_model(model_path).resolve())


def wants_marks(config: ASRConfig) -> bool:
    """Whether a pause's decode reads Whisper's sentence-end share
    (Decoded.sentence_end_p): only under a policy that uses it, and only
    where a pause can end the turn (not push-to-talk)."""
    return config.adaptive_endpoint and config.auto_turns and config.end_of_turn in WHISPER_END_OF_TURN_POLICIES


def whisper_marks(words: str, share: float | None, asked: str | None = None) -> float | None:
    """Whisper's sentence-end share at a pause as an end-of-turn input, or
    None where it must not hold the turn: a short answer on its own ("Yes.",
    "Tuesday.") or a number read out in full, which the word rules know are
    complete and Whisper, hearing one word or a string of digits, is unsure
    of (as the LLM is not asked about them: ``asks_llm``). ``asked``: the
    agent's line the caller answers (``number_read_out``)."""
    if share is None or short_answer(words) or number_read_out(words, asked):
        return None
    return share


def marks_hold(whisper_end: float | None, config: ASRConfig) -> bool:
    """Whisper's marks (as ``whisper_marks`` gives them) hold the turn the
    longest window: its share of a full stop is below the threshold (the
    hold threshold where one is set)."""
    hold = config.whisper_hold_threshold or config.whisper_sentence_end_threshold
    return whisper_end is not None and whisper_end < hold


def marks_unsure(whisper_end: float | None, config: ASRConfig) -> bool:
    """Whisper's share is between the hold threshold and the sentence-end
    threshold: not a finished sentence, nor held the longest: the turn waits
    at least the unsure window."""
    return (
        whisper_end is not None
        and whisper_end < config.whisper_sentence_end_threshold
        and not marks_hold(whisper_end, config)
    )


def sure_end(rule_window: float, whisper_end: float | None, config: ASRConfig) -> bool:
    """The rules read a finished sentence (their shortest window) and
    Whisper's marks close it with a share of at least
    ``whisper_sure_threshold``: both say done, so ``endpoint_sure_s``
    (0: no such tier)."""
    return (
        config.endpoint_sure_s > 0
        and rule_window <= config.endpoint_min_s
        and whisper_end is not None
        and whisper_end >= config.whisper_sure_threshold
    )


def asks_llm(
    words: str,
    rule_window: float | None,
    config: ASRConfig,
    whisper_end: float | None = None,
    asked: str | None = None,
) -> bool:
    """Whether this pause's words go to the LLM for P(the sentence ends
    here): only under an LLM policy, and not where the answer could not
    change the window: the words already wait the longest one, end on a
    number read out in full (the rule counted its digits; a small LLM cannot,
    and would hold "my zip code is 94107" as unfinished), or are a short
    answer on their own ("Yes.", "Tuesday.": SmolLM2 reads those as going
    on, benchmarks/end_of_turn.py), nor where Whisper's marks
    (``whisper_end``, as ``whisper_marks`` gives them) already hold it.
    ``asked``: the agent's line the caller answers."""
    return (
        config.end_of_turn in LLM_END_OF_TURN_POLICIES
        and bool(words)
        and not marks_hold(whisper_end, config)
        and not (rule_window is not None and rule_window >= config.endpoint_max_s)
        and not number_read_out(words, asked)
        and not short_answer(words)
    )


def decide_window(
    policy: str,
    rule_window: float | None,
    probability: float | None,
    config: ASRConfig,
    sentence_end: float | None = None,
    whisper_end: float | None = None,
) -> float:
    """Endpoint window (s) from what is known so far at this pause.

    ``rule_window``: the word rules' window for the pause decode (None until
    that decode is in); ``probability``: Smart Turn's P(done) (None until the
    model ran); ``sentence_end``: the LLM's P(the sentence ends here) on the
    pause decode's words (None until it answered, or where the engine
    cannot say); ``whisper_end``: Whisper's sentence-end share from the same
    decode as ``rule_window`` (None where it has none). Any may arrive
    first; the session calls this on each.
    """
    if policy in LLM_END_OF_TURN_POLICIES:
        # The LLM knows "my number is" and "I'd like to book an" need more
        # words, which the rules' word list and an ear both miss; until it
        # has answered, the policy without it decides.
        if sentence_end is not None and sentence_end < config.llm_sentence_end_threshold:
            return config.endpoint_max_s
        policy = policy.removesuffix("+llm")
    if policy in WHISPER_END_OF_TURN_POLICIES:
        if rule_window is None:
            return config.endpoint_unsure_s  # the pause decode is not in: neither are its words nor its marks
        # Whisper heard a voice that goes on, whatever mark it wrote.
        if marks_hold(whisper_end, config):
            return config.endpoint_max_s
        if marks_unsure(whisper_end, config):
            return max(rule_window, config.endpoint_unsure_s)
        if sure_end(rule_window, whisper_end, config):
            return min(config.endpoint_sure_s, rule_window)  # never longer for being sure
        return rule_window
    if policy not in SMART_TURN_POLICIES:
        return rule_window if rule_window is not None else config.endpoint_unsure_s
    done = probability is not None and probability >= config.smart_turn_threshold
    if policy == "smart_turn":
        if probability is None:
            return config.endpoint_unsure_s  # the model is a few ms behind the pause: don't decide yet
        return config.endpoint_min_s if done else config.endpoint_max_s
    if policy == "smart_turn_scaled+rules":
        if rule_window is not None and rule_window >= config.endpoint_max_s:
            return config.endpoint_max_s
        if probability is None:
            # The vetoes are handled above: a finished-looking sentence must not
            # end the turn before the model, one encoder pass behind, has spoken.
            return config.endpoint_unsure_s
        scaled = config.endpoint_min_s + (1.0 - probability) * (config.endpoint_max_s - config.endpoint_min_s)
        # Until the words are in, never shorter than the unsure window: they
        # may still veto.
        return scaled if rule_window is not None else max(scaled, config.endpoint_unsure_s)
    # smart_turn+rules: a continuation word or a bare number ("my number is",
    # "five five five") still waits the long window: the model hears a
    # digit group's falling pitch as an ending and lets the caller go.
    if rule_window is not None and rule_window >= config.endpoint_max_s:
        return config.endpoint_max_s
    if rule_window is None:
        # The model is usually in before the words (one small encoder pass vs a
        # Whisper decode): "done" cannot end the turn until the words agree,
        # "not done" can already wait long.
        if probability is None or done:
            return config.endpoint_unsure_s
        return config.endpoint_max_s
    if probability is None:
        return config.endpoint_unsure_s  # as above: the model has not spoken yet
    if done:
        return config.endpoint_min_s
    # The model says not done: a finished-looking sentence still ends after
    # the unsure window (the model misses some flat-toned true ends), any
    # other text waits long.
    return config.endpoint_unsure_s if rule_window <= config.endpoint_min_s else config.endpoint_max_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Smart Turn model: fetch it from PyPI or show where it is")
    parser.add_argument("--fetch", action="store_true", help=f"download {PIPECAT_WHEEL} (no deps), extract the model")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR))
    ns = parser.parse_args(argv)
    if ns.fetch:
        print(fetch_smart_turn_model(Path(ns.cache_dir)))
    else:
        print(find_smart_turn_model())


if __name__ == "__main__":
    main()
