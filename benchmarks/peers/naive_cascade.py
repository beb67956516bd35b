"""The naive cascade: the baseline every voice pipeline starts as.

Same models, same VAD, same Twilio wire shape, same TTS and playout as
firstline; only the pipeline differs. Per turn it:

1. waits for the VAD stop: ``--stop-silence-ms`` of silence after speech
   (default 500 ms = firstline's ``--fixed-endpoint`` window; pipecat's
   default Silero stop is 200 ms, before its Smart Turn model);
2. transcribes the whole utterance once (firstline's Whisper decoder and
   ASR worker, FIFO: no partials, no preemptive decode);
3. generates the whole reply (no prefill while the caller speaks, nothing
   sent until the LLM is done);
4. splits it into sentences (firstline's segmenter) and sends them.

The caller may still barge in (speech during the reply cancels it and
clears the carrier's audio), as every framework does. Events and
``turn.metrics`` have the same names and definitions as firstline's
(``voice.call.turn.TurnTimes``), and the Twilio benchmark side channel
(``customParameters.firstline_events``) works the same, so
benchmarks/loadgen.py measures both identically.

    python -m benchmarks.peers.naive_cascade --port 8766 [--stop-silence-ms 500] [firstline serve model flags]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import sys
import time
from collections import deque
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from asr.turns import SpeechStarted, TurnEnded, TurnTracker
from llm.base import GenerationRequest
from streaming.codecs import StreamResampler, decode, int16_to_float
from streaming.sentences import SentenceSegmenter
from voice.call.history import keep_heard
from voice.call.session import Emit
from voice.call.start import ProtocolError, Start, check_audio_frame
from voice.call.turn import TurnTimes
from voice.server.app import VoiceServer, _json_response
from voice.server.runtime import Runtime
from voice.transports.carriers.twilio import PATH as TWILIO_PATH
from voice.transports.carriers.twilio import TwilioCall

log = logging.getLogger(__name__)

ASR_RATE = 16000
DEFAULT_STOP_SILENCE_S = 0.5
_ids = itertools.count(1)


class NaiveSession:
    """The CallSession API (start / audio / commit / stop / reply_heard /
    dtmf) with a wait-then-do-everything pipeline behind it."""

    def __init__(self, runtime: Runtime, emit: Emit, stop_silence_s: float = DEFAULT_STOP_SILENCE_S) -> None:
        self.runtime = runtime
        self.emit = emit
        self.call_id = f"naive-{next(_ids)}"
        self.started = False
        self.closed = False
        # The same VAD turn tracker as firstline, reduced to a plain VAD stop.
        self.asr_config = dataclasses.replace(
            runtime.config.asr,
            partials=False,
            preemptive=False,
            adaptive_endpoint=False,
            endpoint_silence_s=stop_silence_s,
        )
        self.max_tokens = runtime.config.llm.max_tokens
        self._system_prompt = runtime.config.llm.system_prompt
        self._start: Start | None = None
        self._resampler: StreamResampler | None = None
        self._tracker: TurnTracker | None = None
        self.history: list[dict[str, str]] = []
        self._replies: dict[int, dict[str, str]] = {}
        self._turn = 0
        self._reply: asyncio.Task[None] | None = None
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=4096)
        self._fed_s = 0.0
        self._pending_text = ""  # a turn talked over before its reply: joins the next

    async def start(self, start: Start) -> None:
        if self.started:
            raise ProtocolError("already_started", "the call has already started")
        self._start = start
        self._resampler = StreamResampler(start.sample_rate, ASR_RATE)
        self._tracker = TurnTracker(self.asr_config, self.runtime.vad.stream())
        if start.system_prompt:
            self._system_prompt = start.system_prompt
        self.started = True
        await self.emit({"type": "ready", "call_id": self.call_id, "protocol_version": 1,
                         "audio": {"encoding": start.encoding, "sample_rate": start.sample_rate},
                         "endpoint_silence_ms": round(self.asr_config.endpoint_silence_s * 1000),
                         "adaptive_endpoint": False, "engine": self.runtime.engine.describe(),
                         "pipeline": "naive-cascade"})  # fmt: skip

    async def audio(self, payload: bytes, message_s: float | None = None) -> None:
        # message_s: the transport's hint for the silent-line filler, which
        # this baseline does not have.
        if not self.started or self._start is None:
            raise ProtocolError("not_started", "audio before 'start'; send start first")
        check_audio_frame(payload, self._start.encoding)
        assert self._resampler is not None and self._tracker is not None
        samples = self._resampler.process(int16_to_float(decode(payload, self._start.encoding)))  # type: ignore[arg-type]
        now = time.monotonic()
        self._fed_s += len(samples) / ASR_RATE
        self._arrivals.append((self._fed_s, now))
        for ev in self._tracker.feed(samples):
            await self._on_event(ev, now)

    async def commit(self) -> None:
        if self._tracker is not None:
            ended = self._tracker.commit()
            if ended is not None:
                await self._on_event(ended, time.monotonic())

    async def stop(
        self, reason: str = "client_stop", heard: dict[int, str] | None = None, ended_by_server: bool = False
    ) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reply is not None:
            self._reply.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reply
        for turn, words in (heard or {}).items():
            self.reply_heard(turn, words)
        log.info("call %s ended (%s)", self.call_id, reason)

    def reply_heard(self, turn: int, heard: str) -> None:
        keep_heard(self.history, self._replies, turn, heard)

    def reply_in_flight(self) -> bool:
        return self._reply is not None and not self._reply.done()

    def go_on_after_noise(self, cut: int) -> None:
        """A naive cascade leaves a reply a noise cut as it is."""

    def dtmf(self, digit: str) -> None:
        self._pending_text = " ".join(filter(None, [self._pending_text, f"[caller pressed {digit}]"]))

    # ---- the pipeline ----------------------------------------------------------

    async def _on_event(self, ev: object, now: float) -> None:
        if isinstance(ev, SpeechStarted):
            await self.emit({"type": "speech.started", "audio_ms": round(ev.audio_s * 1000)})
            if self._reply is not None and not self._reply.done():
                self._reply.cancel()  # barge-in
        elif isinstance(ev, TurnEnded):
            if self._reply is not None and not self._reply.done():
                self._reply.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._reply
            self._turn += 1
            times = TurnTimes(speech_end=self._arrival_of(ev.speech_end_audio_s), endpoint=now)
            self._reply = asyncio.create_task(self._respond(self._turn, ev.audio, times))

    def _arrival_of(self, position_s: float) -> float:
        for end_s, arrived in self._arrivals:
            if end_s >= position_s:
                return arrived
        return time.monotonic()

    async def _respond(self, turn: int, audio: Any, times: TurnTimes) -> None:
        times.asr_start = time.monotonic()
        decoded = await self.runtime.asr.submit(self.call_id, audio, final=True)
        times.asr_final = time.monotonic()
        user_text = " ".join(filter(None, [self._pending_text, decoded.text])).strip()
        if not user_text:
            return
        self._pending_text = user_text  # until a reply goes out
        await self.emit({"type": "transcript.final", "turn": turn, "text": user_text})
        await self.emit({"type": "turn.ended", "turn": turn})
        messages = [{"role": "system", "content": self._system_prompt}, *self.history,
                    {"role": "user", "content": user_text}]  # fmt: skip
        request = GenerationRequest(f"{self.call_id}-t{turn}", messages, max_tokens=self.max_tokens,
                                    temperature=self.runtime.config.llm.temperature)  # fmt: skip
        text = ""
        async for delta in self.runtime.engine.stream(request):
            if times.llm_first_token is None:
                times.llm_first_token = time.monotonic()
            text += delta
        segmenter = SentenceSegmenter(max_words=self.runtime.config.sentence_max_words)
        sentences = [*segmenter.push(text), *segmenter.flush()]
        self._pending_text = ""
        for i, sentence in enumerate(sentences):
            if i == 0:
                times.first_sentence = time.monotonic()
            await self.emit({"type": "response.sentence", "turn": turn, "index": i, "text": sentence,
                             "first": i == 0})  # fmt: skip
        times.done = time.monotonic()
        reply = " ".join(sentences)
        self.history.append({"role": "user", "content": user_text})
        if reply:
            message = {"role": "assistant", "content": reply}
            self.history.append(message)
            self._replies[turn] = message
        del self.history[: -2 * self.runtime.config.llm.history_turns]
        await self.emit({"type": "response.done", "turn": turn, "text": reply, "cancelled": False,
                         "usage": request.usage.as_dict()})  # fmt: skip
        await self.emit({"type": "turn.metrics", "turn": turn, **times.metrics(), "preemptive": False,
                         "wasted_generations": 0, "completion_tokens": request.usage.completion_tokens,
                         "cached_tokens": request.usage.cached_tokens})  # fmt: skip


class NaiveTwilioCall(TwilioCall):
    """Twilio Media Streams with the naive pipeline behind it (same TTS,
    playout, marks and barge-in clear as firstline's TwilioCall)."""

    transport = "twilio-naive"

    def __init__(self, ws: Any, runtime: Runtime, stop_silence_s: float = DEFAULT_STOP_SILENCE_S) -> None:
        super().__init__(ws, runtime)
        self.session = NaiveSession(runtime, self._on_session_event, stop_silence_s)  # type: ignore[assignment]
        self.call_id = self.session.call_id


class NaiveCascadeServer(VoiceServer):
    """firstline's server shell (health, readiness, metrics, admission)
    with one route: ``/twilio`` -> the naive cascade."""

    def __init__(self, config: Any, runtime: Runtime | None = None, stop_silence_s: float = DEFAULT_STOP_SILENCE_S):
        super().__init__(config, runtime)
        self.stop_silence_s = stop_silence_s

    def _process_request(self, connection: Any, request: Any) -> Any:
        path = request.path.split("?", 1)[0]
        if path not in ("/healthz", "/readyz", "/metrics", TWILIO_PATH):
            return _json_response(404, {"error": f"no route {path}; the naive cascade answers {TWILIO_PATH}"})  # type: ignore[arg-type]
        return super()._process_request(connection, request)

    def route(self, path: str) -> Any:
        async def naive(ws: Any, runtime: Runtime) -> None:
            await NaiveTwilioCall(ws, runtime, self.stop_silence_s).serve()

        return naive


def naive_config(argv: list[str]) -> tuple[Any, float]:
    """firstline's own serve flags (models, devices, threads, port) with
    every latency technique off; plus --stop-silence-ms."""
    from voice.server.cli import build_parser, config_from_args

    stop_ms = DEFAULT_STOP_SILENCE_S * 1000
    rest = []
    it = iter(argv)
    for arg in it:
        if arg == "--stop-silence-ms":
            stop_ms = float(next(it))
        elif arg.startswith("--stop-silence-ms="):
            stop_ms = float(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    off = ["--no-partials", "--no-preemptive", "--fixed-endpoint", "--no-incremental-prefill", "--asr-scheduler",
           "fifo", "--endpoint-silence-ms", str(round(stop_ms))]  # fmt: skip
    args = build_parser().parse_args(["serve", *rest, *off])
    return config_from_args(args), stop_ms / 1000


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    config, stop_s = naive_config(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        server = NaiveCascadeServer(config, stop_silence_s=stop_s)
        await server.start()
        log.warning("naive cascade ready on ws://%s:%d%s", config.host, server.port, TWILIO_PATH)
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
