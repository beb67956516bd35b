"""One caller's session: audio in, transcripts and reply sentences out.

Transport-agnostic: a transport turns its wire messages into calls on
:class:`CallSession` (``start``, ``audio``, ``commit``, ``stop``) and gets
events back through the ``emit`` callback as plain dicts, which it
serialises in its own format.

Flow: audio -> G.711/PCM decode -> stateful resample to 16 kHz -> VAD turn
tracking (asr.turns) -> partial decodes while the caller speaks -> at a
pause, a preemptive :class:`voice.call.turn.Turn` (final decode + LLM, held
behind a gate; the decoded words also set the endpoint window) -> at the
endpoint, commit: transcript, then reply sentences on the wire.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from asr.config import ASRConfig
from asr.end_of_turn import (
    SMART_TURN_POLICIES,
    asks_llm,
    decide_window,
    shared_smart_turn,
    wants_marks,
    whisper_marks,
)
from asr.endpointing import endpoint_window
from asr.turns import PartialDue, Paused, Resumed, SpeechStarted, TurnEnded, TurnTracker
from asr.vad import CHUNK
from asr.whisper import Decoded
from llm.base import EngineError, GenerationRequest, PromptTooLong, SentenceEndUnsupported, Usage
from llm.config import example_messages
from llm.sampling import SamplingError, SamplingParams
from streaming.codecs import StreamResampler, decode, int16_to_float
from streaming.fair_share import IntakeRate
from voice.call.audio_budget import AudioBudget, AudioBudgets, frame_seconds
from voice.call.finals import OneFinalPerCall
from voice.call.history import ContextTooLarge, History, prompt_tokens
from voice.call.speculation import SpeculationBudget
from voice.call.start import MAX_REPLY_TOKENS, ProtocolError, Start, check_audio_frame
from voice.call.store import CallState, StateWriter, StoreError
from voice.call.turn import Emit, SpokenFirst, Turn, TurnContext, TurnOutcome, TurnTimes, newest_words
from voice.server.runtime import Runtime

log = logging.getLogger(__name__)

ASR_RATE = 16000
# The most audio fed to VAD (and the turn tracker) without letting other
# calls run: 0.5 s, a few ms of Silero on one core.
FEED_STEP_SAMPLES = ASR_RATE // 2
# Tokens the chat template adds around the whole prompt (generation prompt, BOS).
PROMPT_MARGIN_TOKENS = 16
# token_scale's bounds: what a prompt really cost against its estimate, with
# a margin; a higher ratio than the cap is an engine reporting nonsense.
TOKEN_SCALE_MARGIN = 1.05
MAX_TOKEN_SCALE = 4.0
# Where a call starts, before its engine has reported any prompt: Latin
# languages other than English run up to ~1.08x history.py's estimate on
# SmolLM2 (English ~0.65x), and a client may build a long context before the
# first reply (Realtime conversation items).
INITIAL_TOKEN_SCALE = 1.1
PROMPT_TOO_LONG_STEP = 1.25
# Keypad presses carried into the next turn's text ("[caller pressed 5]"):
# a 16-digit card number and its "#" twice over; more are dropped.
KEYPRESS_PREFIX = "[caller pressed "
MAX_CARRIED_KEYPRESSES = 32
# The instructions of a reply that goes on after a noise cut the last one
# (go_on_after_noise): the history holds what the caller heard of it.
GO_ON_AFTER_NOISE = (
    "A noise on the line cut off your last reply; the caller did not speak. "
    "Finish what you were saying, briefly, without repeating what you already said."
)
# How often keypresses waiting for a reply in flight look again.
KEYPAD_RECHECK_S = 0.25
# Ends that say the call is over (the client's stop, the carrier's stop or
# hang-up), not that its connection was lost: its stored conversation goes.
HUNG_UP = ("client_stop", "carrier_stop")
# A Realtime session closed by its client: how a Realtime call ends (it has
# no stop message). Its conversation is kept for a resume token, but the
# engine's session (vllm-router's table) is finished: kept, every Realtime
# call's stayed in the router's table for its TTL.
SESSION_CLOSED = "session_closed"
# A resume claim the store did not answer is asked this many times in all,
# this far apart (each is bounded by the store's own load timeout).
CLAIM_ATTEMPTS = 2
CLAIM_RETRY_S = 0.1
# The longest a stream lost mid-decode waits for its caller's last words
# (a final decode under load; the handler's release has 5 s in all).
LAST_WORDS_WAIT_S = 3.0
# A line is silent once this many of its own messages' worth of time has
# passed with none (and at least silent_line_s): a client streaming 1 s
# messages in real time is quiet for most of each second between them.
SILENT_LINE_MESSAGES = 1.5


def new_call_id() -> str:
    """Random, not a per-process counter: it keys the call's session at a
    vllm-router shared by every voice replica (X-Session-ID, finish_session),
    where two replicas' "call-1" would pin to one engine and the first to
    hang up would end the other's session."""
    return f"call-{secrets.token_hex(8)}"


__all__ = ["ASR_RATE", "CallSession", "Emit"]


# What a caller may learn of the engine in ``ready``: what it is, not where
# it runs (URLs, pids, file paths stay in logs and /metrics).
PUBLIC_ENGINE_KEYS = ("engine", "isolation", "device", "speculation", "parallel")


def public_engine_info(described: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in described.items() if k in PUBLIC_ENGINE_KEYS}


# What _configure sets from a start: put back as it was if the start is
# refused. (max_tokens lives in sampling; the history's instructions are
# set last, after every check that can refuse.)
_START_SETTINGS = ("_start", "asr_config", "reply_policy", "first_clause_words", "sampling", "_resampler", "_tracker")


def llm_session_key(resume_key: str) -> str:
    """The LLM session key of a call kept under ``resume_key``: hashed, since
    a client's resume token is a credential and routers log session ids."""
    return "call-" + hashlib.sha256(resume_key.encode()).hexdigest()[:32]


def _line_time(line_at: float, offset: int) -> float:
    """When the line's audio at sample ``offset`` after ``line_at`` was
    said, never later than now (a silent-line fill's clock)."""
    return min(time.monotonic(), line_at + offset / ASR_RATE)


