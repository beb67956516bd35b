"""One caller turn and the reply to it.

A turn is created either at the *endpoint* (the caller's silence lasted the
window: it is committed from birth) or, with preemptive generation, at the
start of a *pause*: it decodes the audio and starts the LLM at once, but
everything it produces is held behind a gate. If the caller resumes, the
session aborts it (a wasted generation, counted). If the endpoint fires
with no voice in between, the session commits it: the held transcript and
reply events go out in order that instant and the rest streams live. The
pause audio is exactly the turn's final audio (asr.turns cuts both at the
same place), so the decode made at the pause *is* the final transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from asr.config import ASRConfig
from asr.end_of_turn import wants_marks
from llm.base import EngineError, GenerationRequest, LLMEngine, Usage
from llm.continuation import stream_continuing
from llm.sampling import SamplingParams
from llm.yielding import MIN_HOLD_S, hold_s, stream_yielding
from streaming.fair_share import FirstSentences, ReplyGate
from streaming.sentences import SentenceSegmenter
from voice.call.reply_policy import (
    SEND,
    SKIP,
    STOP_CODE,
    STOP_LENGTH,
    STOP_LOOP,
    ReplyGuard,
    ReplyPolicy,
    is_complete,
    without_markdown,
)

if TYPE_CHECKING:
    from asr.whisper import Decoded
    from asr.worker import ASRWorker
    from voice.server.tracing import TurnTracer

log = logging.getLogger(__name__)

# What a client is told when a turn fails: its code and a plain sentence.
# The exception's own text (internal URLs, library messages) is for the
# server log only; a caller, or whoever is behind a carrier, never sees it.
PLAIN_ERRORS: dict[str, str] = {
    "asr_failed": "speech recognition failed for this turn",
    "llm_failed": "the reply could not be generated",
    "llm_unavailable": "the language model is unavailable; try again in a moment",
}


def plain_error(code: str, turn: int) -> str:
    return f"turn {turn}: {PLAIN_ERRORS.get(code, 'the turn failed')}"


# The caller's words one turn answers, carried-over turns included: a caller
# who keeps resuming or talking over replies hands each turn's words on to
# the next, and the prompt's budget trims only the past, never this message.
# About 500 tokens, several 28 s turns of speech; past it the newest words stay.
MAX_USER_TEXT_CHARS = 2000


def newest_words(text: str, limit: int = MAX_USER_TEXT_CHARS) -> str:
    """``text``, or its last ``limit`` characters, from a word boundary when
    one is near the cut (text written without spaces, Chinese or Japanese
    from a multilingual model, is cut where the limit falls)."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    cut = tail.find(" ", 0, 40)
    return tail[cut + 1 :] if cut >= 0 else tail


Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class TurnOutcome:
    """What a turn hands back to its session, which alone owns history,
    carry-over and counters."""

    index: int
    user_text: str
    spoken: str  # the reply sentences that went out, joined
    cancelled: bool
    # Any of the reply reached the engine's first token: a reply the caller
    # cut off, not a pause they kept talking through.
    replied: bool
    # The caller resumed within the grace after the reply began: their words
    # lead the next turn and this one leaves no trace in the history.
    premature: bool = False
    # The client stopped the reply (Realtime response.cancel), not the caller
    # by talking: the caller's words were a turn (the client has its item).
    client_cancelled: bool = False
    # The turn took the session's carried-over words into ``user_text``:
    # any carried over now came after it (keys pressed while it replied),
    # else they came before its speech. Their order when the two join.
    took_carry_over: bool = False


@dataclasses.dataclass(frozen=True)
class SpokenFirst:
    """A reply the agent starts, not an answer to the caller's audio: a
    greeting on pickup, or a reply the client asks for (Realtime
    ``response.create``) to the conversation as it stands. ``text``: say
    exactly this; otherwise generate, with ``instructions`` added for this
    reply only."""

    text: str | None = None
    instructions: str | None = None
    # It goes on with a reply a noise cut (the session's go_on_after_noise):
    # with nothing new to say it says nothing, not the fallback nor the
    # reply it would repeat.
    goes_on: bool = False


async def _fixed(text: str) -> AsyncIterator[str]:
    yield text


