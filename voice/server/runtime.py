"""What every call on one server shares: the ASR worker, the VAD model and
the LLM engine. Built and warmed once per process; readiness only when warm."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable

from asr.vad import SileroVAD
from asr.worker import ASRWorker
from llm import engines
from llm.base import EngineError, LLMEngine
from llm.config import LLMConfig
from streaming.fair_share import FirstSentences, LowPriority, ReplyGate
from streaming.threads import one_blas_thread
from streaming.tts import TTSError, shared_tts
from voice.call.store import MemoryStore, RedisStore, StoreError, build_store
from voice.server.config import ServerConfig
from voice.server.metrics import Metrics
from voice.server.tracing import TurnTracer

log = logging.getLogger(__name__)

# How often the LLM's availability is sampled, to date an outage (llm_down_s).
LLM_WATCH_INTERVAL_S = 0.25
# How often the in-memory call store drops what is past its TTL.
STORE_SWEEP_INTERVAL_S = 30.0


def build_engine(config: LLMConfig) -> LLMEngine:
    """In process, out of process under a supervisor, or remote: llm/engines.py."""
    return engines.build_engine(config)


# How long readiness waits for the phone voice to load (0.7 s here).
TTS_WARM_TIMEOUT_S = 30.0


class Runtime:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.vad = SileroVAD(config.asr.vad_model)
        # Who is served last (calls feeding audio faster than real time) and
        # the gate that keeps their turns out of the real-time calls' way.
        self.low_priority = LowPriority(config.limits.low_priority_multiple)
        self.reply_gate = ReplyGate(self.low_priority)
        # Replies whose first sentence is out step aside for the turns still
        # waiting for theirs (llm/yielding.py); None: they never do.
        self.first_sentences = (
            FirstSentences(lanes=config.first_sentence_lanes_in_use) if config.replies_step_aside else None
        )
        self.asr = ASRWorker(config.asr, self.low_priority)
        self.engine = build_engine(config.llm)
        # Set once the engine said it cannot score where a sentence ends
        # (asr/end_of_turn.py's LLM input): no call asks again.
        self.sentence_end_unsupported = False
        self.ready = False
        self._llm_down_since: float | None = None
        self._llm_seen_up = False
        self._llm_watch: asyncio.Task[None] | None = None
        self.startup_s: dict[str, float] = {}
        self.active_calls = 0
        self.metrics = Metrics()
        self.metrics.bind_gauges(lambda: self.active_calls, lambda: self.asr.queue_depth)
        self.asr.on_decode = self.metrics.observe_asr_decode
        self.asr.on_redecode = self.metrics.observe_asr_redecode
        self.asr.on_over_budget = self.metrics.partials_over_budget.inc
        self.asr.on_decoder_restart = self.metrics.asr_decoder_restarts.inc
        self.metrics.bind_engine(self.engine)
        self.low_priority.on_mark = self.metrics.low_priority.inc
        self.reply_gate.on_wait = self.metrics.reply_gate_waits.inc
        if self.first_sentences is not None:
            self.first_sentences.on_yield = self.metrics.reply_yields.inc
        # Each call's conversation between turns (re-attach: voice/call/store.py).
        self.store = build_store(config.state_url, config.state_ttl_s)
        # Stored key -> how to end the live call in this process that writes
        # it: a re-attach here ends the connection it replaces at once (one
        # on another replica learns at its next write, voice/call/store.py).
        self.writers: dict[str, Callable[[], None]] = {}
        # A span per answered turn (voice/server/tracing.py); None: tracing off.
        self.tracer: TurnTracer | None = None
        if config.tracing:
            self.tracer = TurnTracer.to_otlp(config.otel_endpoint)

    @property
    def llm_available(self) -> bool:
        """Whether a turn now has an LLM to go to (False while a supervised
        engine restarts without a secondary, or every remote replica is down)."""
        return bool(getattr(self.engine, "available", True))

    def llm_down_s(self) -> float:
        """Seconds since the LLM was last seen available (0: it is now).
        Sampled here and by a watcher four times a second (start), so an outage is
        dated from when it began, not from the first call that asked."""
        if self.llm_available:
            self._llm_down_since, self._llm_seen_up = None, True
            return 0.0
        now = time.monotonic()
        if self._llm_down_since is None:
            self._llm_down_since = now
        return now - self._llm_down_since

    def llm_refusal(self, grace_s: float | None) -> str | None:
        """Why new calls should go elsewhere for want of an LLM, or None.
        Admission and /readyz both ask this, so a load balancer and the
        door agree: one failed request (a 5xx from a router every voice
        replica shares) must not take the whole voice tier out of the
        balancer for an outage its calls would ride out. ``grace_s`` None
        (``--llm-down-grace-s`` negative): never."""
        down = self.llm_down_s()
        if grace_s is None:
            return None
        if not self._llm_seen_up:
            return "no LLM engine has answered yet"
        if down > grace_s:
            return f"no LLM engine has been able to answer for {down:.0f} s"
        return None

    async def _watch_llm(self) -> None:
        """Dates an LLM outage as it begins (llm_down_s), and drops the
        in-memory store's expired conversations on a server too quiet to
        write any (Redis expires its own keys)."""
        sweep_every = max(1, round(STORE_SWEEP_INTERVAL_S / LLM_WATCH_INTERVAL_S))
        for beat in itertools.count():
            self.llm_down_s()
            if isinstance(self.store, MemoryStore) and beat % sweep_every == 0:
                self.store.sweep()
            await asyncio.sleep(LLM_WATCH_INTERVAL_S)

    async def start(self) -> None:
        t0 = time.perf_counter()
        one_blas_thread()  # before any decode: numpy's thread pool spins beside each
        if isinstance(self.store, RedisStore):
            try:
                await self.store.check()
            except StoreError as exc:
                # Said loudly, but the replica still starts: during a store
                # outage calls only lose re-attach, and a replica that would
                # not start would turn that into lost capacity.
                log.error("%s; calls go on without re-attach until it answers", exc)
        await self.asr.start()
        t1 = time.perf_counter()
        try:
            await self.engine.start()
        except EngineError as exc:
            await_server = getattr(self.engine, "await_server", None)
            if await_server is None or exc.refused:
                # A local engine that cannot start, or a server that refuses
                # us (a wrong key or model: its /health would still say 200),
                # is a configuration error.
                raise
            # A remote LLM (a router restarting during a deploy) that is not
            # up yet: the replica starts unready (readiness and admission say
            # so) and comes up when the server answers, instead of exiting
            # and crash-looping with it.
            log.error("%s; starting without an LLM until it answers /health", exc)
            await_server()
        t2 = time.perf_counter()
        await self._warm_voice()
        t3 = time.perf_counter()
        self.startup_s = {"asr": round(t1 - t0, 3), "llm": round(t2 - t1, 3), "tts": round(t3 - t2, 3),
                          "total": round(t3 - t0, 3)}  # fmt: skip
        self.ready = True
        self._llm_watch = asyncio.create_task(self._watch_llm(), name="llm-availability")
        log.info("runtime warm: %s", self.startup_s)

    async def _warm_voice(self) -> None:
        """Load the voice phone calls speak with before the server says it is
        ready: the first call used to load it in its start (its caller
        waited seconds for 'ready', and calls starting meanwhile queued
        behind it on the one TTS thread). Without one the server still
        serves: those calls get transcripts and text, no audio."""
        try:
            await asyncio.wait_for(shared_tts(getattr(self.config, "tts", None)).warm(), TTS_WARM_TIMEOUT_S)
        except TimeoutError:
            # A voice hibari fetches over a slow link: readiness does not wait
            # for it; the load goes on, and the first calls' starts wait.
            log.warning("the phone voice is still loading after %.0f s; serving without waiting", TTS_WARM_TIMEOUT_S)
        except TTSError as exc:
            log.warning("phone calls will have no voice: %s", exc)

    async def close(self) -> None:
        self.ready = False
        if self._llm_watch is not None:
            self._llm_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._llm_watch
        await self.asr.close()
        await self.engine.close()
        await self.store.close()
        if self.tracer is not None:
            self.tracer.shutdown()
