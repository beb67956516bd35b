"""Smoke check for the pipecat peer: one real call over Twilio Media Streams.

Plays a real recording as Twilio would (connected, start, then 20 ms mu-law
8 kHz media frames at real time, then silence frames), prints the transcript
and reply sentences the bot reports (Twilio marks, see README.md), and the
time from the last voiced frame to the first reply sentence (TTFS).

Runs in firstline's venv, from the repo root:

    .venv/bin/python -m benchmarks.peers.pipecat.smoke --llm-base-url http://127.0.0.1:8080/v1
    .venv/bin/python -m benchmarks.peers.pipecat.smoke --url ws://127.0.0.1:8790/twilio   # bot already up

Without ``--url`` it starts the bot itself (PipecatPeer) on ``--port``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

from benchmarks.callers.base import to_wire
from benchmarks.callers.twilio import Twilio
from benchmarks.client import last_voiced_s
from benchmarks.corpus import SHARED_SPEECH, load_audio
from benchmarks.peers.pipecat.launch import PeerUnavailable, PipecatPeer
from streaming.codecs import encode, float_to_int16

FRAME_S = 0.02
SID = "MZ00000000000000000000000000000001"


def parse_mark(name: str) -> tuple[str, int, int | None, str] | None:
    """'sentence:<turn>:<index>:<text>' / 'transcript:<turn>:<text>' -> (kind, turn, index, text)."""
    kind, _, rest = name.partition(":")
    if kind == "sentence":
        turn, index, text = rest.split(":", 2)
        return kind, int(turn), int(index), text
    if kind == "transcript":
        turn, text = rest.split(":", 1)
        return kind, int(turn), None, text
    return None


async def call(url: str, clip: Path, lead_s: float, tail_s: float) -> dict:
    audio = load_audio(clip, 8000)
    voice_end = last_voiced_s(load_audio(clip, 16000))
    pcm = float_to_int16(np.concatenate([np.zeros(int(lead_s * 8000), np.float32), audio]))
    voice_end += lead_s
    n = int(8000 * FRAME_S)
    speech_frames = [pcm[i : i + n] for i in range(0, len(pcm), n)]
    speech_frames[-1] = np.pad(speech_frames[-1], (0, n - len(speech_frames[-1])))
    silence = np.full(n, 0, np.int16)
    got: list[tuple[float, dict]] = []
    first_sentence = asyncio.Event()
    last_voice_at: float | None = None

    async with connect(url, max_size=1 << 22, compression=None) as ws:

        async def reader() -> None:
            with contextlib.suppress(Exception):
                async for raw in ws:
                    msg = json.loads(raw)
                    got.append((time.monotonic(), msg))
                    if msg.get("event") == "mark":
                        parsed = parse_mark(msg["mark"]["name"])
                        if parsed and parsed[0] == "sentence" and parsed[2] == 0 and last_voice_at is not None:
                            first_sentence.set()

        read_task = asyncio.create_task(reader())
        wire = Twilio(sid=SID)  # the one Twilio caller (benchmarks/callers)
        for msg in wire.opening():
            await ws.send(to_wire(msg))
        t0 = time.monotonic()
        total = len(speech_frames) + int(tail_s / FRAME_S)
        for i in range(total):
            delay = t0 + i * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = speech_frames[i] if i < len(speech_frames) else silence
            await ws.send(to_wire(wire.media(encode(frame, "mulaw"), i * 20)))
            if last_voice_at is None and (i + 1) * FRAME_S >= voice_end:
                last_voice_at = time.monotonic()
            if first_sentence.is_set() and i >= len(speech_frames) and time.monotonic() - last_voice_at > 3.0:
                break  # keep the line open a little for the rest of the reply
        for msg in wire.closing():
            await ws.send(to_wire(msg))
        await asyncio.sleep(0.2)
        await ws.close()
        read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await read_task

    out: dict = {
        "clip": clip.name,
        "voice_end_s": round(voice_end, 3),
        "transcripts": [],
        "sentences": [],
        "other_events": sorted({m.get("event", "?") for _, m in got if m.get("event") != "mark"}),
    }
    ttfs = None
    for at, msg in got:
        if msg.get("event") != "mark":
            continue
        parsed = parse_mark(msg["mark"]["name"])
        if parsed is None:
            continue
        kind, turn, index, text = parsed
        rel = None if last_voice_at is None else round(at - last_voice_at, 3)
        if kind == "transcript":
            out["transcripts"].append({"turn": turn, "text": text, "after_last_voice_s": rel})
        else:
            out["sentences"].append({"turn": turn, "index": index, "text": text, "after_last_voice_s": rel})
            if ttfs is None and index == 0 and rel is not None and rel > 0:
                ttfs = rel
    out["ttfs_s"] = ttfs
    # With --tts hibari the bot also speaks: first reply audio after the last voiced frame.
    media = [at for at, m in got if m.get("event") == "media" and last_voice_at is not None and at > last_voice_at]
    out["media_frames"] = sum(1 for _, m in got if m.get("event") == "media")
    out["first_audio_s"] = round(media[0] - last_voice_at, 3) if media else None
    return out


def find_clip(name: str) -> Path:
    clip = Path(name)
    return clip if clip.exists() else SHARED_SPEECH / name


async def main_async(args: argparse.Namespace) -> int:
    clip = find_clip(args.clip)
    if args.url:
        results = [await call(args.url, clip, args.lead_s, args.tail_s) for _ in range(args.calls)]
    else:
        try:
            async with PipecatPeer(
                args.port, args.llm_base_url, args.whisper_model, extra_args=args.bot_arg or []
            ) as peer:
                print(f"bot ready at {peer.url} after {peer.startup_s:.1f} s", file=sys.stderr)
                results = [await call(peer.url, clip, args.lead_s, args.tail_s) for _ in range(args.calls)]
        except PeerUnavailable as exc:
            print(f"pipecat peer {exc}")
            return 2
    for r in results:
        print(json.dumps(r, indent=2))
    return 0 if all(r["ttfs_s"] is not None for r in results) else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running bot (ws://host:port/twilio)")
    p.add_argument("--llm-base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--whisper-model", default=None)
    p.add_argument(
        "--bot-arg", action="append", help="extra bot.py argument (repeatable): --bot-arg=--turn-stop=speech-timeout"
    )
    p.add_argument("--clip", default="jfk.wav", help="file, or a name in ../shared/data/speech")
    p.add_argument("--calls", type=int, default=1, help="calls in a row (the first one is cold)")
    p.add_argument("--lead-s", type=float, default=0.3, help="silence before the speech")
    p.add_argument("--tail-s", type=float, default=8.0, help="max silence after the speech")
    sys.exit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
