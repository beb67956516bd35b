"""One caller's session: audio in, transcripts and reply sentences out.

Transport-agnostic: a transport turns its wire messages into calls on
:class:`CallSession` (``start``, ``audio``, ``commit``, ``stop``) and gets
events back through the ``emit`` callback as plain dicts, which it
serialises in its own format.

Flow per turn: audio -> G.711/PCM decode -> stateful resample to 16 kHz ->
VAD turn tracking -> (partials while speaking) -> final decode on the shared
ASR worker -> LLM stream -> sentence segmenter -> ``response.sentence``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from asr.turns import PartialDue, SpeechStarted, TurnEnded, TurnTracker
from llm.base import GenerationRequest
from streaming.codecs import StreamResampler, decode, int16_to_float
from streaming.sentences import SentenceSegmenter
from voice.protocol import ProtocolError, Start, check_audio_frame
from voice.runtime import Runtime

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]
ASR_RATE = 16000
_call_ids = itertools.count(1)


@dataclasses.dataclass
class TurnTimes:
    """Monotonic seconds; None until the stage happened."""

    speech_end: float | None = None
    endpoint: float | None = None
    asr_final: float | None = None
    llm_first_token: float | None = None
    first_sentence: float | None = None
    done: float | None = None

    def metrics(self) -> dict[str, float | None]:
        base = self.speech_end

        def rel(t: float | None) -> float | None:
            return None if t is None or base is None else round((t - base) * 1000, 1)

        return {
            "endpoint_ms": rel(self.endpoint),
            "asr_final_ms": rel(self.asr_final),
            "llm_first_token_ms": rel(self.llm_first_token),
            "first_sentence_ms": rel(self.first_sentence),
            "done_ms": rel(self.done),
            "ttfs_ms": rel(self.first_sentence),
            "asr_decode_ms": None
            if self.asr_final is None or self.endpoint is None
            else round((self.asr_final - self.endpoint) * 1000, 1),
            "llm_ttft_ms": None
            if self.llm_first_token is None or self.asr_final is None
            else round((self.llm_first_token - self.asr_final) * 1000, 1),
        }


class CallSession:
    def __init__(self, runtime: Runtime, emit: Emit, call_id: str | None = None) -> None:
        self.runtime = runtime
        self.emit = emit
        self.call_id = call_id or f"call-{next(_call_ids)}"
        self.started = False
        self.closed = False
        self._start: Start | None = None
        self._resampler: StreamResampler | None = None
        self._tracker: TurnTracker | None = None
        self._system_prompt = runtime.config.llm.system_prompt
        self.history: list[dict[str, str]] = []
        self._replies: dict[int, dict[str, str]] = {}  # turn -> its assistant message in history
        self._turn_index = 0
        self._reply: asyncio.Task[None] | None = None
        self._carry_over = ""  # user words of a turn the caller talked over
        self._tasks: set[asyncio.Task[None]] = set()
        # (stream position in s at the end of a fed frame, monotonic arrival)
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=4096)
        self._fed_s = 0.0

    # ---- transport-facing API ------------------------------------------

    async def start(self, start: Start) -> None:
        if self.started:
            raise ProtocolError("already_started", "the call has already started")
        self._start = start
        asr_cfg = self.runtime.config.asr
        overrides: dict[str, Any] = {}
        if start.endpoint_silence_s is not None:
            overrides["endpoint_silence_s"] = start.endpoint_silence_s
        if start.partials is not None:
            overrides["partials"] = start.partials
        if overrides:
            asr_cfg = dataclasses.replace(asr_cfg, **overrides)
        self._resampler = StreamResampler(start.sample_rate, ASR_RATE)
        self._tracker = TurnTracker(asr_cfg, self.runtime.vad.stream())
        if start.system_prompt:
            self._system_prompt = start.system_prompt
        self.started = True
        await self.emit(
            {
                "type": "ready",
                "call_id": self.call_id,
                "protocol_version": 1,
                "audio": {"encoding": start.encoding, "sample_rate": start.sample_rate},
                "endpoint_silence_ms": round(asr_cfg.endpoint_silence_s * 1000),
                "engine": self.runtime.engine.describe(),
            }
        )

    async def audio(self, payload: bytes) -> None:
        if not self.started or self._start is None:
            raise ProtocolError("not_started", "audio before 'start'; send start first")
        check_audio_frame(payload, self._start.encoding)
        assert self._resampler is not None and self._tracker is not None
        pcm = decode(payload, self._start.encoding)  # type: ignore[arg-type]
        samples = self._resampler.process(int16_to_float(pcm))
        now = time.monotonic()
        self._fed_s += len(samples) / ASR_RATE
        self._arrivals.append((self._fed_s, now))
        for ev in self._tracker.feed(samples):
            await self._on_event(ev, now)

    async def commit(self) -> None:
        if not self.started or self._tracker is None:
            raise ProtocolError("not_started", "'input.commit' before 'start'")
        ended = self._tracker.commit()
        if ended is not None:
            await self._on_event(ended, time.monotonic())

    async def stop(self, reason: str = "client_stop") -> None:
        """Caller hung up (or the transport closed): release everything."""
        if self.closed:
            return
        self.closed = True
        self.runtime.asr.forget(self.call_id)
        tasks = [*self._tasks, *([self._reply] if self._reply else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        log.info("call %s ended (%s)", self.call_id, reason)

    # ---- turn handling -------------------------------------------------

    async def _on_event(self, ev: object, now: float) -> None:
        if isinstance(ev, SpeechStarted):
            await self.emit({"type": "speech.started", "audio_ms": round(ev.audio_s * 1000)})
            if self._reply is not None and not self._reply.done():
                self._reply.cancel()  # barge-in: the reply task reports it
        elif isinstance(ev, PartialDue):
            self._spawn(self._partial(ev.audio, self._turn_index))
        elif isinstance(ev, TurnEnded):
            self.runtime.asr.forget(self.call_id)  # a pending partial is moot now
            if self._reply is not None and not self._reply.done():
                self._reply.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._reply
            times = TurnTimes(speech_end=self._arrival_of(ev.speech_end_audio_s), endpoint=now)
            self._turn_index += 1
            self._reply = asyncio.create_task(self._turn(self._turn_index, ev.audio, times))

    def _arrival_of(self, position_s: float) -> float:
        """When the frame holding this stream position arrived."""
        for end_s, arrived in self._arrivals:
            if end_s >= position_s:
                return arrived
        return time.monotonic()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _partial(self, audio: np.ndarray, turn: int) -> None:
        try:
            result = await self.runtime.asr.submit(self.call_id, audio, final=False)
        except asyncio.CancelledError:
            return  # superseded by a newer partial or the final
        except Exception:
            return  # a failed partial is not worth a client error; the final decides
        if turn == self._turn_index and result.text and not self.closed:
            await self.emit({"type": "transcript.partial", "turn": turn + 1, "text": result.text})

    async def _turn(self, turn: int, audio: np.ndarray, times: TurnTimes) -> None:
        pending = self.runtime.asr.submit(self.call_id, audio, final=True)
        try:
            # Shielded: if the caller resumes talking mid-decode, the words
            # decoded so far still join their next turn (see _carry).
            decoded = await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(self._carry)
            raise
        except Exception as exc:
            await self.emit({"type": "error", "code": "asr_failed", "message": f"turn {turn}: {exc}"})
            return
        times.asr_final = time.monotonic()
        text = " ".join(filter(None, [self._carry_over, decoded.text])).strip()
        self._carry_over = ""
        if not text:
            return  # VAD heard something Whisper found no words in: no turn
        await self.emit({"type": "transcript.final", "turn": turn, "text": text})
        await self.emit({"type": "turn.ended", "turn": turn})
        await self._reply_to(turn, text, times)

    def _carry(self, pending: asyncio.Future[Any]) -> None:
        if not pending.cancelled() and pending.exception() is None and pending.result().text:
            self._carry_over = " ".join(filter(None, [self._carry_over, pending.result().text]))

    async def _reply_to(self, turn: int, user_text: str, times: TurnTimes) -> None:
        cfg = self.runtime.config
        request = GenerationRequest(
            request_id=f"{self.call_id}-t{turn}",
            messages=self._messages(user_text),
            max_tokens=(self._start.max_tokens if self._start else None) or cfg.llm.max_tokens,
            temperature=cfg.llm.temperature,
        )
        segmenter = SentenceSegmenter(max_words=cfg.sentence_max_words)
        sent: list[str] = []
        cancelled = False
        failed: str | None = None
        try:
            async for delta in self.runtime.engine.stream(request):
                if times.llm_first_token is None:
                    times.llm_first_token = time.monotonic()
                await self.emit({"type": "response.delta", "turn": turn, "text": delta})
                for sentence in segmenter.push(delta):
                    await self._send_sentence(turn, sentence, sent, times)
            for sentence in segmenter.flush():
                await self._send_sentence(turn, sentence, sent, times)
        except asyncio.CancelledError:
            cancelled = True
        except Exception as exc:
            log.exception("LLM failed on call %s turn %d", self.call_id, turn)
            failed = str(exc)
        times.done = time.monotonic()
        spoken = " ".join(sent)
        if cancelled and times.llm_first_token is None:
            # The caller kept talking before any of the reply went out: this
            # was a pause, not a turn. Their words join the next turn.
            self._carry_over = user_text
        else:
            # History keeps only what the caller was sent, so the model never
            # believes it said words that were cut off.
            self._remember(turn, user_text, spoken)
        if self.closed:
            return
        with contextlib.suppress(Exception):
            if failed is not None:
                await self.emit({"type": "error", "code": "llm_failed", "message": f"turn {turn}: {failed}"})
            await self.emit(
                {
                    "type": "response.done",
                    "turn": turn,
                    "text": spoken,
                    "cancelled": cancelled,
                    "usage": request.usage.as_dict(),
                }
            )
            await self.emit(
                {
                    "type": "turn.metrics",
                    "turn": turn,
                    **times.metrics(),
                    "speculative_acceptance": request.usage.acceptance_rate,
                    "draft_tokens": request.usage.draft_tokens,
                    "accepted_tokens": request.usage.accepted_tokens,
                    "completion_tokens": request.usage.completion_tokens,
                }
            )
        if cancelled:
            raise asyncio.CancelledError

    async def _send_sentence(self, turn: int, text: str, sent: list[str], times: TurnTimes) -> None:
        first = not sent
        if first:
            times.first_sentence = time.monotonic()
        sent.append(text)
        await self.emit(
            {"type": "response.sentence", "turn": turn, "index": len(sent) - 1, "text": text, "first": first}
        )

    def reply_heard(self, turn: int, heard: str) -> None:
        """Audio transports call this when playout tracking (marks, checkpoints)
        shows the caller heard only ``heard`` of ``turn``'s reply before
        cutting in: history then holds only what was actually heard."""
        message = self._replies.get(turn)
        if message is None:
            return
        if heard.strip():
            message["content"] = heard.strip()
        else:
            with contextlib.suppress(ValueError):
                self.history.remove(message)
            del self._replies[turn]

    def _messages(self, user_text: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self._system_prompt},
            *self.history,
            {"role": "user", "content": user_text},
        ]

    def _remember(self, turn: int, user_text: str, reply: str) -> None:
        self.history.append({"role": "user", "content": user_text})
        if reply:
            message = {"role": "assistant", "content": reply}
            self.history.append(message)
            self._replies[turn] = message
        keep = 2 * self.runtime.config.llm.history_turns
        if len(self.history) > keep:
            del self.history[:-keep]