@dataclasses.dataclass
class TurnContext:
    """Everything a turn may use: the shared engines, the call's settings
    as they stand when the turn starts, and where its events and outcome go."""

    call_id: str
    engine: LLMEngine
    asr: ASRWorker
    asr_config: ASRConfig
    # The call's sampling: the server's defaults merged with its own options.
    sampling: SamplingParams
    sentence_max_words: int
    # The reply's first piece may end at a clause boundary with this many
    # words before it (0: whole sentences only; streaming/sentences.py).
    first_clause_words: int
    reply_policy: ReplyPolicy
    # What the caller heard of the previous reply: the loop guard compares.
    previous_reply: str
    # Words of an earlier turn the caller talked over; they lead this one.
    # Words waiting to lead this turn (a talked-over turn's, keypresses):
    # ``take_carry_over(True)`` also clears them, (False) only reads.
    take_carry_over: Callable[[bool], str]
    # The prompt that answers the caller's words (None: the conversation as it
    # stands), with extra instructions for this reply; built when the reply
    # starts so it holds the history as of then.
    messages: Callable[[str | None, str | None], list[dict[str, str]]]
    emit: Emit
    finished: Callable[[TurnOutcome], None]
    is_closed: Callable[[], bool]
    tracer: TurnTracer | None = None
    # Keeps turns of calls sending faster than real time out of the way of
    # the real-time calls' turns (streaming/fair_share.py); None: no gate.
    gate: ReplyGate | None = None
    # Turns waiting for their first sentence; once this reply's first is out
    # it steps aside for them (llm/yielding.py). None: replies never yield.
    first_sentences: FirstSentences | None = None
    # Told once per reply what its LLM request cost and what it was for
    # (Metrics.llm_used: answered, preemptive_aborted, premature,
    # spoken_first). None: not counted.
    # The request goes along: its messages and usage (real prompt tokens)
    # calibrate the call's token estimate (the session's token_scale).
    llm_used: Callable[[str, GenerationRequest], None] | None = None
    # The engine said the prompt did not fit its context: the call's budget
    # shrinks, and the reply's prompt is built once more. None: not retried.
    prompt_too_long: Callable[[], None] | None = None
    # Generate past the first sentence only once the caller has had the
    # resume grace to go on (ServerConfig.hold_for_resume; needs first_sentences).
    hold_for_resume: bool = False
    # An LLM pool's key for the call (the session's llm_session_key; None: call_id).
    llm_session_key: str | None = None
    # The turn is committed and its words are known (before its reply): the
    # session snapshots the call, so a replica lost mid-reply does not lose
    # what the caller just said. None: not told.
    words_owned: Callable[[Turn], None] | None = None


@dataclasses.dataclass
class TurnTimes:
    """Monotonic seconds; None until the stage happened."""

    speech_end: float | None = None
    endpoint: float | None = None
    asr_start: float | None = None
    asr_final: float | None = None
    llm_first_token: float | None = None
    first_sentence: float | None = None
    done: float | None = None

    def metrics(self) -> dict[str, float | None]:
        def rel(t: float | None, base: float | None = self.speech_end) -> float | None:
            return None if t is None or base is None else round((t - base) * 1000, 1)

        return {
            "endpoint_ms": rel(self.endpoint),
            "asr_final_ms": rel(self.asr_final),
            "llm_first_token_ms": rel(self.llm_first_token),
            "first_sentence_ms": rel(self.first_sentence),
            "done_ms": rel(self.done),
            "ttfs_ms": rel(self.first_sentence),
            "asr_decode_ms": rel(self.asr_final, self.asr_start),
            "llm_ttft_ms": rel(self.llm_first_token, self.asr_final),
        }


