"""OpenAI-Realtime-compatible endpoint: ``ws://host/v1/realtime?model=…``.

A thin adapter like the carriers: Realtime client events become
:class:`CallSession` calls, session events become Realtime server events.
Both event vocabularies are spoken: the GA one by default, the beta one
(``response.text.delta``, ``conversation.item.created``…) when the client
connects with ``OpenAI-Beta: realtime=v1``, as the legacy SDK does (from a
browser: the ``openai-beta.realtime-v1`` subprotocol).

What maps to what (see docs/realtime.md for the full table):

* ``input_audio_buffer.append`` (``audio/pcm`` 24 kHz, ``audio/pcmu``,
  ``audio/pcma``; beta ``pcm16`` / ``g711_ulaw`` / ``g711_alaw``) feeds the
  session; the call starts on the first append, in the format configured by
  then.
* ``turn_detection`` ``server_vad`` with ``silence_duration_ms``: a fixed
  endpoint window; without it, or ``semantic_vad``: firstline's adaptive
  endpointing; ``null``: push-to-talk, the client commits.
* Partial transcripts become ``conversation.item.input_audio_transcription.delta``
  (only words that extend what was already sent: a delta cannot take words
  back; ``.completed`` carries the final transcript).
* Reply text streams as ``response.output_text.delta`` (text modality) or
  ``response.output_audio_transcript.delta`` next to
  ``response.output_audio.delta`` (audio modality, the embedded TTS,
  sentence 1 spoken while the LLM writes sentence 2).
* ``response.done`` carries firstline's per-turn timings in
  ``response.metadata`` (strings, as the schema wants): ``ttfs_ms`` and the
  stage split, ``ttfa_ms`` with audio.
* ``create_response: false`` or push-to-talk: the reply is generated at
  once but held until ``response.create`` (a free head start); a reply never
  asked for is dropped from the conversation.
* Barge-in: the caller's speech cancels the reply (``response.done``
  ``cancelled``); ``conversation.item.truncate`` with ``audio_end_ms`` tells
  the server how much of the reply's audio was played, and the history keeps
  only those sentences.

Bad or unknown client events get an ``error`` event naming the client's
``event_id``; the session goes on.

One module per client event family, one small handler per event
(``session``, ``input_audio_buffer``, ``conversation``, ``response``); this
module holds the connection's state and turns session events into Realtime
server events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from streaming.playout import OutFormat
from voice.call.audio_budget import frame_seconds
from voice.call.session import SESSION_CLOSED
from voice.call.start import RESUME_TOKEN, Start, new_resume_token
from voice.server.limits import source_allowance
from voice.transports.media_json import WebSocketCall, b64encode, header_values, query_param
from voice.transports.realtime import conversation, input_audio_buffer, session
from voice.transports.realtime import response as response_family
from voice.transports.realtime.protocol import (
    BETA_NAMES,
    GA_FORMATS,
    OUT_CHUNK_S,
    PATH,
    UNSPOKEN_REPLIES_PER_S,
    UNSPOKEN_REPLY_BURST,
    RealtimeError,
    new_id,
)
from voice.transports.realtime.response import Response
from voice.transports.realtime.session import RealtimeSettings, turn_taking
from voice.transports.telephony import MalformedMessage, TooManyEvents

log = logging.getLogger(__name__)
# conversation.item.retrieve answers for this many of the newest items.
MAX_ITEMS_KEPT = 64  # a client asks for its newest; each may hold a text item's 8 KB

__all__ = ["PATH", "RealtimeCall", "handle_realtime"]

Handler = Callable[["RealtimeCall", dict[str, Any]], Awaitable[None]]
# Client event type -> its handler, family by family.
HANDLERS: dict[str, Handler] = {
    "session.update": session.session_update,
    **input_audio_buffer.HANDLERS,
    **conversation.HANDLERS,
    **response_family.HANDLERS,
}
_ids = itertools.count(1)
# How long a response.create deferred to an empty turn waits for that turn's
# task to wind down (it is on its last step when it says the turn was empty).
DEFERRED_CREATE_WAIT_S = 5.0
# What OpenAI's browser clients offer for the beta vocabulary.
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"


class RealtimeCall(WebSocketCall):
    transport = "realtime"
    dispatch_key = "type"
    echoes_marks = False  # no marks: the playout clock and conversation.item.truncate say what was heard
    unmetered_events = frozenset({"input_audio_buffer.append"})
    refuse_bad_start = False  # an error event says why
    says_asr_failures = False  # transcription.failed: the client decides what the caller hears
    # The session is the connection (session.created at open); its call
    # starts with the first audio, which a client may hold back for long.
    starts_with_message = False
    # A clean close is how a Realtime session ends: it finishes the engine's
    # session (a dropped socket, connection_lost, keeps it for the resume).
    closed_reason = SESSION_CLOSED

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session.answers_unasked = False  # each reply is the client's to create
        request = getattr(self.ws, "request", None)
        # The beta vocabulary: the OpenAI-Beta header, or from a browser
        # (which cannot set headers) the subprotocol OpenAI's clients offer.
        self.beta = "realtime=v1" in [v.replace(" ", "") for v in header_values(request, "OpenAI-Beta")] or (
            BETA_SUBPROTOCOL in header_values(request, "Sec-WebSocket-Protocol")
        )
        self.settings = RealtimeSettings(model=query_param(request.path if request else "", "model") or "firstline")
        self.session_id = new_id("sess")
        # Re-attach (docs/scaling.md): ?resume=<the resume_token of an earlier
        # session.created> picks up that call's conversation.
        given = query_param(request.path if request else "", "resume")
        self.bad_resume = given is not None and not RESUME_TOKEN.fullmatch(given)
        self.resuming = given is not None and not self.bad_resume
        self.resume_token = given if self.resuming else new_resume_token()
        self.responses: dict[int, Response] = {}
        self.unserved_logged = False  # a session.update's unserved fields were logged at INFO
        # The items the client was told of, as last sent (conversation.item.
        # added/done), for conversation.item.retrieve: OpenAI's agents SDKs
        # ask for every user item once its transcript is in. The newest
        # MAX_ITEMS_KEPT; a deleted item is forgotten.
        self.items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.next_user_item = new_id("item")
        self.last_item_id: str | None = None
        self._partial_sent: dict[int, str] = {}
        # The item speech_stopped named, until its transcript (or failure)
        # closes it; speech after the endpoint is the next item, or with
        # barge-in on reopens this one (see _on_speech_started).
        self._committing: str | None = None
        self.response_requested = False
        self.response_requested_event: object = None  # that response.create's event_id
        self._deferred_create: asyncio.Task[None] | None = None
        self._deferred_msg: dict[str, Any] = {"type": "response.create"}  # what a deferred create answers
        self._deferred_waiting = False  # that create still waits on the turn in flight
        # Replies asked for with no caller turn behind them (response.create
        # on the conversation as it stands). Each is an LLM generation; a
        # client looping create/cancel could otherwise keep the engine busy
        # for every other call, and with no audio it never counts as a
        # fast feeder (streaming/fair_share.py).
        # Kept per source address: a client reconnecting got a fresh burst
        # each time, as many at once as it may hold calls.
        self.unspoken_replies = source_allowance(
            self.ws, "realtime_unspoken_replies", UNSPOKEN_REPLY_BURST, UNSPOKEN_REPLIES_PER_S
        )

    def handler_for(self, event: str) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
        handler = HANDLERS.get(event)
        if handler is None:
            return None

        async def bound(msg: dict[str, Any]) -> None:
            await handler(self, msg)

        return bound

    # ---- session lifecycle ------------------------------------------------

    async def on_open(self) -> None:
        unknown = False
        if self.resuming:
            # Claimed now, before session.created names the token: a token
            # nothing is stored under is replaced, and from here on a
            # connection this one replaces can no longer write the call.
            claim = Start(resume_key=f"realtime:{self.resume_token}", resume_token=self.resume_token)
            await self.session.reattach(claim)
            assert claim.resume_token is not None
            unknown = claim.resume_token != self.resume_token
            self.resume_token = claim.resume_token
        await self.send_event("session.created", session={**self.session_object(), "resume_token": self.resume_token})
        if self.bad_resume or unknown:  # a fresh call, said so: nothing is lost by a mangled token
            error = {
                "type": "invalid_request_error",
                "code": "invalid_resume_token" if self.bad_resume else "unknown_resume_token",
                "message": "'resume' is not a resume_token; this is a new conversation"
                if self.bad_resume
                else "nothing is stored under 'resume' (expired, hung up, ended by the server, or not ours); "
                "this is a new conversation under session.resume_token",
                "param": "resume",
                "event_id": None,
            }
            await self.send_event("error", error=error)

    def session_object(self) -> dict[str, Any]:
        return session.session_object(self)

    def input_seconds(self, payload_bytes: int) -> float:
        """Seconds of audio in ``payload_bytes`` of the input format."""
        encoding, rate = GA_FORMATS[self.settings.input_format]
        return frame_seconds(payload_bytes, encoding, rate)

    async def ensure_started(self) -> None:
        """The call starts on the first audio, in the format configured by then."""
        if self.session.started:
            return
        s = self.settings
        encoding, rate = GA_FORMATS[s.input_format]
        td = s.turn_detection
        silence_s, barge_in = turn_taking(td) if td is not None else (None, False)
        start = Start(
            encoding=encoding,
            sample_rate=rate,
            system_prompt=s.instructions,
            metadata={"model": s.model, "realtime_session": self.session_id},
            endpoint_silence_s=silence_s,
            auto_turns=td is not None,
            resume_key=f"realtime:{self.resume_token}",
            resume_token=self.resume_token,
            may_resume=False,  # a resumed session claimed its conversation at open
            server_greeting=False,  # the client greets with response.create, as on OpenAI
            # OpenAI stops a reply on speech only under its VAD, unless
            # interrupt_response is false: otherwise the client cancels.
            barge_in=barge_in,
        )
        out = None
        if s.audio_out:
            out_encoding, out_rate = GA_FORMATS[s.output_format]
            out = OutFormat.framed(out_encoding, out_rate, OUT_CHUNK_S)
        await self.begin(start, out)

    async def on_malformed(self, exc: MalformedMessage) -> None:
        code = exc.code if isinstance(exc, RealtimeError | TooManyEvents) else "invalid_event"
        param = exc.param if isinstance(exc, RealtimeError) else None
        event_id = (self.last_message or {}).get("event_id")
        self.last_message = None
        await self.client_error(code, str(exc), param, event_id)

    async def client_error(self, code: str, message: str, param: str | None, event_id: object) -> None:
        """An ``invalid_request_error`` about the client's event ``event_id``."""
        await self.send_event(
            "error",
            error={
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id if isinstance(event_id, str) else None,
            },
        )

    async def barge_in(self) -> None:
        # A reply whose audio the caller talked over ends cancelled
        # (turn_detected), even when its text was all written.
        turn = self.playing()
        await super().barge_in()
        response = self.responses.get(turn) if turn is not None else None
        if response is not None and not response.finished:
            response.cut_short = True

    def heard_so_far(self) -> dict[int, str]:
        """As the base class, and a reply held for a response.create that has
        not come (create_response false, push-to-talk) as not said: a
        snapshot or the end of the call saved it whole, and a client that
        re-attached with its resume token had a model that believed it had
        said what the client was never shown."""
        heard = super().heard_so_far()
        for response in self.responses.values():
            if not response.released and not response.dropped:
                heard.setdefault(response.turn, "")
        return heard

    # ---- session events -> Realtime events ------------------------------------

    async def _on_session_event(self, ev: dict[str, Any]) -> None:
        # Replies not yet asked for (response.create) are held here, before
        # the base class would speak them.
        turn = ev.get("turn")
        response = self.responses.get(turn) if isinstance(turn, int) else None
        kind = ev.get("type")
        held_kinds = ("response.delta", "response.sentence", "response.done", "turn.metrics", "error")
        if response is not None and kind in held_kinds:
            if response.dropped:
                if kind == "response.done":
                    self.session.reply_heard(response.turn, "")  # never asked for: never said
                return
            if not response.released or response.draining:
                response.held.append(ev)
                return
        await self.forward(ev)

    async def forward(self, ev: dict[str, Any]) -> None:
        """A session event past the hold: the base class speaks replies."""
        await super()._on_session_event(ev)

    async def on_session_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        turn = ev.get("turn")
        if kind == "speech.started":
            await self._on_speech_started(ev)
        elif kind == "speech.stopped":
            await self._on_speech_stopped(int(ev.get("audio_end_ms") or 0), at_endpoint=True)
        elif kind == "transcript.partial" and isinstance(turn, int):
            await self._on_partial(turn, str(ev.get("text", "")))
        elif kind in ("transcript.final", "turn.empty") and isinstance(turn, int):
            await self._on_final(turn, str(ev.get("text", "")), int(ev.get("audio_end_ms") or 0))
        elif kind == "response.delta" and isinstance(turn, int):
            response = self.responses.get(turn)
            if response is not None:
                await response_family.start(self, response)  # opened at the first token, as before
        elif kind == "response.sentence" and isinstance(turn, int):
            # The text deltas are the sentences the caller is sent, not the
            # model's tokens: those include a sentence the reply guard left
            # out (a loop), the words past the sentence cap or a cut token
            # budget, and the deltas did not add up to the transcript in
            # response.done (a fallback sentence came on top of them).
            response = self.responses.get(turn)
            if response is not None:
                text = str(ev.get("text", ""))
                await response_family.delta(self, response, f" {text}" if response.text else text)
        elif kind == "response.done" and isinstance(turn, int):
            response = self.responses.get(turn)
            if response is not None:
                response.done = ev
        elif kind == "turn.resumed" and isinstance(turn, int):
            await self._on_resumed(turn)
        elif kind == "turn.metrics" and isinstance(turn, int):
            response = self.responses.get(turn)
            if response is not None and response.done is not None:
                response.metrics = ev
                if self.playout is not None:
                    self.playout.then(lambda r=response: response_family.finish(self, r))
                else:
                    await response_family.finish(self, response)
        elif kind == "error":
            code = str(ev.get("code", "server_error"))
            asked = code == "asr_failed" and self.response_requested
            if code == "asr_failed":
                await self._transcription_failed(code, ev.get("message"))
            else:
                await self.send_event(
                    "error", error={"type": "server_error", "code": code, "message": ev.get("message"),
                                    "param": None, "event_id": None},
                )  # fmt: skip
            if asked:
                self._defer_create()

    async def _commit_user_item(self, item_id: str, previous: str | None, transcript: str | None) -> None:
        """The caller's audio item goes into the conversation: committed,
        added and, in GA (which finalizes every item it adds, as client-made
        ones here), done at once (its transcript is in, or null: it failed)."""
        await self.send_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        item = {
            "id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": transcript}],
        }  # fmt: skip
        await self.send_event("conversation.item.added", previous_item_id=previous, item=item)
        if not self.beta:
            await self.send_event("conversation.item.done", previous_item_id=previous, item=item)

    async def _transcription_failed(self, code: str, message: object) -> None:
        """As OpenAI: the caller's item is committed and added (its
        transcript null) and then its transcription fails; no ``error``
        event (pipecat's client ends its session on any). It named an item
        the client had never been told of, and sent an error besides."""
        item_id = self._close_user_item()
        await self._commit_user_item(item_id, self.last_item_id, None)
        self.last_item_id = item_id
        await self.send_event(
            "conversation.item.input_audio_transcription.failed", item_id=item_id, content_index=0,
            error={"type": "server_error", "code": code, "message": message},
        )  # fmt: skip

    def input_cleared(self) -> None:
        """The client cleared the buffer: words heard so far belong to no
        item, and the next speech is a new one (its deltas start afresh; the
        turn number does not move on a clear, so the old words' prefix
        blocked every delta of the new ones). An item speech_stopped named is
        committed already and keeps its id."""
        self._partial_sent.clear()
        self.next_user_item = new_id("item")

    def input_committed(self, item_id: str) -> None:
        """The client's commit closed item ``item_id``: its transcript will
        carry that id, and speech from now on is the next item (its deltas
        named the committed one until the transcript was out). Nothing to do
        when the transcript is out already, or an endpoint named it."""
        if self._committing is None and self.next_user_item == item_id:
            self._committing, self.next_user_item = item_id, new_id("item")

    async def _on_speech_started(self, ev: dict[str, Any]) -> None:
        if self.settings.turn_detection is None:
            return  # push-to-talk: the client has no VAD events
        if self._committing is not None and ev.get("barge_in", True):
            # The caller talks over a turn whose transcript is not out: the
            # session stops it and its words lead this speech's turn, so this
            # is still that item (reopened), not a new one left unclosed.
            self.next_user_item, self._committing = self._committing, None
        await self.send_event(
            "input_audio_buffer.speech_started", audio_start_ms=ev.get("audio_ms", 0), item_id=self.next_user_item
        )

    async def _on_speech_stopped(self, audio_end_ms: int, at_endpoint: bool = False) -> None:
        """At the endpoint, before Whisper's final decode (OpenAI sends it when
        its VAD hears the end, then committed and the transcript). The item is
        closed to new audio from here: speech that starts before its
        transcript is the next item, and its speech_started says so (with
        barge-in off; with it on, that speech reopens the item)."""
        if self.settings.turn_detection is None:
            return
        if self._committing is not None and not at_endpoint:
            return  # sent at the endpoint already: this is its transcript
        # (Another endpoint while an item still waits for its transcript: with
        # barge-in off the session now stops that turn, and its words lead
        # this one's transcript. The new speech's item is the one committed.)
        self._committing, self.next_user_item = self.next_user_item, new_id("item")
        await self.send_event("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=self._committing)

    def _close_user_item(self) -> str:
        """The id of the user item a turn's end closes: the one speech_stopped
        named, else (a commit, the length cap, push-to-talk) the open one."""
        if self._committing is not None:
            item_id, self._committing = self._committing, None
        else:
            item_id, self.next_user_item = self.next_user_item, new_id("item")
        return item_id

    async def _on_partial(self, turn: int, text: str) -> None:
        before = self._partial_sent.get(turn, "")
        if not text.startswith(before) or len(text) == len(before):
            return  # a revision: deltas only append; .completed has the final words
        self._partial_sent[turn] = text
        await self.send_event(
            "conversation.item.input_audio_transcription.delta", item_id=self.next_user_item, content_index=0,
            delta=text[len(before):],
        )  # fmt: skip

    async def _on_final(self, turn: int, text: str, audio_end_ms: int) -> None:
        # Sent at the endpoint already, unless the turn ended otherwise (a
        # commit, the length cap): then now, with its transcript.
        await self._on_speech_stopped(audio_end_ms)
        item_id = self._close_user_item()
        # This turn's, and any earlier one's that never got a transcript (a
        # turn talked over or resumed): one entry per such turn, for hours.
        for old_turn in [t for t in self._partial_sent if t <= turn]:
            del self._partial_sent[old_turn]
        previous = self.last_item_id
        # An older reply the client never asked for is not part of the
        # conversation; drop it. Its history entry goes when its turn ends,
        # or now if it already has (its response.done was among the held).
        for old in self.responses.values():
            if not old.released and not old.dropped and not old.queued:
                response_family.drop(self, old)
        self.prune()
        await self._commit_user_item(item_id, previous, text)
        await self.send_event(
            "conversation.item.input_audio_transcription.completed", item_id=item_id, content_index=0,
            transcript=text, usage={"type": "duration", "seconds": 0},
        )  # fmt: skip
        self.last_item_id = item_id
        if not text:
            # The committed audio held no words (turn.empty): the item and its
            # empty transcript close the commit. A response.create sent while
            # it decoded is answered as one sent now, on the conversation as
            # it stands (OpenAI's API answers every create), so a client
            # waiting on its response.done is not left hanging.
            if self.response_requested:
                self._defer_create()
            return
        response = Response(turn, user_item_id=item_id, before_item_id=previous)
        self.responses[turn] = response
        if self.response_requested and response_family.own_instructions(self._deferred_msg):
            # The create asked for its own instructions, which this turn's
            # reply is written without: dropped unseen, and the create is
            # answered once this turn is over, with them.
            response.dropped = True
            self.session.cancel_reply()
            self._defer_create()
            return
        if self.settings.auto_respond or self.response_requested:
            self.response_requested = False
            self._deferred_msg = {"type": "response.create"}
            if response_family.in_progress(self):
                # The previous reply's audio still goes out (barge-in off):
                # this one is shown once that one's response.done is out.
                response.queued = True
                return
            response.released = True
            await response_family.start(self, response)

    async def _on_resumed(self, turn: int) -> None:
        """The caller went on within the resume grace: the server took their
        turn and its reply out of the conversation, and the words lead the
        next item's transcript. The client's conversation drops the two as
        well (conversation.item.deleted; the reply's once its response.done
        is out), or it held the caller's words twice and a reply the model
        never saw again."""
        response = self.responses.get(turn)
        if response is None or not response.user_item_id:
            return  # no transcript went out: the item was reopened instead
        await self.send_event("conversation.item.deleted", item_id=response.user_item_id)
        if self.last_item_id in (response.user_item_id, response.item_id):
            self.last_item_id = response.before_item_id
        if not response.released:
            response.dropped = True
            response.held.clear()
        elif response.finished:
            await self.send_event("conversation.item.deleted", item_id=response.item_id)
        else:
            response.retracted = True

    def defer_create(self, msg: dict[str, Any]) -> None:
        """Answer ``msg`` (a response.create) once the turn in flight is over."""
        self.response_requested_event = msg.get("event_id")
        self._deferred_msg = msg
        self._defer_create()

    def request_response(self, msg: dict[str, Any]) -> None:
        """Answer ``msg`` (a response.create) with the reply of the turn whose
        transcript is being decoded, released the moment it exists."""
        self.response_requested = True
        self.response_requested_event = msg.get("event_id")
        self._deferred_msg = msg

    def withdraw_request(self) -> bool:
        """response.cancel of a create not answered yet: forgotten. False when
        there is none (or its answer is already being sent)."""
        if self.response_requested:
            self.response_requested = False
        elif self._deferred_create is not None and not self._deferred_create.done() and self._deferred_waiting:
            self._deferred_create.cancel()
            self._deferred_waiting = False
        else:
            return False
        self.response_requested_event = None
        self._deferred_msg = {"type": "response.create"}
        return True

    def _defer_create(self) -> None:
        """A response.create waited for a turn that ended with no words (or
        whose transcription failed): the request does not carry over to the
        next turn; it is answered on the conversation as it stands, as OpenAI
        answers every create, so a client waiting on its response.done is not
        left hanging. Once the turn's own task is over (the event comes from
        inside it: answered now, it would only be deferred again)."""
        self.response_requested = False
        self._deferred_waiting = True
        # Held: the loop keeps only a weak reference to a task.
        self._deferred_create = asyncio.get_running_loop().create_task(self._answer_deferred_create())

    async def _answer_deferred_create(self) -> None:
        event_id = self.response_requested_event
        self.response_requested_event = None
        msg, self._deferred_msg = self._deferred_msg, {"type": "response.create"}
        with contextlib.suppress(TimeoutError):  # then create() says what is in progress
            async with asyncio.timeout(DEFERRED_CREATE_WAIT_S):
                while self.session.reply_in_flight():  # noqa: ASYNC110 - the turn's task has no event to wait on
                    await asyncio.sleep(0.01)
        self._deferred_waiting = False  # a cancel from here is the response's own
        if self.finished:
            return
        try:
            await response_family.create(self, msg)
        except RealtimeError as exc:
            await self.client_error(exc.code, str(exc), exc.param, event_id)
        except Exception as exc:  # the socket went meanwhile: nobody to answer
            log.debug("call %s: deferred response.create not answered (%r)", self.call_id, exc)

    def _keep_item(self, item: dict[str, Any]) -> None:
        self.items[str(item["id"])] = item
        self.items.move_to_end(str(item["id"]))
        while len(self.items) > MAX_ITEMS_KEPT:
            self.items.popitem(last=False)

    def prune(self) -> None:
        # Finished or dropped responses whose turn is long gone: bounded memory.
        while len(self.responses) > 8:
            self.responses.pop(next(iter(self.responses)))

    # ---- wire -------------------------------------------------------------

    async def send_event(self, kind: str, **fields: Any) -> None:
        if kind in ("conversation.item.added", "conversation.item.done"):
            self._keep_item(fields["item"])
        elif kind == "conversation.item.deleted":
            self.items.pop(str(fields["item_id"]), None)
        if self.beta:
            kind = BETA_NAMES.get(kind, kind)
        await self.send_json({"type": kind, "event_id": f"event_{next(_ids)}", **fields})

    async def send_audio(self, chunk: bytes) -> None:
        turn = self.playout.sending_turn if self.playout is not None else None
        response = self.responses.get(turn) if turn is not None else None
        if response is None:
            return
        # A reply with no text deltas (the reply policy's fallback sentence
        # after an empty generation) is opened here: response.created and
        # its item come before any of its audio.
        await response_family.start(self, response)
        if self.playout is not None:
            response.audio_sent_ms += 1000.0 * len(chunk) / self.playout.fmt.bytes_per_s
        await self.send_event(
            "response.output_audio.delta", **response_family.content_ref(response), delta=b64encode(chunk)
        )


handle_realtime = RealtimeCall.handle
