"""What the server's GIL costs a Whisper decode, and what a decoder process saves.

The same real utterance is decoded over and over, in the same run, with:
nothing else running; a busy Python thread in this process (what the event
loop, the TTS and the LLM clients' callbacks are when calls pile up: they
hold the GIL the decoder needs between its native calls); the same busy
loop in another process (CPU contention alone, no GIL); and the decoder in
a process of its own (asr/lanes.py ProcessLane) beside the busy thread.
In-process decodes are split into feature extraction and the model.

    python -m benchmarks.decoder_gil [--rounds 15]

Writes benchmarks/results/decoder_gil.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

from asr.config import ASRConfig
from asr.lanes import ProcessLane, decoder_thread_setup
from asr.whisper import WhisperDecoder
from benchmarks.bench import write_rows
from benchmarks.corpus import shared_clip, through_phone_line
from streaming.threads import one_blas_thread

BUSY = "while True:\n    sum(range(200))\n"


@contextmanager
def busy_thread() -> Iterator[None]:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(200))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    time.sleep(0.2)
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def busy_process() -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(0.3)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def phases(decoder: WhisperDecoder, audio: np.ndarray) -> tuple[float, float]:
    """ms of feature extraction, then of the model (encoder and decoder), for
    one decode as asr/whisper.py runs it (its own two steps, timed apart)."""
    t0 = time.perf_counter()
    item = decoder._prepare(audio)
    t1 = time.perf_counter()
    decoder._run([item], t1)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def summarise(label: str, runs: list[tuple[float, ...]], names: tuple[str, ...]) -> dict[str, object]:
    row: dict[str, object] = {"condition": label}
    for i, name in enumerate(names):
        row[f"{name}_p50_ms"] = round(statistics.median(r[i] for r in runs), 1)
    row["total_p50_ms"] = round(statistics.median(sum(r) for r in runs), 1)
    print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "decoder_gil.json"))
    ns = parser.parse_args()
    started = time.time()
    one_blas_thread()
    clip = shared_clip("jfk.wav")
    audio = through_phone_line(clip.load(8000))
    config = ASRConfig(threads=1, decoder_process=False)
    pool = ThreadPoolExecutor(1, initializer=decoder_thread_setup, initargs=("asr", 0))
    decoder = pool.submit(WhisperDecoder, config).result()
    names = ("features", "model")

    def in_thread(label: str) -> dict[str, object]:
        pool.submit(phases, decoder, audio).result()  # warm
        return summarise(label, [pool.submit(phases, decoder, audio).result() for _ in range(ns.rounds)], names)

    rows = [in_thread("alone")]
    with busy_thread():
        rows.append(in_thread("busy Python thread in this process (GIL and CPU)"))
    with busy_process():
        rows.append(in_thread("busy Python loop in another process (CPU only)"))

    async def in_process(label: str, busy: Callable[[], AbstractContextManager[None]]) -> dict[str, object]:
        lane = ProcessLane(config, "asr", 0)
        await lane.start()
        try:
            await lane.decode(audio)  # warm
            runs = []
            with busy():
                for _ in range(ns.rounds):
                    t = time.perf_counter()
                    await lane.decode(audio)
                    runs.append(((time.perf_counter() - t) * 1000,))
        finally:
            lane.close()
        return summarise(label, runs, ("wall",))

    rows.append(asyncio.run(in_process("decoder process, busy Python thread in the server", busy_thread)))
    write_rows(Path(ns.output), started, {"rounds": ns.rounds, "clip": clip.name}, rows)


if __name__ == "__main__":
    main()