class Turn:
    def __init__(
        self,
        ctx: TurnContext,
        index: int,
        audio: np.ndarray,
        times: TurnTimes,
        committed: bool,
        # Told the pause decode (its words and Whisper's marks choose the window).
        on_window: Callable[[Turn, Decoded], None] | None = None,
        audio_end_s: float = 0.0,
        spoken_first: SpokenFirst | None = None,
        keys_only: bool = False,
    ) -> None:
        self.ctx = ctx
        # A reply nobody spoke for (a greeting, a reply to text context): no ASR.
        self.spoken_first = spoken_first
        # The caller pressed keys and said nothing: the keys (carried over)
        # are the turn's words, and there is no audio to decode.
        self.keys_only = keys_only
        # Stream position (s of call audio) just after the turn's last voiced chunk.
        self.audio_end_s = audio_end_s
        self.index = index
        self.audio = audio
        self.times = times
        self.preemptive = not committed
        # The carried-over words this turn's transcript starts with; read when
        # its decode is in (None until then), so keypresses and talked-over
        # words up to that moment join it.
        self.carry_over: str | None = None
        self.user_text = ""
        self.sent: list[str] = []
        # Preemptive turns of this caller turn that were aborted (caller
        # resumed) before this one was committed; set by the session.
        self.wasted_generations = 0
        self.request: GenerationRequest | None = None
        self.error_code = "llm_failed"  # the error event's code when the LLM fails
        # Set by the session when the caller resumed within the grace after
        # this reply began (asr_config.resume_grace_s): the reply was premature.
        self.premature = False
        self.client_cancelled = False  # see TurnOutcome.client_cancelled
        # Why the reply ended: complete, max_sentences, loop, code, token_cap, cancelled, resumed, failed.
        self.reply_end = "complete"
        self._on_window = on_window
        # The turns-waiting-for-a-first-sentence registry this turn is in
        # (None: not in it: a low-priority call, or replies never yield).
        self._waiting: FirstSentences | None = None
        # Seconds this reply waited for a first-sentence lane (FirstSentences.lane).
        self.lane_wait_s = 0.0
        # The reply had no sentence and the caller heard ReplyPolicy.fallback.
        self.fell_back = False
        # Whether the reply has held for a possible resume (once at most).
        self._held_for_resume = False
        # Set by the session the moment the caller starts talking over this
        # turn, before the barge-in goes out (its sends may wait): no later
        # sentence may be queued behind the carrier's clear. The cancel follows.
        self.talked_over = False
        self._accounted = False  # its LLM work told to ctx.llm_used
        # The engine was asked (not an operator's fixed text, not cancelled
        # while waiting for its lane): only then is there LLM work to count.
        self._llm_asked = False
        self._gate = asyncio.Event()
        self._final: asyncio.Future[Any] | None = None  # its final decode, once asked for
        self._started = False  # its task has taken its first step
        self._cancelled_at_start = False  # a speak-first turn cancelled before its first step
        self._held: list[dict[str, Any]] = []
        if committed:
            self._gate.set()
        # Set just before the outcome goes to the session (ctx.finished):
        # from then on the turn only reports it (response.done, metrics).
        self.outcome_given = False
        self.task: asyncio.Task[None] = asyncio.create_task(self._run(), name=f"{ctx.call_id}-turn{index}")
        self.task.add_done_callback(self._ended)

    @property
    def committed(self) -> bool:
        return self._gate.is_set()

    async def commit(self, endpoint_at: float) -> None:
        """The endpoint fired: release what was held, then stream live."""
        self.times.endpoint = endpoint_at  # set first: a held turn being committed (see _generate_reply)
        try:
            while self._held:
                await self._send(self._held.pop(0))
        finally:
            # No await since the last pop: nothing can slip in between. Set
            # also when the flush is cut short (the call is going: what was
            # still held is not sent), so the turn never waits on it for good.
            self._gate.set()
        self._tell_words_owned()

    def _tell_words_owned(self) -> None:
        if self.committed and self.user_text and not self.outcome_given and self.ctx.words_owned is not None:
            self.ctx.words_owned(self)

    def cancel(self) -> bool:
        """Cancel the turn; False when its outcome is already the session's
        (it is only reporting it: a cancel then would lose its response.done
        and metrics, and the client would wait for them for good)."""
        if self.outcome_given:
            return False
        if self._cancelled_at_start:
            return True  # its task runs to end it; cancelled now, it never would
        if not self._started:
            # Cancelled before its first step, its task never runs (_run's
            # handler included): a committed turn's words are handed on here.
            self._started = True
            if self.spoken_first is not None:
                # Its client saw it created (Realtime response.create, then
                # response.cancel in the same read): the task runs, to end it.
                self._cancelled_at_start = True
                return True
            self._hand_on_undecoded()
        self.task.cancel()
        return True

    async def _end_unanswered(self, *, told: bool, replied: bool) -> None:
        """Cancelled before its reply began: the outcome goes to the
        session (``replied``: its words stay this turn's), and a turn the
        client was told of (its transcript, or a Realtime response.created)
        is answered, as any cancelled turn, with response.done and metrics,
        which that client waits for."""
        self.outcome_given = True
        self.ctx.finished(
            TurnOutcome(
                self.index,
                self.user_text,
                "",
                cancelled=True,
                replied=replied,
                premature=self.premature,
                took_carry_over=self.carry_over is not None,
            )
        )
        if told:
            self.reply_end = "cancelled"
            await self._report(cancelled=True, failed=None)

    def _hand_on_undecoded(self) -> None:
        """A committed turn talked over before its final was asked for: it is
        decoded now, and its words lead the next turn (as for a turn talked
        over mid-decode)."""
        if self.committed and self._final is None and self.spoken_first is None and not self.keys_only:
            self._final = self.ctx.asr.submit(self.ctx.call_id, self.audio, final=True)
            self._final.add_done_callback(self._talked_over)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A turn that failed outside the reply's own error handling would
        otherwise end in silence: said in the log, where a bug shows."""
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s turn %d failed", self.ctx.call_id, self.index, exc_info=task.exception())

    def _talked_over(self, pending: asyncio.Future[Any]) -> None:
        """A committed turn was talked over mid-decode: its words, once
        decoded, go back to the session to lead the next turn."""
        if pending.cancelled() or pending.exception() is not None or not pending.result().text:
            return
        text = " ".join(filter(None, [self.carry_over or "", pending.result().text]))
        took = self.carry_over is not None
        self.ctx.finished(TurnOutcome(self.index, text, "", cancelled=True, replied=False, took_carry_over=took))

    # ---- the work ------------------------------------------------------

    async def _out(self, event: dict[str, Any]) -> None:
        if self._gate.is_set():
            await self._send(event)
        else:
            self._held.append(event)

    async def _send(self, event: dict[str, Any]) -> None:
        if event["type"] == "response.sentence" and event["first"]:
            self.times.first_sentence = time.monotonic()  # when it is really on the wire
        await self.ctx.emit(event)

    async def _run(self) -> None:
        self._started = True
        try:
            if self._cancelled_at_start:
                raise asyncio.CancelledError
            await self._run_gated()
        except asyncio.CancelledError:
            if self.spoken_first is not None and not self.outcome_given:
                # Cancelled before it began (before its first step, or at the
                # reply gate): no reply path ran to end it.
                await self._end_unanswered(told=True, replied=False)
            elif self.committed and self._final is None:
                # Talked over while it waited its turn at the reply gate.
                self._hand_on_undecoded()
            elif not self.committed and self.times.endpoint is None and self._final is not None and self._final.done():
                # Aborted (the caller went on) after its decode: talked-over
                # turns' audio that the decode carried in front of this one's
                # must lead the next final, or their words are lost.
                abandon = getattr(self.ctx.asr, "abandon", None)
                if abandon is not None:
                    abandon(self._final)
            raise

    async def _run_gated(self) -> None:
        gate = self.ctx.gate
        async with gate.turn(self.ctx.call_id) if gate is not None else contextlib.nullcontext():
            # A call fed faster than real time is served last: its turns never
            # make the real-time calls' replies step aside.
            waiting = self.ctx.first_sentences
            if gate is not None and self.ctx.call_id in gate.low:
                waiting = None
            if waiting is not None:
                waiting.waiting(self)
            self._waiting = waiting
            try:
                await self._work()
            finally:
                if waiting is not None:
                    waiting.done(self)

    async def _work(self) -> None:
        ctx = self.ctx
        if self.spoken_first is not None:
            await self._reply()
            return
        decoded: Decoded | None = None
        if self.keys_only:
            self.times.asr_start = self.times.asr_final = time.monotonic()
        else:
            decoded = await self._decode()
            if decoded is None:
                return
        # A committed turn owns the words now; a preemptive one only reads them
        # (if the caller resumes it is dropped, and they wait for the next).
        self.carry_over = ctx.take_carry_over(self.committed)
        heard = decoded.text if decoded is not None else ""
        self.user_text = newest_words(" ".join(filter(None, [self.carry_over, heard])).strip())
        if decoded is not None and self._on_window is not None and not self.committed:
            self._on_window(self, decoded)
        if not self.user_text:
            # VAD heard something Whisper found no words in: no turn. Said
            # once the turn is committed (held until then, like any event): a
            # push-to-talk client waits for an answer to its commit.
            await self._out({"type": "turn.empty", "turn": self.index, "audio_end_ms": round(self.audio_end_s * 1000)})
            return
        await self._transcript_then_reply()

    async def _decode(self) -> Decoded | None:
        """The turn's final decode (None: no words come of it here: the
        caller talked over it, or it failed and the client was told)."""
        ctx = self.ctx
        self.times.asr_start = time.monotonic()
        # A preemptive turn's decode is its pause's: Whisper's marks there are
        # an end-of-turn input where the policy reads them.
        marks = not self.committed and wants_marks(ctx.asr_config)
        pending = self._final = ctx.asr.submit(ctx.call_id, self.audio, final=True, marks=marks)
        try:
            # Shielded: a caller who talks over a committed turn mid-decode
            # still gets these words joined to their next turn.
            decoded = await asyncio.shield(pending)
            if self.committed and self.talked_over:
                # The caller talked on while it decoded, and the session's
                # cancel follows its barge-in send: these words lead their
                # next turn, as for a cancel mid-decode, with no transcript of
                # their own (it went out under the item the new speech reopened).
                self._talked_over(pending)
                return None
        except asyncio.CancelledError:
            if self.committed:
                pending.add_done_callback(self._talked_over)
            else:
                # An aborted preemptive turn: its audio is the head of the turn
                # still going on, whose own final decodes it again. Dropping this
                # decode frees the shared worker for every call's finals.
                pending.cancel()
            raise
        except Exception:
            log.exception("ASR failed on call %s turn %d", ctx.call_id, self.index)
            if self.committed and self.talked_over:
                return None  # stopped by the caller's new speech: its failure is not told, as on a cancel
            await self._gate.wait()
            message = plain_error("asr_failed", self.index)
            await ctx.emit({"type": "error", "code": "asr_failed", "message": message, "turn": self.index})
            return None
        self.times.asr_final = time.monotonic()
        return decoded

    async def _transcript_then_reply(self) -> None:
        """The turn's words go out as its transcript, then its reply."""
        said = False
        final = {"type": "transcript.final", "turn": self.index, "text": self.user_text,
                 "audio_end_ms": round(self.audio_end_s * 1000)}  # fmt: skip
        try:
            if self.committed:
                # Once begun it goes out whole, even if this turn is cancelled
                # while a send waits on the socket: the client then has the
                # words as this turn's, and they must not be carried on too.
                sending = asyncio.ensure_future(self._send(final))
                sending.add_done_callback(lambda done: done.cancelled() or done.exception())  # read if orphaned
                said = True
                self._tell_words_owned()
                await asyncio.shield(sending)
            else:
                await self._out(final)
                said = True
            await self._out({"type": "turn.ended", "turn": self.index})
        except asyncio.CancelledError:
            if self.committed and not self.outcome_given:
                # Talked over while its transcript went out. Not yet out: its
                # words (carried-over ones included) lead the next turn. Out:
                # the client has them as this turn's, so they stay this turn's
                # (the history keeps them, unanswered), not said twice.
                await self._end_unanswered(told=said, replied=said)
            raise
        await self._reply()

    async def _reply(self) -> None:
        try:
            await self._generate_reply()
        finally:
            self._account_llm()

    def resume_grace_left(self, now: float) -> float | None:
        """Seconds left (negative: past) in which the caller's talking again
        takes this reply back as premature (voice/call/session.py); None
        while its first sentence has not gone out."""
        first = self.times.first_sentence
        return None if first is None else first + self.ctx.asr_config.resume_grace_s - now

    def _account_llm(self) -> None:
        """What this reply's LLM work was for, told once its fate is known:
        the caller's answer (also when they talked over it), a preemptive
        reply dropped because the caller went on, or a premature one. A
        reply over within the resume grace after its first sentence went
        out may still be taken back (voice/call/session.py): it is told
        when the grace has passed."""
        if self.request is None or not self._llm_asked or self.ctx.llm_used is None or self._accounted:
            return  # not one (an operator's fixed text; cancelled before the engine was asked)
        if self.spoken_first is not None:
            purpose = "spoken_first"
        elif self.premature:
            purpose = "premature"
        elif not self.committed:
            purpose = "preemptive_aborted"
        else:
            purpose = "answered"
            grace_left = self.resume_grace_left(time.monotonic())
            if grace_left is not None and grace_left > 0:
                asyncio.get_running_loop().call_later(grace_left + 0.05, self._account_llm)
                return
        self._accounted = True
        self.ctx.llm_used(purpose, self.request)

    async def _generate_reply(self) -> None:
        ctx = self.ctx
        first = self.spoken_first

        def build() -> list[dict[str, str]]:
            if first is not None:
                return ctx.messages(None, first.instructions)
            return ctx.messages(self.user_text, None)

        def refit() -> list[dict[str, str]]:
            assert ctx.prompt_too_long is not None
            ctx.prompt_too_long()
            return build()

        # An operator's fixed text: nothing to generate.
        messages = [] if first is not None and first.text is not None else build()
        request = GenerationRequest(
            request_id=f"{ctx.call_id}-t{self.index}",
            messages=messages,
            sampling=ctx.sampling,
            session_key=ctx.llm_session_key or ctx.call_id,  # a replica pool keeps the call on one replica
        )
        self.request = request
        segmenter = SentenceSegmenter(max_words=ctx.sentence_max_words, first_clause_words=ctx.first_clause_words)
        policy = ctx.reply_policy
        if first is not None and first.text is not None:
            # An operator's fixed text is said whole (no sentence cap), still
            # never with a sentence twice.
            policy = dataclasses.replace(policy, max_sentences=0)
        goes_on = first is not None and first.goes_on
        if goes_on:
            policy = dataclasses.replace(policy, fallback="")
        guard = ReplyGuard.for_turn(policy, self.user_text, ctx.previous_reply)
        first_needs_generating = first is None or first.text is None
        can_refit = ctx.prompt_too_long is not None
        cancelled = False
        failed: str | None = None
        try:
            stopped = False
            pieces = 0  # of the reply, from the segmenter
            # aclosing: a reply the guard ends aborts its generation in the engine.
            if first is not None and first.text is not None:
                source = _fixed(first.text)
            elif ctx.first_sentences is not None:
                # Steps aside for other calls' first sentences once its own is
                # out; an engine that dies mid-reply: the next one carries it on.
                source = stream_yielding(
                    ctx.engine, request, self._should_yield, self._step_aside, refit=refit if can_refit else None
                )
            else:
                source = stream_continuing(ctx.engine, request, refit=refit if can_refit else None)
            if self._waiting is not None and first_needs_generating:
                # One first sentence at a time where the cores are shared:
                # this reply starts when the turns ahead have theirs.
                self.lane_wait_s = await self._waiting.lane(self, lambda: self.committed)
            self._llm_asked = first_needs_generating
            async with contextlib.aclosing(source) as stream:
                async for delta in stream:
                    if self.times.llm_first_token is None:
                        self.times.llm_first_token = time.monotonic()
                    await self._out({"type": "response.delta", "turn": self.index, "text": delta})
                    for sentence in segmenter.push(delta):
                        # Only the reply's first piece can be a clause cut.
                        clause = segmenter.clause_cut and pieces == 0
                        pieces += 1
                        if not await self._sentence(sentence, guard, clause=clause):
                            stopped = True
                            break
                        if guard.full:
                            # The last sentence the reply may have is out: stop
                            # generating now, not one sentence later.
                            self.reply_end = STOP_LENGTH
                            stopped = True
                            break
                    if stopped:
                        break
            if not stopped:
                cut_by_cap = request.usage.completion_tokens >= request.max_tokens
                for sentence in segmenter.flush():
                    if not await self._sentence(sentence, guard, cut_by_cap=cut_by_cap):
                        break
            if not self.sent and guard.repeated_previous is not None and not self.talked_over and not goes_on:
                # All it had was the last reply said again: heard again, not
                # "Sorry, could you say that again?" for an answer the model
                # gave (a caller's "Okay, Monday then." got the fallback).
                await self._say(guard.repeated_previous)
            elif guard.said_nothing_but_loops and self.reply_end == "complete":
                self.reply_end = STOP_LOOP
            if not self.sent and policy.fallback:
                # Nothing went out: the caller hears the fallback, not
                # silence; reply_end still says why the reply had nothing.
                self.fell_back = True
                await self._say(policy.fallback)
        except asyncio.CancelledError:
            cancelled = True
            self.reply_end = "resumed" if self.premature else "cancelled"
        except Exception as exc:
            log.exception("LLM failed on call %s turn %d", ctx.call_id, self.index)
            failed = str(exc)
            self.reply_end = "failed"
            if isinstance(exc, EngineError):
                self.error_code = exc.code  # llm_unavailable while the engine restarts
            if not self.sent and policy.failure_line:
                # A phone caller hears no error event: without a line, a
                # failed engine is a dead line they wait on, then hang up.
                try:
                    await self._say(policy.failure_line)
                except asyncio.CancelledError:
                    cancelled = True
                    self.reply_end = "resumed" if self.premature else "cancelled"
        finally:
            if self._waiting is not None:
                self._waiting.leave(self)  # no first sentence came (or it came): the lane is free
        if not self.committed:
            # Aborted before the endpoint: nothing was sent, nothing happened.
            # Not one cancelled while its commit flushes what it held (a
            # client's response.cancel in that moment): the session has made
            # it the caller's turn, so it ends as a cancelled one.
            if cancelled and self.times.endpoint is None:
                raise asyncio.CancelledError
            try:
                await self._gate.wait()  # finished early: wait to be committed or aborted
            except asyncio.CancelledError:
                if self.times.endpoint is None:
                    raise  # aborted: the caller went on before the endpoint
                # Cancelled while its commit flushed what it held (the flush
                # waited on a slow socket): the caller's turn all the same,
                # or its words, response.done and metrics were lost.
                cancelled = True
                self.reply_end = "resumed" if self.premature else "cancelled"
                await self._gate.wait()  # set by the commit's end, however it ends
        self.times.done = time.monotonic()
        self.outcome_given = True
        ctx.finished(
            TurnOutcome(
                self.index,
                self.user_text,
                " ".join(self.sent),
                cancelled,
                replied=self.times.llm_first_token is not None,
                premature=self.premature,
                client_cancelled=self.client_cancelled,
                took_carry_over=self.carry_over is not None,
            )
        )
        await self._report(cancelled, failed)
        if cancelled:
            raise asyncio.CancelledError

    async def _sentence(self, text: str, guard: ReplyGuard, *, clause: bool = False, cut_by_cap: bool = False) -> bool:
        """Send one sentence (or the first clause, ``clause``) if the reply
        policy lets it out, as a voice says it (``without_markdown``); False ends
        the reply. ``cut_by_cap``: the token cap ended the generation, so
        an unfinished sentence is where it cut."""
        spoken, code = without_markdown(text)
        if cut_by_cap and not code and not is_complete(spoken):
            # The reply ends at its last whole sentence, not mid-word.
            self.reply_end = "token_cap"
            return False
        verdict = guard.check(spoken, clause=clause)
        if verdict not in (SEND, SKIP):
            self.reply_end = verdict
            return False
        if verdict == SEND:
            await self._say(spoken)
        if code:
            self.reply_end = STOP_CODE  # the rest is a code block: aborted, not read out
            return False
        return True

    async def _say(self, text: str) -> None:
        """Send one sentence of the reply (held until the turn is committed)."""
        if self.talked_over:
            return  # the caller cut in: nothing more of it goes to the voice
        first = not self.sent
        self.sent.append(text)
        if first and self.ctx.first_sentences is not None:
            self.ctx.first_sentences.done(self)
        await self._out({"type": "response.sentence", "turn": self.index, "index": len(self.sent) - 1,
                         "text": text, "first": first})  # fmt: skip

    def _hold_s(self) -> float:
        words = sum(len(sentence.split()) for sentence in self.sent)
        return hold_s(words, self.times.first_sentence, time.monotonic())

    def _should_yield(self) -> bool:
        waiting = self.ctx.first_sentences
        if waiting is None:
            return False
        if not self.sent:
            # A preemptive reply (its caller may still go on) before its first
            # sentence gives its lane to a turn whose endpoint has fired.
            return not self.committed and waiting.holds_lane(self) and waiting.endpointed_turn_waits
        # A hold too short to free the cores for anyone is not worth a
        # cancelled request and a prefill.
        return self._resume_hold_s() >= MIN_HOLD_S or (waiting.any_waiting and self._hold_s() >= MIN_HOLD_S)

    def _resume_hold_s(self) -> float:
        """How long the reply waits, its first sentence out, before it goes
        on: until its caller has had the resume grace to go on (a caller
        who does takes the reply back, voice/call/session.py), but never
        past the pacing of :func:`hold_s`. Once per reply; 0: no hold."""
        if not self.ctx.hold_for_resume or self._held_for_resume or len(self.sent) != 1:
            return 0.0
        grace_left = self.resume_grace_left(time.monotonic())
        if grace_left is None:  # a preemptive reply held back: the whole grace is still ahead
            grace_left = self.ctx.asr_config.resume_grace_s
        return max(0.0, min(grace_left, self._hold_s()))

    async def _step_aside(self) -> None:
        waiting = self.ctx.first_sentences
        assert waiting is not None
        if not self.sent:
            # Back in line (first when its own endpoint fires); it carries on
            # from what it has generated (llm/yielding.py).
            waiting.leave(self)
            self.lane_wait_s += await waiting.lane(self, lambda: self.committed)
            return
        resume_hold = self._resume_hold_s()
        if resume_hold >= MIN_HOLD_S:
            self._held_for_resume = True
            # Cancelled here if the caller goes on: nothing more generated.
            await asyncio.sleep(resume_hold)
            return
        await waiting.step_aside(self._hold_s())

    async def _report(self, cancelled: bool, failed: str | None) -> None:
        ctx = self.ctx
        if ctx.is_closed():
            return
        # No request: cancelled before its reply began (its words were told).
        usage = self.request.usage if self.request is not None else Usage()
        metrics: dict[str, Any] = {
            "type": "turn.metrics",
            "turn": self.index,
            **self.times.metrics(),
            "preemptive": self.preemptive,
            "wasted_generations": self.wasted_generations,
            "speculative_acceptance": usage.acceptance_rate,
            "draft_tokens": usage.draft_tokens,
            "accepted_tokens": usage.accepted_tokens,
            "completion_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
            "yields": usage.yields,
            "lane_wait_ms": round(self.lane_wait_s * 1000, 1),
            "reply_end": self.reply_end,
            "fallback": self.fell_back,
            "keys_only": self.keys_only,
        }
        with contextlib.suppress(Exception):
            if failed is not None:  # the detail was logged where it happened
                message = plain_error(self.error_code, self.index)
                # With its turn: a Realtime reply not yet asked for holds it
                # with the rest of its events (dropped unseen with them).
                await ctx.emit({"type": "error", "code": self.error_code, "message": message, "turn": self.index})
            await ctx.emit(
                {
                    "type": "response.done",
                    "turn": self.index,
                    "text": " ".join(self.sent),
                    "cancelled": cancelled or failed is not None,
                    "reply_end": self.reply_end,
                    "error_code": self.error_code if failed is not None else None,
                    "usage": usage.as_dict(),
                }
            )
            await ctx.emit(metrics)
        tracer = ctx.tracer
        if tracer is not None:
            try:
                error = "cancelled" if cancelled else (self.error_code if failed is not None else None)
                tracer.record_turn(ctx.call_id, self.index, self.times, metrics, error)
            except Exception:
                log.exception("tracing turn %d failed", self.index)  # traces are never worth a turn