class CallSession:
    def __init__(self, runtime: Runtime, emit: Emit, call_id: str | None = None) -> None:
        self.runtime = runtime
        self.emit = emit
        self.call_id = call_id or new_call_id()
        self.started = False
        self.closed = False
        self.asr_config: ASRConfig = runtime.config.asr
        self.reply_policy = runtime.config.reply
        self.first_clause_words = runtime.config.first_clause_words
        self.sampling: SamplingParams = runtime.config.llm.sampling
        self._start: Start | None = None
        self._resampler: StreamResampler | None = None
        self._tracker: TurnTracker | None = None
        llm = runtime.config.llm
        self.history = History(llm.system_prompt, llm.history_turns, example_messages(llm.example_turns))
        self.carry_over = ""  # words of a turn the caller talked over before any reply went out
        # The engine's real prompt tokens per estimated one (history.py's
        # estimate), as its requests report them; from INITIAL_TOKEN_SCALE,
        # only up. The budget shrinks by it, so a call in a language or with
        # spelled letters the estimate undercounts still fits the context
        # (a Spanish call on SmolLM2 ran over and its tenth turn was refused).
        self.token_scale = INITIAL_TOKEN_SCALE
        self._turn_index = 0
        self._active: Turn | None = None  # committed turn whose reply may still be streaming
        self._pending: Turn | None = None  # preemptive turn held behind its gate
        # Answers keypresses nobody spoke after (ServerConfig.keypad_answer_s).
        self._keypad_timer: asyncio.TimerHandle | None = None
        # When the caller last pressed a key, and the settle armed after it:
        # a keys-only turn is timed from the key (the settle it waited is
        # part of its TTFS, as a pause is), at most the settle back (keys
        # left waiting behind a reply were not waited on for all of it).
        self._last_key_at: float | None = None
        self._keypad_settle_s = 0.0
        self._wasted = 0  # preemptive turns aborted since the last commit
        self._last_partial = ""
        # End-of-turn inputs of the current pause (asr/end_of_turn.py): the
        # word rules' window and Smart Turn's P(done), whichever is in first.
        self._pause_id = 0  # bumped on every Paused / Resumed / TurnEnded: a late answer is dropped
        self._eot_rule: float | None = None
        self._eot_prob: float | None = None
        self._eot_llm: float | None = None  # the LLM's P(the sentence ends here)
        # Whisper's sentence-end share from the pause's own decode (never a
        # partial's: a partial ends mid-speech, not at a pause).
        self._eot_whisper: float | None = None
        self._smart_turn_busy = False
        self._sentence_end_busy = False
        self._prefilling = False
        self._gone_on: int | None = None  # the last turn that went on after a noise
        # The server answers without being asked (carried words after a
        # re-attach, a reply a noise cut): False where the client asks for
        # every reply (Realtime's response.create), set by its transport.
        self.answers_unasked = True
        self._tasks: set[asyncio.Task[None]] = set()
        # (stream position in s at the end of a fed frame, monotonic arrival)
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=4096)
        # Audio before the last clear_input: positions the client sees count the
        # whole session's audio (Realtime audio_start_ms / audio_end_ms), the
        # tracker only what came since.
        self._cleared_s = 0.0
        self._fed_s = 0.0
        self._last_audio_at = 0.0  # monotonic arrival of the last frame
        # The line's own time: the last real frame's arrival, or where a
        # silent-line fill since has taken it (_fill_silent_line).
        self._line_at = 0.0
        self._message_s = 0.0  # audio seconds in the client's last message
        self._turn_ending = False  # _on_turn_end waits for the old turn: see reply_in_flight
        # Audio frames and the silent-line filler feed the tracker in turn.
        self._feed_lock = asyncio.Lock()
        # A call may not feed audio much faster than real time (the ASR worker
        # is shared): voice/call/audio_budget.py; multiple 0 turns it off.
        limits = runtime.config.limits
        multiple = limits.audio_rate_multiple
        budgets = [AudioBudget(multiple, limits.audio_rate_window_s)] if multiple > 0 else []
        if budgets and limits.audio_rate_sustained_multiple > 0:
            budgets.append(AudioBudget(limits.audio_rate_sustained_multiple, limits.audio_rate_sustained_window_s))
        self._budget = AudioBudgets(budgets) if budgets else None
        # Faster than real time, within the budget: served after the real-time
        # calls (streaming/fair_share.py).
        self._intake = IntakeRate()
        # The shared ASR worker as this call's turns see it: one final queued at a time.
        self._finals = OneFinalPerCall(runtime.asr)
        # Preemptive turns and prefills a call may waste: voice/call/speculation.py.
        self._speculation = SpeculationBudget()
        # The conversation kept between turns for a re-attach (voice/call/store.py).
        self._state: StateWriter | None = None
        self._claimed: CallState | None = None  # claimed by reattach, picked up at start
        # When reattach's claim went unanswered (Unix seconds): the first write claims.
        self._claim_unanswered: float | None = None
        self._owned_key: str | None = None  # the stored key this call writes (runtime.writers)
        self.resumed = False
        # The key an LLM pool keeps the call on one replica by (vllm-router's
        # X-Session-ID): the call's own id, or, for a call that may come
        # back, one its re-attach shares (its prefix cache stays warm there).
        self.llm_session_key = self.call_id
        # Ends this call its transport's way when another connection has
        # re-attached it (set by the transport: voice/server/limits.py SUPERSEDED).
        self.on_superseded: Callable[[], None] | None = None
        self.replaced = False  # another connection took the call over (_superseded)
        # What the caller has heard so far of replies still going out (set by
        # the transport: its carrier's marks, else the playout clock). The
        # state a re-attach reads holds only that: a socket lost mid-reply is
        # often noticed after the new one has read the state, too late for
        # the cut at stop() to reach it.
        self.heard_now: Callable[[], dict[int, str]] | None = None
        self._snapshot_cut = False  # the last state written held a reply cut to what was heard

    # ---- transport-facing API ------------------------------------------

    def _configure(self, start: Start) -> None:
        """The call's settings from its start; raises ProtocolError for a
        value it cannot take."""
        self._start = start
        overrides: dict[str, Any] = {}
        if start.endpoint_silence_s is not None:
            # A client that sets the window asks for a fixed one.
            overrides["endpoint_silence_s"] = start.endpoint_silence_s
            overrides["adaptive_endpoint"] = False
        if start.partials is not None:
            overrides["partials"] = start.partials
        if start.resume_grace_s is not None:
            overrides["resume_grace_s"] = start.resume_grace_s
        if not start.auto_turns:
            # Nothing ends the turn but the client, so there is no pause to
            # start preemptive work at.
            overrides["auto_turns"] = False
            overrides["preemptive"] = False
        if overrides:
            self.asr_config = dataclasses.replace(self.asr_config, **overrides)
        if start.reply_max_sentences is not None:
            self.reply_policy = dataclasses.replace(self.reply_policy, max_sentences=start.reply_max_sentences)
        if start.first_clause_words is not None:
            self.first_clause_words = start.first_clause_words
        if start.max_tokens:
            self.max_tokens = start.max_tokens
        if start.sampling:
            self.set_sampling(start.sampling)
        self._resampler = StreamResampler(start.sample_rate, ASR_RATE)
        self._tracker = TurnTracker(self.asr_config, self.runtime.vad.stream())
        if start.system_prompt:
            try:
                self.check_instructions(self.history.prompt_with(start.system_prompt))
            except ContextTooLarge as exc:
                raise ProtocolError(exc.code, str(exc)) from None
            self.history.system_prompt = start.system_prompt

    async def start(self, start: Start) -> None:
        if self.started:
            raise ProtocolError("already_started", "the call has already started")
        # A start refused part-way (bad sampling, instructions too long) must
        # leave nothing of itself behind for the client's next start (a fixed
        # endpoint, a reply cap it did not ask for again).
        saved = {name: getattr(self, name) for name in _START_SETTINGS}
        try:
            self._configure(start)
        except BaseException:
            for name, value in saved.items():
                setattr(self, name, value)
            raise
        if start.resume_key:
            await self._resume(start)
        self.started = True
        self._last_audio_at = time.monotonic()
        if KEYPRESS_PREFIX in self.carry_over:
            self._arm_keypad_answer()  # keys a re-attached call brought back, still unanswered
        elif self.carry_over and self.asr_config.auto_turns and self.answers_unasked:
            # Words the caller said before the line dropped (the turn being
            # decoded or answered): answered now, as keys are, unless the
            # caller has gone on; they used to wait, in silence, for the next
            # thing the caller said. (Push-to-talk: the client says when.)
            self._arm_keypad_answer(carried=self.carry_over)
        if self.asr_config.auto_turns and self.asr_config.silent_line_s > 0:
            self._spawn(self._fill_silent_line())
        # A call that re-attached mid-conversation is not picked up again:
        # no "Hello, how can I help?" in the middle of it.
        greeting = None if self.resumed else self._greeting(start)
        await self.emit(
            {
                "type": "ready",
                "call_id": self.call_id,
                "protocol_version": 1,
                "audio": {"encoding": start.encoding, "sample_rate": start.sample_rate},
                "endpoint_silence_ms": round(self.asr_config.endpoint_silence_s * 1000),
                "adaptive_endpoint": self.asr_config.adaptive_endpoint,
                "engine": public_engine_info(self.runtime.engine.describe()),
                "resumed": self.resumed,
                **({"resume_token": start.resume_token} if start.resume_token else {}),
            }
        )
        if greeting is not None:
            self.speak_first(greeting)  # after "ready": its events follow it on the wire

    async def reattach(self, start: Start) -> None:
        """Claim what is stored under the call's key for this connection (it
        alone writes the key from now on; voice/call/store.py), to pick up
        at start. A client's resume token nothing is stored under (expired,
        hung up, or never one of ours) is not taken over: the call gets a
        fresh token, said in ``ready`` (Realtime: ``session.created``). A
        store that is down costs the call its past, never the call."""
        assert start.resume_key
        token = start.resume_token
        asked_at = time.time()
        unanswered = False
        for attempt in range(CLAIM_ATTEMPTS):
            try:
                # Asked again when unanswered: a slow store may have applied
                # the first, and a claim by the same owner is the same claim.
                claim = self.runtime.store.claim(start.resume_key, self.call_id, when_empty=token is None)
                self._claimed = await claim
                unanswered = False
                break
            except StoreError as exc:
                log.warning("call %s: stored conversation not read (%s)", self.call_id, exc)
                self._claimed, unanswered = None, True
                if attempt + 1 < CLAIM_ATTEMPTS:
                    await asyncio.sleep(CLAIM_RETRY_S)
        if unanswered:
            # Not refused, unanswered: the claim may have landed, leaving the
            # key this connection's. The call goes on under its key (a
            # client keeps its token) and claims it at its first write the
            # store answers (StateWriter.claim_first), unless a newer
            # connection has since: nothing is left owned by a connection
            # that never writes it.
            self._claim_unanswered = asked_at
        start.may_resume = False  # claimed: start does not ask again
        if self._claimed is not None and self._claimed.ended:
            ended, self._claimed = self._claimed.ended, None
            log.info("call %s: the server ended this call before (%s); not picked up", self.call_id, ended)
            if token is None:  # a carrier's call: the same call, carried on
                raise ProtocolError("call_ended", f"the server ended this call ({ended}); it is not picked up again")
        if self._claimed is None and token is not None and not unanswered:
            start.fresh_token()  # a client's token nothing is stored under: a new conversation, said so
            return
        self._own(start.resume_key)

    def _own(self, key: str, claimed: bool = True) -> None:
        """This call writes ``key`` now. Having claimed it (a re-attach), a
        live call in this process that wrote it before (the connection this
        one replaces) ends at once; a call that did not claim it (a fresh
        one) never ends another: the store refuses its writes instead."""
        replaced = self.runtime.writers.get(key)
        if replaced is not None and not claimed:
            return
        self.runtime.writers[key] = self._superseded
        self._owned_key = key
        if replaced is not None and replaced != self._superseded:
            replaced()

    async def _resume(self, start: Start) -> None:
        """Pick up the conversation claimed for this call, if any; from now
        on, write it under the call's key after every turn."""
        assert start.resume_key
        if start.may_resume:
            await self.reattach(start)
        self._state = StateWriter(self.runtime.store, start.resume_key, self.call_id, on_superseded=self._superseded)
        self.llm_session_key = llm_session_key(start.resume_key)
        if self._claim_unanswered is not None:
            self._state.claim_first(since=self._claim_unanswered)
        if self._owned_key != start.resume_key:
            self._own(start.resume_key, claimed=False)
            if start.resume_token is None:
                self._state.own_now()  # a carrier's call id: see StateWriter.own_now
        state, self._claimed = self._claimed, None
        if state is None:
            return
        # An older version's state holds instructions and items joined.
        stored = state.system_prompt if state.instructions is None else state.instructions
        if not start.system_prompt:  # instructions sent again on re-attach win
            self.history.system_prompt = stored
        # The stored system items, then any the client added before the call
        # started that are not among them (a client that sends its setup
        # again on reconnect must not double it on every reconnect).
        added = [
            item for item in self.history.system_items if item not in state.system_items and f"\n\n{item}" not in stored
        ]
        self.history.system_items = [*state.system_items, *added]
        # Context a client added before the call started (Realtime text
        # items) comes after the stored conversation, not instead of it.
        self.history.restore([*state.messages, *self.history.messages_so_far])
        self.carry_over = state.carry_over
        self._turn_index = state.turn
        self.resumed = True
        self.runtime.metrics.resumed.inc()
        log.info("call %s re-attached at turn %d", self.call_id, state.turn)

    def _superseded(self) -> None:
        """The call re-attached on another connection, which now owns its
        conversation: this one (a socket the client gave up on) ends."""
        self.replaced = True
        log.info("call %s re-attached elsewhere: ending this connection", self.call_id)
        if self.on_superseded is not None:
            self.on_superseded()

    def playout_advanced(self) -> None:
        """A mark confirmed more of a reply: the stored state catches up."""
        self._save_state()

    def _words_owned(self, turn: Turn) -> None:
        if turn is self._active:
            self._save_state()

    def _save_state(self) -> None:
        if self._state is not None:
            history = self.history
            heard = self.heard_now() if self.heard_now is not None else {}
            self._snapshot_cut = bool(heard)
            # The turn being answered is not in the history until it ends: a
            # snapshot taken meanwhile keeps its words to lead the next turn
            # (a replica lost mid-reply; the turn's end writes them over).
            turn = self._active
            in_flight = ""
            if turn is not None and turn.committed and not turn.outcome_given and turn.spoken_first is None:
                in_flight = turn.user_text
            state = CallState(
                history.system_prompt,
                history.as_heard(heard),
                " ".join(filter(None, [in_flight, self.carry_over])),
                self._turn_index,
                history.instructions,
                list(history.system_items),
            )
            self._state.write(state)

    def _greeting(self, start: Start) -> SpokenFirst | None:
        """The call's greeting on pickup: its own (start), else the server's."""
        config = self.runtime.config
        if start.greeting or start.greeting_instructions:
            return SpokenFirst(start.greeting, start.greeting_instructions)
        if start.server_greeting and (config.greeting or config.greeting_instructions):
            return SpokenFirst(config.greeting, config.greeting_instructions)
        return None

    async def audio(self, payload: bytes, message_s: float | None = None) -> None:
        """One frame of the caller's audio. ``message_s``: the audio seconds
        of the client message it is part of, where a transport cuts one
        message into frames (a Realtime append of seconds)."""
        if not self.started or self._start is None:
            raise ProtocolError("not_started", "audio before 'start'; send start first")
        check_audio_frame(payload, self._start.encoding)
        assert self._resampler is not None and self._tracker is not None
        frame_s = frame_seconds(len(payload), self._start.encoding, self._start.sample_rate)
        self.runtime.low_priority.update(self.call_id, self._intake.add(frame_s))
        if self._budget is not None and not self._budget.spend(frame_s):
            return  # over budget, already reported: dropped
        pcm = decode(payload, self._start.encoding)  # type: ignore[arg-type]
        samples = self._resampler.process(int16_to_float(pcm))
        self._last_audio_at = time.monotonic()
        self._message_s = frame_s if message_s is None else max(frame_s, message_s)
        await self._feed(samples)

    async def _feed(self, samples: np.ndarray) -> None:
        arrived = self._line_at = time.monotonic()
        async with self._feed_lock:
            # Every step is timed from when the audio came, not from when it
            # ran: under load that made a speech end late and its TTFS short.
            await self._feed_steps(samples, lambda _offset: arrived)

    async def _feed_steps(self, samples: np.ndarray, timed: Callable[[int], float], fine: int = 0) -> None:
        """``_feed_locked`` a step at a time (under the feed lock), other
        calls running between steps: one carrier message may hold 8 s of
        audio (64 KiB of mu-law), and its VAD work held the shared loop at
        once. ``timed``: when the audio at a sample offset came; its first
        ``fine`` samples go a VAD chunk at a time, each with its own time."""
        fine = min(fine, len(samples))
        starts = [*range(0, fine, CHUNK), *range(fine, max(len(samples), 1), FEED_STEP_SAMPLES)]
        for start, end in zip(starts, [*starts[1:], len(samples)], strict=True):
            if start > fine:
                await asyncio.sleep(0)
                if self.closed:
                    return
            await self._feed_locked(samples[start:end], timed(start))

    async def _feed_locked(self, samples: np.ndarray, now: float | None = None) -> bool:
        """Feed the tracker and act on its events (``now``: when the audio
        came); True when a turn ended."""
        assert self._tracker is not None
        now = time.monotonic() if now is None else now
        self._fed_s += len(samples) / ASR_RATE
        self._arrivals.append((self._fed_s, now))
        ended = False
        try:
            for ev in self._tracker.feed(samples):
                ended = ended or isinstance(ev, TurnEnded)
                await self._on_event(ev, now)
            return ended
        finally:
            # A feed that waited on its events' sends (a full socket) kept
            # the read loop from the caller's next frames: the line was not
            # silent, the server was.
            self._last_audio_at = max(self._last_audio_at, time.monotonic())

    async def _fill_silent_line(self) -> None:
        """A line that stops sending mid-turn is a silent caller, not a paused
        clock: SIP endpoints with silence suppression (VAD/DTX) send no RTP
        while the caller is quiet, and a client may stop streaming after its
        last word. Endpointing counts silence in audio time, so without this
        such a turn would never end. After ``silent_line_s`` without a frame
        the missing time is fed as silence; a line that keeps sending never
        gets any. A client whose messages are long (a Realtime append of a
        second, sent in real time) has that long between them: it gets the
        silence only after SILENT_LINE_MESSAGES of them (filled at 0.5 s,
        its second-long messages came with half a second of silence
        inserted after each, a pause in the middle of its caller's words)."""
        base_s = self.asr_config.silent_line_s
        while not self.closed:
            await asyncio.sleep(base_s / 2)
            gap_s = max(base_s, SILENT_LINE_MESSAGES * self._message_s)
            if time.monotonic() - self._last_audio_at < gap_s:
                continue
            # Measured again under the lock: a feed that held it (its events
            # waiting on a full socket) was the server stalling, not the
            # line, and the caller's frames queued behind it come first.
            async with self._feed_lock:
                tracker = self._tracker
                idle_s = time.monotonic() - self._last_audio_at
                if tracker is None or not tracker.in_speech or idle_s < gap_s or self.closed:
                    continue
                self._last_audio_at = time.monotonic()
                self._message_s = 0.0  # from here the line's own silence: filled every silent_line_s
                tail = self._held_back()  # the caller's last word first
                # All of it: a message carries audio captured before it was
                # sent, so none of the time since covers the quiet line.
                silence = max(0, round(idle_s * ASR_RATE) - len(tail))
                fill = np.concatenate([tail, np.zeros(silence, dtype=np.float32)])
                # Timed as the line's own time: the tail at the last real
                # frame, each filled chunk as much later as the silence before
                # it (never past now), chunk by chunk for the first second,
                # where the caller's last word ends. Timed at the fill, a
                # speech end in the caller's last VAD chunks read 0.5-0.75 s
                # late, and the turn's TTFS that much shorter than they waited.
                line_at = self._line_at
                await self._feed_steps(fill, functools.partial(_line_time, line_at), fine=ASR_RATE)
                self._line_at = line_at + len(fill) / ASR_RATE

    def _held_back(self) -> np.ndarray:
        """What the input resampler still holds of the caller's audio."""
        return self._resampler.drain() if self._resampler is not None else np.zeros(0, np.float32)

    async def commit(self) -> bool:
        """The client ends the turn now. False when it held no speech."""
        if not self.started or self._tracker is None:
            raise ProtocolError("not_started", "'input.commit' before 'start'")
        # Under the feed lock: a silence fill's feed mid-way (its events
        # waiting on a send) must not end the turn after it was committed.
        async with self._feed_lock:
            if self._tracker is None:
                return False
            # The tail of the last word is the turn's too (a push-to-talk
            # client commits right after it).
            tail = self._held_back()
            if len(tail) and await self._feed_locked(tail):
                return True  # the tail closed the turn's silence window: ended, not empty
            ended = self._tracker.commit()
            if ended is not None:
                await self._on_event(ended, time.monotonic())
            return ended is not None

    async def clear_input(self) -> None:
        """Forget the audio of the turn in progress (Realtime
        ``input_audio_buffer.clear``): a fresh tracker, no pending work.
        Under the feed lock, so a feed mid-way cannot go on with the old
        tracker's events after it."""
        async with self._feed_lock:
            self._clear_input_locked()

    def _clear_input_locked(self) -> None:
        if self._tracker is None or self._start is None:
            return
        # What the resampler holds back is the cleared audio's.
        self._resampler = StreamResampler(self._start.sample_rate, ASR_RATE)
        self._abort_pending()
        self.runtime.asr.forget(self.call_id)
        self._tracker = TurnTracker(self.asr_config, self.runtime.vad.stream())
        self._last_partial = ""
        # The new tracker counts stream positions from 0 again: so does the
        # arrival map, or speech ends would map to old frames (TTFS too long).
        self._cleared_s += self._fed_s
        self._fed_s = 0.0
        self._arrivals.clear()
        self._pause_id += 1
        self._eot_rule = self._eot_prob = self._eot_llm = self._eot_whisper = None

    def cancel_reply(self) -> bool:
        """Stop the reply being generated (Realtime ``response.cancel``).
        The turn reports ``response.done`` with ``cancelled``. False when no
        reply was in flight."""
        if self._active is None or self._active.task.done():
            return False
        cancelled = self._active.cancel()
        self._active.client_cancelled = cancelled
        return cancelled

    def set_turn_detection(self, endpoint_silence_s: float | None, barge_in: bool) -> None:
        """A client's new end-of-turn settings mid-call (a Realtime
        ``session.update``): a fixed silence window, or None for the
        server's own end of turn, and whether speech stops a reply. From the
        next pause on: a pause already timing keeps the window it has.
        Switching between automatic turns and push-to-talk is not here: the
        transport refuses it after the call started."""
        if self._start is None:
            return
        self._start = dataclasses.replace(self._start, endpoint_silence_s=endpoint_silence_s, barge_in=barge_in)
        server = self.runtime.config.asr
        if endpoint_silence_s is None:
            window = {"adaptive_endpoint": server.adaptive_endpoint, "endpoint_silence_s": server.endpoint_silence_s}
        else:
            window = {"adaptive_endpoint": False, "endpoint_silence_s": endpoint_silence_s}
        self.asr_config = dataclasses.replace(self.asr_config, **window)
        if self._tracker is not None:
            self._tracker.reconfigure(self.asr_config)

    def set_system_prompt(self, prompt: str) -> None:
        """New instructions for the turns from now on; raises ContextTooLarge
        when they leave no room in the model's context."""
        self.history.set_instructions(prompt, self.prompt_budget())
        self._save_state()

    async def stop(
        self, reason: str = "client_stop", heard: dict[int, str] | None = None, ended_by_server: bool = False
    ) -> None:
        """Caller hung up (or the transport closed): release everything.
        ``heard``: turn -> what the caller heard of its reply, for replies
        whose audio was still going out (or whose cut was still waiting for
        the turn to end): applied once the turns are stopped, so a call that
        re-attaches does not carry on as if the caller heard it all.
        ``ended_by_server``: the server ended the call itself (its length,
        a flood), not its connection: it is not picked up again."""
        if self.closed:
            return
        self.closed = True
        self._disarm_keypad_answer()
        self.runtime.asr.forget(self.call_id, ended=True)
        self.runtime.low_priority.forget(self.call_id)
        # A stream that may come back (lost, drained) keeps the words its
        # caller last said: a final decoding now is let finish (bounded),
        # and its words wait for the re-attached call's next turn. Otherwise
        # no decode of this call may start after it hung up.
        may_come_back = self._state is not None and reason not in HUNG_UP and not ended_by_server
        # Replaced by a re-attach elsewhere, this connection's writes are
        # refused: its caller's last words could not be kept, and decoding
        # them only took the shared worker ahead of the new connection's.
        keeps_last_words = may_come_back and not self.replaced
        if not keeps_last_words:
            self._finals.close()
        turns = [t for t in (self._active, self._pending) if t is not None]
        tasks = [*self._tasks, *(t.task for t in turns)]
        for turn in turns:
            # As a turn: one that has not taken its first step (committed in
            # the read the connection dropped in) hands its words on here;
            # a bare task cancel would skip the handler that does it.
            turn.cancel()
        for task in tasks:
            task.cancel()
        cancelled = False
        if tasks:
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:
                # stop() itself was cancelled (a drain's deadline, the handler
                # cancelled): the release below still runs (bounded: the store
                # forgets a hung-up call, a drained one is flushed for its
                # re-attach), then the cancel goes on, not swallowed.
                cancelled = True
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: each turn logs its own failure
        if keeps_last_words and not cancelled:
            # A committed turn cancelled mid-decode hands its words on when
            # the decode is done (Turn._talked_over -> _turn_finished).
            try:
                await self._finals.settle(LAST_WORDS_WAIT_S)
            except asyncio.CancelledError:
                cancelled = True  # the release below still runs, as above
        if keeps_last_words:
            self._finals.close()
        for turn, words in (heard or {}).items():
            self.history.heard(turn, words)
        if heard or self._snapshot_cut:
            # What was heard at the end, or a last snapshot cut to a reply
            # still playing: written again. Not otherwise: a stream that
            # named a stored call without re-attaching (no proof) must not
            # write its own empty conversation over it as it goes. The
            # history holds what was heard now; asked again, the playout
            # clock would count more as heard than the history keeps.
            self.heard_now = None
            self._save_state()
        key = self._owned_key
        # The key's session is the call's, not this connection's: once a
        # re-attach took the call over (on this server, or on another one the
        # store has said so already) it is that connection's to end.
        owner = self.runtime.writers.get(key) if key is not None else None
        taken_over = self.replaced or owner not in (None, self._superseded)
        if (not may_come_back or reason == SESSION_CLOSED) and not taken_over:
            # e.g. vllm-router's session table. A stream about to come back
            # keeps its session: the re-attach goes on under the same key.
            self.runtime.engine.end_session(self.llm_session_key)
        if key is not None and self.runtime.writers.get(key) == self._superseded:
            del self.runtime.writers[key]
        if self._state is not None:
            if reason in HUNG_UP:
                await self._state.forget()
            elif ended_by_server:
                # A carrier's call id comes back with the same call (Twilio
                # re-attaches under its callSid): a tombstone tells it no. A
                # resume token does not need one (nothing stored under it is
                # a fresh conversation too), so the entry goes: one per
                # flooding client filled the store's caps for an hour.
                token_call = self._start is not None and self._start.resume_token is not None
                await self._state.forget(ended="" if token_call else reason)
            else:  # a lost socket, a drain: the call may re-attach
                await self._state.flush()
        log.info("call %s ended (%s)", self.call_id, reason)
        if cancelled:
            raise asyncio.CancelledError

    def reply_heard(self, turn: int, heard: str) -> None:
        """Audio transports call this when playout tracking (marks, checkpoints)
        shows the caller heard only ``heard`` of ``turn``'s reply before
        cutting in: history then holds only what was actually heard."""
        self.history.heard(turn, heard)
        self._save_state()

    # ---- turn handling -------------------------------------------------

    async def _on_event(self, ev: object, now: float) -> None:
        if isinstance(ev, Paused | Resumed | TurnEnded):
            self._pause_id += 1
            self._eot_rule = self._eot_prob = self._eot_llm = self._eot_whisper = None
        if isinstance(ev, SpeechStarted):
            audio_ms = round((ev.audio_s + self._cleared_s) * 1000)
            if self._start is not None and not self._start.barge_in:
                # The client decides whether speech stops the reply.
                await self.emit({"type": "speech.started", "audio_ms": audio_ms, "barge_in": False})
                return
            active = self._active
            if active is not None and not active.task.done():
                active.talked_over = True
            await self.emit({"type": "speech.started", "audio_ms": audio_ms})
            if active is not None and self._premature(active, now):
                await self._resumed(active)
            if active is not None and not active.task.done():
                active.cancel()  # barge-in: the turn reports it
        elif isinstance(ev, PartialDue):
            self._spawn(self._partial(ev.audio, self._turn_index))
        elif isinstance(ev, Paused):
            self._on_pause(ev)
        elif isinstance(ev, Resumed):
            self._abort_pending()
        elif isinstance(ev, TurnEnded):
            await self._on_turn_end(ev, now)

    def _premature(self, turn: Turn, now: float) -> bool:
        """The caller starts again within the grace after ``turn``'s reply
        began (or before any of it went out): they were not done."""
        grace = self.asr_config.resume_grace_s
        if grace <= 0 or turn.premature or turn.spoken_first is not None or turn.keys_only or not turn.user_text:
            return False  # keys the caller pressed and waited on ended their turn: not a pause
        if turn.client_cancelled:
            return False  # the client ended its reply: the caller's words were a turn
        left = turn.resume_grace_left(now)
        if left is None:
            return not turn.task.done()  # still thinking: nothing was said yet
        return left >= 0

    async def _resumed(self, turn: Turn) -> None:
        """The two halves are one turn: ``turn``'s words lead the next one
        and it leaves the history (a turn still running is cancelled by the
        caller and hands back its words as premature)."""
        turn.premature = True
        # Its outcome is in (it may still be reporting it). A turn talked over
        # before its reply began handed its words on already: they are in
        # carry_over, not the history, and went in twice ("X X").
        if (turn.task.done() or turn.outcome_given) and self.history.retract(turn.index):
            self.carry_over = newest_words(" ".join(filter(None, [turn.user_text, self.carry_over])))
            self._save_state()
        await self.emit({"type": "turn.resumed", "turn": turn.index})

    def _on_pause(self, ev: Paused) -> None:
        cfg = self.asr_config
        if cfg.adaptive_endpoint and cfg.end_of_turn in SMART_TURN_POLICIES and not self._smart_turn_busy:
            # Beside the pause decode, not after it: the model's ~0.1 s pass
            # must land inside the pause's endpoint window. Busy from here, not
            # from when the task first runs: one frame can hold several pauses.
            self._smart_turn_busy = True
            self._spawn(self._smart_turn(ev.audio, self._pause_id))
        # With barge-in off, the reply being written goes on while the caller
        # talks: a turn prepared now would be answered without that reply's
        # exchange, which joins the history only when it ends.
        reply_goes_on = self._start is not None and not self._start.barge_in and self.reply_in_flight()
        if cfg.preemptive and not self._low_priority and not reply_goes_on and self._speculation.take():
            times = TurnTimes(speech_end=self._arrival_of(ev.speech_end_audio_s))
            self._pending = Turn(
                self._turn_context(),
                self._turn_index + 1,
                ev.audio,
                times,
                committed=False,
                on_window=self._window,
                audio_end_s=ev.speech_end_audio_s + self._cleared_s,
            )
        elif cfg.adaptive_endpoint and cfg.auto_turns and self._tracker is not None:
            # (Push-to-talk: no pause ends the turn, so none is decoded for its window.)
            # Until the pause's own words are in, the last partial's: it can be
            # a second behind the caller, and the words just before the pause
            # ("... and") are the ones that decide. A call fed faster than
            # real time is served last and keeps the partial's window.
            # Under Whisper's marks the partial's words alone would end a
            # finished-looking phrase in 0.3 s before the marks are read (and a
            # shed pause decode never reads them): at least the unsure window
            # until the pause's own decode is in.
            self._eot_rule = endpoint_window(self._last_partial, cfg, self._agent_line())
            if wants_marks(cfg) and not self._low_priority:
                self._eot_rule = max(self._eot_rule, cfg.endpoint_unsure_s)
            self._set_window()
            if self._low_priority:
                self._ask_sentence_end(self._last_partial)
            else:
                self._spawn(self._pause_words(ev.audio, self._pause_id))

    async def _pause_words(self, audio: np.ndarray, pause_id: int) -> None:
        """The pause's own decode, where no preemptive turn makes one
        (preemption off, its budget spent, barge-in off mid-reply): its words
        choose the window, as a preemptive turn's do."""
        try:
            result = await self.runtime.asr.submit(self.call_id, audio, final=False, marks=wants_marks(self.asr_config))
        except asyncio.CancelledError:
            return  # superseded (the turn ended, the caller went on) or the call stopped
        except Exception:
            return  # the last partial's window stands; the final decides the words
        if not self._still_pause(pause_id) or self.closed:
            return
        self._last_partial = result.text
        self._pause_decoded(result, " ".join(filter(None, [self.carry_over, result.text])))

    def _window(self, turn: Turn, decoded: Decoded) -> None:
        if self.asr_config.adaptive_endpoint and turn is self._pending and self._tracker is not None:
            self._pause_decoded(decoded, turn.user_text)

    def _pause_decoded(self, decoded: Decoded, words: str) -> None:
        """The pause's decode is in (a preemptive turn's or its own): its
        words and Whisper's marks choose how long to wait; ``words`` (with
        any carried over) may go to the LLM."""
        asked = self._agent_line()
        self._eot_rule = endpoint_window(decoded.text, self.asr_config, asked)
        self._eot_whisper = whisper_marks(decoded.text, decoded.sentence_end_p, asked)
        self._set_window()
        self._ask_sentence_end(words)

    def _agent_line(self) -> str | None:
        """The agent's line the caller is answering: the newest message, where
        it is the agent's ("What's your zip code?" makes "94107." a whole
        answer). None after the caller's own words (a reply that failed), and
        while a reply is under way: the history holds the one before it (it
        joins at its end), or what was sent of it, not what was heard."""
        if self.reply_in_flight():
            return None
        said = self.history.messages_so_far
        return said[-1]["content"] if said and said[-1]["role"] == "assistant" else None

    def _set_window(self) -> None:
        """The pause's endpoint window from every input in so far."""
        cfg = self.asr_config
        # Not under a fixed window: a client that chose one mid-pause
        # (set_turn_detection) must not have it replaced by a decode, a
        # probe or Smart Turn answering for the pause.
        if self._tracker is not None and cfg.adaptive_endpoint:
            window = decide_window(
                cfg.end_of_turn, self._eot_rule, self._eot_prob, cfg, self._eot_llm, self._eot_whisper
            )
            self._tracker.set_endpoint(window)

    def _ask_sentence_end(self, words: str) -> None:
        """Ask the engine whether the caller's sentence is over, where the
        answer could change the window (asr/end_of_turn.py ``asks_llm``). A
        call fed faster than real time gets no probes: they would take the
        engine from the real-time calls' replies."""
        if (
            not asks_llm(words, self._eot_rule, self.asr_config, self._eot_whisper, self._agent_line())
            or self._low_priority
            or self._sentence_end_busy
            or self.runtime.sentence_end_unsupported
        ):
            return
        self._sentence_end_busy = True  # now: one frame can hold several pauses
        self._spawn(self._sentence_end(words, self._pause_id))

    async def _sentence_end(self, words: str, pause_id: int) -> None:
        # One probe in flight per call, as for Smart Turn (busy since _ask_sentence_end).
        try:
            self.runtime.metrics.llm_used("eot_probe", None)  # its prefill's tokens are the engine's
            probability = await self.runtime.engine.sentence_end_probability(
                self.messages(words), session_key=self.llm_session_key
            )
        except SentenceEndUnsupported as exc:
            if not self.runtime.sentence_end_unsupported:
                self.runtime.sentence_end_unsupported = True
                log.warning("end of turn goes on without the LLM's input: %s", exc)
            return
        except Exception:  # the other inputs still decide; a probe failure must not end the call
            log.debug("sentence-end probe failed on call %s", self.call_id, exc_info=True)
            return
        finally:
            self._sentence_end_busy = False
        if self._still_pause(pause_id):
            self._eot_llm = probability
            self._set_window()

    async def _smart_turn(self, audio: np.ndarray, pause_id: int) -> None:
        # One inference in flight per call: a caller flapping between speech
        # and silence cannot queue model work ahead of other calls' pauses.
        cfg = self.asr_config
        try:
            model = shared_smart_turn(cfg.smart_turn_model)  # loaded at startup by the CLI; here a no-op
            probability = await asyncio.get_running_loop().run_in_executor(None, model.probability, audio)
        except Exception:  # the word rules still decide; a model failure must not end the call
            log.exception("smart turn failed; the word rules decide this pause")
            return
        finally:
            self._smart_turn_busy = False
        if self._still_pause(pause_id):
            self._eot_prob = probability
            self._set_window()

    def _still_pause(self, pause_id: int) -> bool:
        """An input computed for ``pause_id`` still applies: the caller has
        not resumed nor the turn ended while it was computed."""
        return pause_id == self._pause_id and self._tracker is not None

    def _abort_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._wasted += 1
            self._pending = None

    async def _on_turn_end(self, ev: TurnEnded, now: float) -> None:
        stopped = self._active
        # From here until this turn starts, a reply counts as in flight: one
        # started meanwhile (a response.create) would be overwritten by it.
        self._turn_ending = True
        try:
            if stopped is not None and not stopped.task.done():
                # Before speech.stopped goes out: a transcript of the old turn
                # landing while it is sent would be told as this turn's.
                stopped.cancel()
            if not ev.forced:
                # The endpoint, before the final decode: a client's "speech
                # stopped" need not wait for Whisper (a commit is the client's own).
                end_ms = round((ev.speech_end_audio_s + self._cleared_s) * 1000)
                await self.emit({"type": "speech.stopped", "audio_end_ms": end_ms})
            self.runtime.asr.forget(self.call_id)  # a pending partial is moot now
            self._last_partial = ""
            if self._active is not None and not self._active.task.done():
                if self._active is not stopped:
                    self._active.cancel()  # one that began while speech.stopped was sent
                # asyncio.wait: the old turn's end (its cancel, an error) is its
                # own; a cancel of this task (a drain, a hang-up) is not swallowed.
                await asyncio.wait({self._active.task})
        finally:
            self._turn_ending = False
        if self.closed:
            return  # hung up while the old reply wound down: no new turn
        turn = self._pending
        self._pending = None
        if turn is not None and ev.forced:
            # input.commit or the length cap: the audio may differ from the pause's.
            turn.cancel()
            self._wasted += 1
            turn = None
        self._turn_index += 1
        if turn is None:
            times = TurnTimes(speech_end=self._arrival_of(ev.speech_end_audio_s), endpoint=now)
            ctx = self._turn_context()
            end_s = ev.speech_end_audio_s + self._cleared_s
            turn = Turn(ctx, self._turn_index, ev.audio, times, committed=True, audio_end_s=end_s)
        turn.wasted_generations = self._wasted
        self._wasted = 0
        self._consume_carry_over(turn)
        self._active = turn
        if not turn.committed:
            self._speculation.refund()
            await turn.commit(now)

    def _turn_context(self) -> TurnContext:
        runtime = self.runtime
        return TurnContext(
            call_id=self.call_id,
            engine=runtime.engine,
            asr=self._finals,
            asr_config=self.asr_config,
            sampling=self.sampling,
            sentence_max_words=runtime.config.sentence_max_words,
            first_clause_words=self.first_clause_words,
            reply_policy=self.reply_policy,
            previous_reply=self.history.last_reply(),
            llm_session_key=self.llm_session_key,
            take_carry_over=self._take_carry_over,
            messages=self.messages,
            emit=self.emit,
            finished=self._turn_finished,
            is_closed=lambda: self.closed,
            tracer=runtime.tracer,
            gate=runtime.reply_gate,
            first_sentences=runtime.first_sentences,
            llm_used=self._llm_used,
            prompt_too_long=self._prompt_too_long,
            hold_for_resume=runtime.config.holds_for_resume,
            words_owned=self._words_owned,
        )

    @property
    def _low_priority(self) -> bool:
        """Feeding audio faster than real time: no speculative work for it."""
        return self.call_id in self.runtime.low_priority

    def _take_carry_over(self, take: bool) -> str:
        """Words waiting for the next turn (a talked-over turn's, keypresses),
        for the turn whose transcript is being built; cleared when taken."""
        words = self.carry_over
        if take:
            self.carry_over = ""
        return words

    def _consume_carry_over(self, turn: Turn) -> None:
        """A preemptive turn is committed: the carried-over words it read at
        its decode are its own now; any that came later stay for the next."""
        if turn.carry_over and self.carry_over.startswith(turn.carry_over):
            self.carry_over = self.carry_over[len(turn.carry_over) :].lstrip()

    def _turn_finished(self, outcome: TurnOutcome) -> None:
        """A turn handed back its outcome."""
        if outcome.premature or (outcome.cancelled and not (outcome.replied or outcome.client_cancelled)):
            # The caller kept talking before any of the reply went out, or
            # resumed right after it began (also when the reply ended by
            # itself while turn.resumed went out: the client was told):
            # this was a pause, not a turn. Their words join the next turn.
            # (A reply the client cancelled before its first token leaves a
            # turn with no reply: the client holds its item, and a
            # response.create is asked about it.)
            # Bounded as a turn's words are: a line whose turns are talked
            # over one after another grew it, and every saved state with it,
            # until a turn took it (past the store's size, none was saved).
            # In the order they came: keys pressed while the turn replied
            # follow its words; words it never took (talked over before its
            # decode was read) came before them.
            parts = [self.carry_over, outcome.user_text]
            if outcome.took_carry_over:
                parts.reverse()
            self.carry_over = newest_words(" ".join(filter(None, parts)))
        else:
            # History keeps only what the caller was sent, so the model never
            # believes it said words that were cut off.
            self.history.remember(outcome.index, outcome.user_text, outcome.spoken)
        self._save_state()

    def _arrival_of(self, position_s: float) -> float:
        """When the frame holding this stream position arrived."""
        at = bisect.bisect_left(self._arrivals, position_s, key=lambda entry: entry[0])
        return self._arrivals[at][1] if at < len(self._arrivals) else time.monotonic()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _partial(self, audio: np.ndarray, turn: int) -> None:
        tracker = self._tracker  # a clear_input makes a new one: this audio is then gone
        try:
            result = await self.runtime.asr.submit(self.call_id, audio, final=False)
        except asyncio.CancelledError:
            return  # superseded by a newer partial or the final
        except Exception:
            return  # a failed partial is not worth a client error; the final decides
        # While the turn ends (the turn number moves on only after its waits)
        # a partial is late: a Realtime client would get it under the next item.
        if turn != self._turn_index or self._turn_ending or not result.text or self.closed:
            return
        if tracker is not self._tracker:
            # Decoding when the client cleared the buffer (forget cancels only a
            # queued partial): its words are of audio that no longer exists.
            return
        self._last_partial = result.text
        await self.emit({"type": "transcript.partial", "turn": turn + 1, "text": result.text})
        speculate = not self._low_priority and self._speculation.available()
        # A prefill only buys latency when the engine has nothing better to
        # do: while any call's turn is under way (its final decode or its
        # reply) it would take the cores that turn is waiting on. One caller
        # talking between replies never meets one; 8 calls on 2 cores nearly
        # always do.
        if not (self.runtime.config.llm.incremental_prefill and not self._prefilling and speculate):
            return
        if self.runtime.reply_gate.busy:
            self.runtime.metrics.prefills_skipped.inc()
            return
        self._spawn(self._prefill(result.text))

    async def _prefill(self, partial_text: str) -> None:
        """Warm the engine's prefix cache with the prompt as it stands, so the
        prefill at the end of the turn covers only the last few words."""
        if self._active is not None and not self._active.task.done():
            return  # a reply is streaming; don't compete with it
        self._prefilling = True
        try:
            messages = self.messages(partial_text)
            usage = await self.runtime.engine.prefill(messages, session_key=self.llm_session_key)
            self.runtime.metrics.llm_used("prefill", usage)
            self._calibrate(messages, usage)
        except PromptTooLong:
            self._prompt_too_long()  # the reply's prompt, a few words longer, would not fit either
        except Exception:
            log.debug("prefill failed on call %s", self.call_id, exc_info=True)
        finally:
            self._prefilling = False

    def add_context(self, role: str, text: str, instructions: str | None = None) -> None:
        """A text message the client adds to the conversation (Realtime
        ``conversation.item.create``); see History.add."""
        self.history.add(role, text, self.prompt_budget(), instructions)
        self._save_state()

    def messages(self, user_text: str | None, instructions: str | None = None) -> list[dict[str, str]]:
        return self.history.messages(user_text, instructions, self.prompt_budget())

    def set_sampling(self, overrides: dict[str, Any]) -> None:
        """This call's sampling from now on: the current values with
        ``overrides`` applied. Raises ProtocolError (``invalid_sampling``,
        naming the field) for a bad value, one the engine cannot honour, or a
        reply length the protocols do not allow or the context cannot hold."""
        try:
            sampling = self.sampling.merged(overrides)
            self.runtime.engine.check_sampling(sampling)
        except SamplingError as exc:
            # Only a field we know is named outside the message's quotes: an
            # unknown one is the caller's text (the message quotes it).
            where = f"sampling.{exc.field}" if exc.field in SamplingParams.field_names() else "sampling"
            raise ProtocolError("invalid_sampling", f"{where}: {str(exc)[:200]}") from None
        except EngineError as exc:
            raise ProtocolError("invalid_sampling", str(exc)[:200]) from None
        if sampling.max_tokens > MAX_REPLY_TOKENS:
            raise ProtocolError("invalid_sampling", f"sampling.max_tokens must be at most {MAX_REPLY_TOKENS}")
        try:
            self.check_instructions(self.history.system_prompt, sampling.max_tokens)
        except ContextTooLarge:
            raise ProtocolError("invalid_sampling", "sampling.max_tokens leaves no room for the prompt") from None
        self.sampling = sampling

    @property
    def max_tokens(self) -> int:
        """The call's reply cap: its sampling's, the one place it is kept."""
        return self.sampling.max_tokens

    @max_tokens.setter
    def max_tokens(self, value: int) -> None:
        self.sampling = self.sampling.merged({"max_tokens": value})

    def prompt_budget(self, max_tokens: int | None = None) -> int:
        """Estimated prompt tokens the model's context holds beside this
        call's reply: its real room, divided by :attr:`token_scale`."""
        reply = max_tokens or self.max_tokens
        return int((self.runtime.config.llm.context_tokens - reply - PROMPT_MARGIN_TOKENS) / self.token_scale)

    def _llm_used(self, purpose: str, request: GenerationRequest) -> None:
        self.runtime.metrics.llm_used(purpose, request.usage)
        self._calibrate(request.messages, request.usage)

    def _prompt_too_long(self) -> None:
        """The engine refused a prompt built to this call's budget as too
        long for its context (a count the estimate and the calibration both
        missed): a quarter smaller from now on."""
        before = self.token_scale
        self.token_scale = min(self.token_scale * PROMPT_TOO_LONG_STEP, MAX_TOKEN_SCALE)
        log.warning("call %s: prompt too long for the engine; token scale %.2f -> %.2f", self.call_id, before,
                    self.token_scale)  # fmt: skip

    def _calibrate(self, messages: list[dict[str, str]], usage: Usage | None) -> None:
        """Raise :attr:`token_scale` to what this prompt really cost. Only
        up: a prompt that fitted once must go on fitting. A reply carried on
        or resumed (continuation, yield) was sent more than its messages."""
        if usage is None or usage.prompt_tokens <= 0 or usage.continuations or usage.yields or not messages:
            return
        scale = usage.prompt_tokens / prompt_tokens(messages) * TOKEN_SCALE_MARGIN
        if scale > self.token_scale:
            self.token_scale = min(scale, MAX_TOKEN_SCALE)

    def check_instructions(self, prompt: str, max_tokens: int | None = None) -> None:
        """Raises ContextTooLarge if ``prompt`` leaves no room for a turn."""
        self.history.check_instructions(prompt, self.prompt_budget(max_tokens))

    def check_reply_instructions(self, instructions: str) -> None:
        """Raises ContextTooLarge if one reply's own instructions (Realtime
        ``response.instructions``), added to the call's prompt, leave no room
        for a turn: sent on, the engine refused the prompt, and each refusal
        made every later prompt of the call a quarter smaller."""
        self.check_instructions(f"{self.history.system_prompt}\n\n{instructions}")

    def check_new_instructions(self, instructions: str, max_tokens: int | None = None) -> None:
        """Raises ContextTooLarge if these instructions, with the system
        items the client added, make a prompt too long or one that leaves no
        room for a turn (checked alone, the two passed one by one and every
        turn of the call then failed)."""
        self.history.check_prompt(self.history.prompt_with(instructions), self.prompt_budget(max_tokens))

    def reply_in_flight(self) -> bool:
        """A committed turn is decoding or replying, or the caller's turn is
        ending and its own is about to start (a reply started in between
        would be overwritten by it, never cancelled, and outlive the call)."""
        return self._turn_ending or (self._active is not None and not self._active.task.done())

    def caller_turn_after(self, turn: int) -> bool:
        """Whether a caller's turn numbered after ``turn`` is ending or in
        flight (Realtime: a response.create then asks for its reply, not for
        an older one held)."""
        if self._turn_ending:
            return True
        active = self._active
        return active is not None and not active.task.done() and active.index > turn and active.spoken_first is None

    def speak_first(self, first: SpokenFirst) -> int:
        """Start a reply nobody spoke for: a greeting on pickup, or (Realtime
        ``response.create``) a reply to the conversation as it stands. It goes
        through the same reply path as any turn (sentences, TTS, history);
        its TTFS/TTFA count from now. Returns its turn number."""
        if not self.started:
            raise ProtocolError("not_started", "a reply before 'start'")
        if self.reply_in_flight():
            raise ProtocolError("reply_in_progress", "a reply is already in progress")
        # A preemptive turn held for this pause would take the same number;
        # the caller's words stay in the tracker's turn and are decoded again.
        self._abort_pending()
        return self._start_audioless_turn(spoken_first=first)

    def go_on_after_noise(self, cut: int) -> None:
        """A barge-in cut turn ``cut``'s reply before the caller heard it
        all, and the speech that cut it held no words (a cough, a door, the
        TV): the reply goes on from what the caller heard, once the empty
        turn is over, unless the caller has started again or something else
        is being answered. Before, the caller heard half an answer and then
        silence. Once per reply: a go-on a noise cuts again stays cut (a TV
        on the line would have the engine writing go-ons without end). Not
        under push-to-talk, nor where the client asks for every reply."""
        config = self.runtime.config
        if config.go_on_after_noise and self.asr_config.auto_turns and self.answers_unasked and cut != self._gone_on:
            self._spawn(self._go_on_after_noise(self._active))

    async def _go_on_after_noise(self, empty: Turn | None) -> None:
        if empty is not None:
            await asyncio.wait({empty.task})  # it reports turn.empty before it ends
        if self.closed or self._caller_talking() or self.carry_over or self.reply_in_flight():
            return
        if self._active is not empty:
            return
        log.info("call %s: the reply cut by a noise goes on", self.call_id)
        self._gone_on = self.speak_first(SpokenFirst(instructions=GO_ON_AFTER_NOISE, goes_on=True))

    def _caller_talking(self) -> bool:
        """The caller is in a turn: speaking, or paused inside it."""
        return (self._tracker is not None and self._tracker.in_speech) or self._pending is not None

    def _start_audioless_turn(self, since: float | None = None, **kind: Any) -> int:
        """A committed turn with no audio of its own (``spoken_first``: a
        reply nobody spoke for; ``keys_only``: the caller's keypresses), timed
        from ``since`` (the caller's last key), else from now; returns its
        number."""
        self._turn_index += 1
        now = time.monotonic()
        times = TurnTimes(speech_end=now if since is None else min(since, now), endpoint=now)
        end_s = (self._tracker.position_s if self._tracker is not None else 0.0) + self._cleared_s
        self._active = Turn(self._turn_context(), self._turn_index, np.zeros(0, np.float32), times, committed=True,
                            audio_end_s=end_s, **kind)  # fmt: skip
        return self._turn_index

    def dtmf(self, digit: str) -> None:
        """A keypad press from an audio transport. It joins the next turn's
        user text (as "[caller pressed 5]") through carry_over, so the LLM
        sees it in order with what the caller says."""
        if len(digit) != 1 or digit not in "0123456789*#ABCD":
            return
        # A keypad flood before any speech would grow the turn's text (and
        # the work of each press) without end: past a card number and then
        # some, further presses are dropped until the next turn takes them.
        if self.carry_over.count(KEYPRESS_PREFIX) >= MAX_CARRIED_KEYPRESSES:
            log.debug("call %s: keypress dropped, %d already waiting for the turn", self.call_id,
                      MAX_CARRIED_KEYPRESSES)  # fmt: skip
            return
        self.carry_over = " ".join(filter(None, [self.carry_over, f"{KEYPRESS_PREFIX}{digit}]"]))
        self._last_key_at = time.monotonic()
        self._save_state()  # a call that re-attaches still has them
        self._arm_keypad_answer(at_once=digit == "#")

    def _arm_keypad_answer(self, at_once: bool = False, carried: str = "") -> None:
        """Answer the keypresses waiting in carry_over as a turn of their
        own once no key has come for keypad_answer_s (at once after "#"):
        a caller told "press 1 to confirm" presses 1 and waits, and their
        keys used to wait, in silence, for words they would never say.
        Speech first takes them into its turn (_keypad_answer waits it out).
        ``carried``: words a re-attached call brought back, answered at once
        the same way while they still wait."""
        settle = self.runtime.config.keypad_answer_s
        if (settle <= 0 and not carried) or self.closed or not self.started:
            return
        if self._keypad_timer is not None:
            self._keypad_timer.cancel()
        delay = 0.0 if at_once or carried else settle
        self._keypad_settle_s = delay
        self._keypad_timer = asyncio.get_running_loop().call_later(delay, self._keypad_answer, carried)

    def _disarm_keypad_answer(self) -> None:
        if self._keypad_timer is not None:
            self._keypad_timer.cancel()
            self._keypad_timer = None

    def _keypad_answer(self, carried: str = "") -> None:
        self._keypad_timer = None
        waiting = KEYPRESS_PREFIX in self.carry_over or (carried and self.carry_over.startswith(carried))
        if self.closed or not waiting:
            return  # a turn took them
        if self._caller_talking() or self.reply_in_flight():
            # The caller's turn (talking, or paused mid-turn) takes the keys at
            # its decode; a reply past its decode takes no more: look again
            # until one took them or none is under way (keys pressed in a
            # turn's endpoint window, after its pause decode read them, or a
            # turn whose speech recognition failed, left them waiting).
            loop = asyncio.get_running_loop()
            self._keypad_timer = loop.call_later(KEYPAD_RECHECK_S, self._keypad_answer, carried)
            return
        # Keys: timed from the last one pressed. Words carried over a
        # re-attach: from now (they were said on a connection that is gone).
        since = None
        if KEYPRESS_PREFIX in self.carry_over and self._last_key_at is not None:
            since = max(self._last_key_at, time.monotonic() - self._keypad_settle_s)
        self._start_audioless_turn(since=since, keys_only=True)
