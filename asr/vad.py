"""Streaming Silero VAD v6 (ONNX from faster-whisper's wheel).

The model is recurrent: its LSTM state (h, c) and the last 64 samples of the
previous chunk are carried from one 32 ms chunk to the next, so each call
keeps a :class:`VADStream` for its whole life. The ONNX session itself is
shared by every call (onnxruntime sessions are safe to run concurrently).
"""

from __future__ import annotations

import numpy as np

from asr.models import silero_vad_path

CHUNK = 512  # samples at 16 kHz = 32 ms, the size Silero v6 is trained on
CONTEXT = 64


class SileroVAD:
    def __init__(self, path: str | None = None) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        # A 32 ms chunk is tiny; more threads only add scheduling overhead.
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(
            str(silero_vad_path(path)), providers=["CPUExecutionProvider"], sess_options=opts
        )

    def stream(self) -> VADStream:
        return VADStream(self)


class VADStream:
    """Speech probability per 32 ms chunk of one call's 16 kHz audio."""

    def __init__(self, vad: SileroVAD) -> None:
        self._session = vad.session
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Feed float32 16 kHz audio; returns one probability per completed chunk."""
        audio = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n_chunks = len(audio) // CHUNK
        self._pending = audio[n_chunks * CHUNK :].copy()
        probs = np.empty(n_chunks, dtype=np.float32)
        for i in range(n_chunks):
            chunk = audio[i * CHUNK : (i + 1) * CHUNK]
            x = np.concatenate([self._context, chunk])[None, :]
            out, self._h, self._c = self._session.run(None, {"input": x, "h": self._h, "c": self._c})
            self._context = chunk[-CONTEXT:]
            probs[i] = float(np.asarray(out).reshape(-1)[0])
        return probs
