"""OpenAI-Realtime-compatible endpoint: ``ws://host/v1/realtime?model=…``.

A thin adapter like the carriers: Realtime client events become
:class:`CallSession` calls, session events become Realtime server events.
Both event vocabularies are spoken: the GA one by default, the beta one
(``response.text.delta``, ``conversation.item.created``…) when the client
connects with ``OpenAI-Beta: realtime=v1``, as the legacy SDK does.

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
"""

from __future__ import annotations

import itertools
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from streaming.playout import OutFormat
from voice.call.start import MAX_AUDIO_FRAME, Start
from voice.transports.media_json import WebSocketCall, b64decode, b64encode
from voice.transports.telephony import MalformedMessage

log = logging.getLogger(__name__)

PATH = "/v1/realtime"

# Session audio format -> (encoding, sample rate). GA names, then beta names.
GA_FORMATS: dict[str, tuple[str, int]] = {
    "audio/pcm": ("pcm16", 24000),
    "audio/pcmu": ("mulaw", 8000),
    "audio/pcma": ("alaw", 8000),
}
BETA_FORMATS: dict[str, str] = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
BETA_NAMES: dict[str, str] = {
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "conversation.item.added": "conversation.item.created",
}
# Reply audio per output_audio.delta: 100 ms.
OUT_CHUNK_S = 0.1
MAX_INSTRUCTIONS = 8 * 1024
MAX_OUTPUT_TOKENS = 1024
_ids = itertools.count(1)


class RealtimeError(MalformedMessage):
    """A client event we refuse, with the Realtime error code and param."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


# conversation.item.create: text messages only, as context for the audio turns.
CONTEXT_ROLES = ("user", "assistant", "system")
TEXT_PARTS = ("input_text", "text", "output_text")
MAX_CONTEXT_CHARS = 8192


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class RealtimeSettings:
    """The session as the client configured it (GA field names)."""

    model: str = "firstline"
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    instructions: str | None = None
    input_format: str = "audio/pcm"
    output_format: str = "audio/pcm"
    # None: push-to-talk. {"type": "server_vad" | "semantic_vad", ...}.
    turn_detection: dict[str, Any] | None = field(default_factory=lambda: {"type": "server_vad"})
    transcription: dict[str, Any] | None = None
    voice: str = "default"
    max_output_tokens: int | None = None

    @property
    def audio_out(self) -> bool:
        return "audio" in self.output_modalities

    @property
    def auto_respond(self) -> bool:
        td = self.turn_detection
        return td is not None and td.get("create_response", True) is not False


@dataclass
class Response:
    """One reply as the client sees it: a response holding one assistant item."""

    turn: int
    id: str = field(default_factory=lambda: new_id("resp"))
    item_id: str = field(default_factory=lambda: new_id("item"))
    user_item_id: str = ""
    released: bool = False
    dropped: bool = False
    started: bool = False
    held: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    done: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    cancel_reason: str = "turn_detected"


def _format_obj(name: str) -> dict[str, Any]:
    rate = GA_FORMATS[name][1]
    return {"type": name, "rate": rate} if name == "audio/pcm" else {"type": name}


class RealtimeCall(WebSocketCall):
    transport = "realtime"
    dispatch_key = "type"
    echoes_marks = False  # no marks: the playout clock and conversation.item.truncate say what was heard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        request = getattr(self.ws, "request", None)
        headers = request.headers if request is not None else {}
        self.beta = "realtime=v1" in str(headers.get("OpenAI-Beta", "")).replace(" ", "")
        self.settings = RealtimeSettings(model=_query_param(request.path if request else "", "model") or "firstline")
        self.session_id = new_id("sess")
        self._responses: dict[int, Response] = {}
        self._user_items: dict[int, str] = {}
        self._next_user_item = new_id("item")
        self._last_item_id: str | None = None
        self._partial_sent: dict[int, str] = {}
        self._response_requested = False

    # ---- session lifecycle ------------------------------------------------

    async def on_open(self) -> None:
        await self.send_event("session.created", session=self.session_object())

    def session_object(self) -> dict[str, Any]:
        s = self.settings
        if self.beta:
            beta_format = {v: k for k, v in BETA_FORMATS.items()}
            return {
                "id": self.session_id,
                "object": "realtime.session",
                "model": s.model,
                "modalities": ["text", "audio"] if s.audio_out else ["text"],
                "instructions": s.instructions or self.runtime.config.llm.system_prompt,
                "voice": s.voice,
                "input_audio_format": beta_format[s.input_format],
                "output_audio_format": beta_format[s.output_format],
                "input_audio_transcription": s.transcription,
                "turn_detection": s.turn_detection,
                "tools": [],
                "tool_choice": "auto",
                "temperature": 0.8,
                "max_response_output_tokens": s.max_output_tokens or "inf",
            }
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": s.model,
            "output_modalities": list(s.output_modalities),
            "instructions": s.instructions or self.runtime.config.llm.system_prompt,
            "audio": {
                "input": {
                    "format": _format_obj(s.input_format),
                    "transcription": s.transcription,
                    "noise_reduction": None,
                    "turn_detection": s.turn_detection,
                },
                "output": {"format": _format_obj(s.output_format), "voice": s.voice, "speed": 1.0},
            },
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": s.max_output_tokens or "inf",
        }

    async def _ensure_started(self) -> None:
        if self.session.started:
            return
        s = self.settings
        encoding, rate = GA_FORMATS[s.input_format]
        td = s.turn_detection
        silence_ms = td.get("silence_duration_ms") if td and td.get("type") == "server_vad" else None
        start = Start(
            encoding=encoding,
            sample_rate=rate,
            system_prompt=s.instructions,
            metadata={"model": s.model, "realtime_session": self.session_id},
            endpoint_silence_s=None if silence_ms is None else silence_ms / 1000.0,
            max_tokens=s.max_output_tokens,
            auto_turns=td is not None,
        )
        out = None
        if s.audio_out:
            out_encoding, out_rate = GA_FORMATS[s.output_format]
            sample_bytes = 2 if out_encoding == "pcm16" else 1
            out = OutFormat(out_encoding, out_rate, chunk_bytes=round(out_rate * OUT_CHUNK_S) * sample_bytes)
        await self.begin(start, out)

    # ---- client events ----------------------------------------------------

    async def on_session_update(self, msg: dict[str, Any]) -> None:
        update = msg.get("session")
        if not isinstance(update, dict):
            raise RealtimeError("'session' missing or not an object", "missing_required_parameter", "session")
        new = _apply_update(self.settings, update)
        if self.session.started:
            old = self.settings
            locked = [
                name
                for name, before, after in (
                    ("input audio format", old.input_format, new.input_format),
                    ("output audio format", old.output_format, new.output_format),
                    ("output modalities", old.audio_out, new.audio_out),
                    ("turn_detection", _td_kind(old.turn_detection), _td_kind(new.turn_detection)),
                )
                if before != after
            ]
            if locked:
                raise RealtimeError(
                    f"cannot change {', '.join(locked)} after audio has started; open a new session",
                    "session_locked",
                    "session",
                )
            if new.instructions and new.instructions != old.instructions:
                self.session.set_system_prompt(new.instructions)
            if new.max_output_tokens:
                self.session.max_tokens = new.max_output_tokens
        self.settings = new
        await self.send_event("session.updated", session=self.session_object())

    async def on_input_audio_buffer_append(self, msg: dict[str, Any]) -> None:
        audio = b64decode(msg.get("audio"), "audio")
        await self._ensure_started()
        step = MAX_AUDIO_FRAME // 2 - (MAX_AUDIO_FRAME // 2) % 2
        for offset in range(0, len(audio), step):
            await self.audio(audio[offset : offset + step])

    async def on_input_audio_buffer_commit(self, msg: dict[str, Any]) -> None:
        if not self.session.started or not await self.session.commit():
            raise RealtimeError(
                "buffer has no speech to commit", "input_audio_buffer_commit_empty", "input_audio_buffer"
            )

    async def on_input_audio_buffer_clear(self, msg: dict[str, Any]) -> None:
        self.session.clear_input()
        await self.send_event("input_audio_buffer.cleared")

    async def on_response_create(self, msg: dict[str, Any]) -> None:
        held = [r for r in self._responses.values() if not r.released and not r.dropped]
        if held:
            await self._release(held[-1])
        elif self.session.started:
            # The transcript of the committed turn is still being decoded:
            # release its reply the moment it exists.
            self._response_requested = True
        else:
            raise RealtimeError(
                "no input to respond to: firstline answers the caller's audio turns", "no_input", "response"
            )

    async def on_response_cancel(self, msg: dict[str, Any]) -> None:
        wanted = msg.get("response_id")
        live = [r for r in self._responses.values() if r.done is None and not r.dropped]
        if wanted is not None:
            live = [r for r in live if r.id == wanted]
        if not live or not self.session.cancel_reply():
            raise RealtimeError("no response in progress to cancel", "response_cancel_not_active", "response_id")
        live[-1].cancel_reason = "client_cancelled"
        if self.playout is not None:
            self.playout.interrupt(by_clock=True)

    async def on_conversation_item_truncate(self, msg: dict[str, Any]) -> None:
        item_id = msg.get("item_id")
        audio_end_ms = msg.get("audio_end_ms")
        if isinstance(audio_end_ms, bool) or not isinstance(audio_end_ms, int | float) or audio_end_ms < 0:
            raise RealtimeError("'audio_end_ms' must be a non-negative number", "invalid_value", "audio_end_ms")
        response = next((r for r in self._responses.values() if r.item_id == item_id), None)
        if response is None:
            raise RealtimeError(f"no assistant item {str(item_id)[:40]!r}", "item_not_found", "item_id")
        if self.playout is not None:
            heard, budget = [], audio_end_ms / 1000.0
            for text, seconds in self.playout.duration_s(response.turn):
                if seconds > budget + 0.05:
                    break
                heard.append(text)
                budget -= seconds
            self.session.reply_heard(response.turn, " ".join(heard))
        await self.send_event(
            "conversation.item.truncated", item_id=item_id, content_index=msg.get("content_index", 0),
            audio_end_ms=audio_end_ms,
        )  # fmt: skip

    async def on_conversation_item_create(self, msg: dict[str, Any]) -> None:
        """Text messages as context (a CRM note, an earlier exchange, extra
        instructions): they join the conversation the next audio turn is
        answered in. Replies are to the caller's audio, so a text item does
        not start one; other item types are refused with an error."""
        item = msg.get("item")
        if not isinstance(item, dict):
            raise RealtimeError("'item' must be an object", "invalid_value", "item")
        if item.get("type", "message") != "message":
            raise RealtimeError(
                f"item type {str(item.get('type'))[:32]!r} is not supported: only text messages (context)",
                "unsupported_item_type",
                "item.type",
            )
        role = item.get("role")
        if role not in CONTEXT_ROLES:
            raise RealtimeError("'item.role' must be user, assistant or system", "invalid_value", "item.role")
        content = item.get("content")
        parts = content if isinstance(content, list) else []
        texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") in TEXT_PARTS]
        if not parts or len(texts) != len(parts) or not all(isinstance(t, str) for t in texts):
            raise RealtimeError(
                "'item.content' must be a list of text parts (input_text, text, output_text)",
                "unsupported_content",
                "item.content",
            )
        text = " ".join(texts).strip()
        if not text or len(text) > MAX_CONTEXT_CHARS:
            raise RealtimeError(f"item text must be 1..{MAX_CONTEXT_CHARS} characters", "invalid_value", "item.content")
        try:
            self.session.add_context(role, text)
        except ValueError as exc:
            raise RealtimeError(str(exc), "context_too_large", "item.content") from None
        item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
        previous = self._last_item_id
        created = {
            "id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
            "content": parts,
        }  # fmt: skip
        await self.send_event("conversation.item.added", previous_item_id=previous, item=created)
        if not self.beta:
            await self.send_event("conversation.item.done", previous_item_id=previous, item=created)
        self._last_item_id = item_id

    async def on_malformed(self, exc: MalformedMessage) -> None:
        code = exc.code if isinstance(exc, RealtimeError) else "invalid_event"
        param = exc.param if isinstance(exc, RealtimeError) else None
        event_id = (self.last_message or {}).get("event_id")
        self.last_message = None
        await self.send_event(
            "error",
            error={
                "type": "invalid_request_error",
                "code": code,
                "message": str(exc),
                "param": param,
                "event_id": event_id if isinstance(event_id, str) else None,
            },
        )

    # ---- session events -> Realtime events ------------------------------------

    async def _on_session_event(self, ev: dict[str, Any]) -> None:
        # Replies not yet asked for (response.create) are held here, before
        # the base class would speak them.
        turn = ev.get("turn")
        response = self._responses.get(turn) if isinstance(turn, int) else None
        kind = ev.get("type")
        if response is not None and kind in ("response.delta", "response.sentence", "response.done", "turn.metrics"):
            if response.dropped:
                if kind == "response.done":
                    self.session.reply_heard(response.turn, "")  # never asked for: never said
                return
            if not response.released:
                response.held.append(ev)
                return
        await super()._on_session_event(ev)

    async def on_session_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        turn = ev.get("turn")
        if kind == "speech.started":
            await self._on_speech_started(ev)
        elif kind == "transcript.partial" and isinstance(turn, int):
            await self._on_partial(turn, str(ev.get("text", "")))
        elif kind == "transcript.final" and isinstance(turn, int):
            await self._on_final(turn, str(ev.get("text", "")), int(ev.get("audio_end_ms") or 0))
        elif kind == "response.delta" and isinstance(turn, int):
            response = self._responses.get(turn)
            if response is not None:
                await self._start_response(response)
                response.text += str(ev.get("text", ""))
                name = "response.output_text.delta"
                if self.settings.audio_out:
                    name = "response.output_audio_transcript.delta"
                await self.send_event(name, **self._content_ref(response), delta=ev.get("text", ""))
        elif kind == "response.done" and isinstance(turn, int):
            response = self._responses.get(turn)
            if response is not None:
                response.done = ev
        elif kind == "turn.metrics" and isinstance(turn, int):
            response = self._responses.get(turn)
            if response is not None and response.done is not None:
                response.metrics = ev
                if self.playout is not None:
                    self.playout.then(lambda r=response: self._finish_response(r))
                else:
                    await self._finish_response(response)
        elif kind == "error":
            code = str(ev.get("code", "server_error"))
            if code == "asr_failed":
                await self.send_event(
                    "conversation.item.input_audio_transcription.failed", item_id=self._next_user_item,
                    content_index=0, error={"type": "server_error", "code": code, "message": ev.get("message")},
                )  # fmt: skip
            await self.send_event(
                "error", error={"type": "server_error", "code": code, "message": ev.get("message"), "param": None,
                                "event_id": None},
            )  # fmt: skip

    async def _on_speech_started(self, ev: dict[str, Any]) -> None:
        if self.settings.turn_detection is None:
            return  # push-to-talk: the client has no VAD events
        await self.send_event(
            "input_audio_buffer.speech_started", audio_start_ms=ev.get("audio_ms", 0), item_id=self._next_user_item
        )

    async def _on_partial(self, turn: int, text: str) -> None:
        before = self._partial_sent.get(turn, "")
        if not text.startswith(before) or len(text) == len(before):
            return  # a revision: deltas only append; .completed has the final words
        self._partial_sent[turn] = text
        await self.send_event(
            "conversation.item.input_audio_transcription.delta", item_id=self._next_user_item, content_index=0,
            delta=text[len(before):],
        )  # fmt: skip

    async def _on_final(self, turn: int, text: str, audio_end_ms: int) -> None:
        item_id = self._next_user_item
        self._next_user_item = new_id("item")
        self._partial_sent.pop(turn, None)
        previous = self._last_item_id
        # An older reply the client never asked for is not part of the
        # conversation; drop it (its history entry goes when its turn ends).
        for old in self._responses.values():
            if not old.released:
                old.dropped = True
                old.held.clear()
        self._prune()
        if self.settings.turn_detection is not None:
            await self.send_event("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=item_id)
        await self.send_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        await self.send_event(
            "conversation.item.added",
            previous_item_id=previous,
            item={
                "id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": text}],
            },
        )  # fmt: skip
        await self.send_event(
            "conversation.item.input_audio_transcription.completed", item_id=item_id, content_index=0,
            transcript=text, usage={"type": "duration", "seconds": 0},
        )  # fmt: skip
        self._last_item_id = item_id
        response = Response(turn, user_item_id=item_id)
        self._responses[turn] = response
        if self.settings.auto_respond or self._response_requested:
            self._response_requested = False
            response.released = True
            await self._start_response(response)

    async def _release(self, response: Response) -> None:
        response.released = True
        await self._start_response(response)
        held, response.held = response.held, []
        for ev in held:
            await super()._on_session_event(ev)

    async def _start_response(self, response: Response) -> None:
        if response.started:
            return
        response.started = True
        await self.send_event("response.created", response=self._response_obj(response, "in_progress"))
        item = self._item_obj(response, "in_progress")
        await self.send_event("response.output_item.added", response_id=response.id, output_index=0, item=item)
        await self.send_event("conversation.item.added", previous_item_id=response.user_item_id, item=item)
        await self.send_event("response.content_part.added", **self._content_ref(response), part=self._part(""))
        self._last_item_id = response.item_id

    async def _finish_response(self, response: Response) -> None:
        if not response.started:
            await self._start_response(response)
        done = response.done or {}
        status = "cancelled" if done.get("cancelled") else "completed"
        text = str(done.get("text") or response.text)
        ref = self._content_ref(response)
        if self.settings.audio_out:
            await self.send_event("response.output_audio.done", **ref)
            await self.send_event("response.output_audio_transcript.done", **ref, transcript=text)
        else:
            await self.send_event("response.output_text.done", **ref, text=text)
        await self.send_event("response.content_part.done", **ref, part=self._part(text))
        item = self._item_obj(response, "completed" if status == "completed" else "incomplete", text)
        await self.send_event("response.output_item.done", response_id=response.id, output_index=0, item=item)
        if not self.beta:
            await self.send_event("conversation.item.done", item=item)
        body = self._response_obj(response, status, [item])
        if status == "cancelled":
            body["status_details"] = {"type": "cancelled", "reason": response.cancel_reason}
        usage = done.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        body["usage"] = {
            "total_tokens": prompt + completion,
            "input_tokens": prompt,
            "output_tokens": completion,
            "input_token_details": {"cached_tokens": int(usage.get("cached_tokens") or 0)},
        }
        body["metadata"] = self._metadata(response)
        await self.send_event("response.done", response=body)
        self._responses.pop(response.turn, None)

    def _metadata(self, response: Response) -> dict[str, str]:
        """firstline's per-turn timings, as Realtime metadata (≤ 16 string values)."""
        metrics = {k: v for k, v in (response.metrics or {}).items() if k.endswith("_ms") and v is not None}
        metrics.update({k: v for k, v in self.audio_metrics.get(response.turn, {}).items() if k == "ttfa_ms"})
        return {f"firstline_{k}": str(v) for k, v in list(metrics.items())[:16]}

    # ---- shapes -------------------------------------------------------------

    def _content_ref(self, response: Response) -> dict[str, Any]:
        return {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}

    def _part(self, text: str) -> dict[str, Any]:
        if self.settings.audio_out:
            return {"type": "audio", "transcript": text}
        return {"type": "text", "text": text}

    def _item_obj(self, response: Response, status: str, text: str = "") -> dict[str, Any]:
        content: dict[str, Any] = {"type": "output_text", "text": text}
        if self.settings.audio_out:
            content = {"type": "output_audio", "transcript": text}
        return {"id": response.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": [content] if text or status != "in_progress" else []}  # fmt: skip

    def _response_obj(self, response: Response, status: str, output: list[Any] | None = None) -> dict[str, Any]:
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": None,
            "output": output or [],
            "conversation_id": self.session_id,
            "output_modalities": list(self.settings.output_modalities),
            "metadata": None,
            "usage": None,
        }

    def _prune(self) -> None:
        # Finished or dropped responses whose turn is long gone: bounded memory.
        while len(self._responses) > 8:
            self._responses.pop(next(iter(self._responses)))

    # ---- wire -------------------------------------------------------------

    async def send_event(self, kind: str, **fields: Any) -> None:
        if self.beta:
            kind = BETA_NAMES.get(kind, kind)
        await self.send_json({"type": kind, "event_id": f"event_{next(_ids)}", **fields})

    async def send_audio(self, chunk: bytes) -> None:
        turn = self.playout.current_turn if self.playout is not None else None
        response = self._responses.get(turn) if turn is not None else None
        if response is None:
            return
        await self.send_event("response.output_audio.delta", **self._content_ref(response), delta=b64encode(chunk))


def _query_param(path: str, key: str) -> str | None:
    _, _, query = path.partition("?")
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == key and value:
            return value[:128]
    return None


def _td_kind(td: dict[str, Any] | None) -> str | None:
    return None if td is None else str(td.get("type"))


def _apply_update(current: RealtimeSettings, update: dict[str, Any]) -> RealtimeSettings:
    """``current`` with a GA or beta ``session.update`` applied; raises
    :class:`RealtimeError` on a value we cannot serve."""
    new = RealtimeSettings(**{f: getattr(current, f) for f in current.__dataclass_fields__})
    modalities = update.get("output_modalities", update.get("modalities"))
    if modalities is not None:
        if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"text", "audio"}:
            raise RealtimeError("output_modalities must be ['text'] or ['audio']", "invalid_value", "output_modalities")
        new.output_modalities = ["audio"] if "audio" in modalities else ["text"]
    if "instructions" in update:
        text = update["instructions"]
        if text is not None and (not isinstance(text, str) or len(text) > MAX_INSTRUCTIONS):
            raise RealtimeError(f"instructions must be a string of at most {MAX_INSTRUCTIONS} chars",
                                "invalid_value", "instructions")  # fmt: skip
        new.instructions = text or None
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in update:
            value = update[key]
            if value == "inf" or value is None:
                new.max_output_tokens = None
            elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
                raise RealtimeError(f"{key} must be 1..{MAX_OUTPUT_TOKENS} or 'inf'", "invalid_value", key)
            else:
                new.max_output_tokens = value
    if isinstance(update.get("voice"), str):
        new.voice = update["voice"][:64]
    audio = update.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise RealtimeError("'audio' must be an object", "invalid_value", "audio")
    audio = audio or {}
    audio_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
    audio_out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
    # Formats: GA objects, or beta strings.
    for attr, ga_value, beta_key in (
        ("input_format", audio_in.get("format"), "input_audio_format"),
        ("output_format", audio_out.get("format"), "output_audio_format"),
    ):
        if ga_value is not None:
            setattr(new, attr, _ga_format(ga_value, f"audio.{attr.split('_')[0]}.format"))
        elif beta_key in update:
            name = update[beta_key]
            if name not in BETA_FORMATS:
                raise RealtimeError(f"{beta_key} must be one of {', '.join(BETA_FORMATS)}", "invalid_value", beta_key)
            setattr(new, attr, BETA_FORMATS[name])
    if isinstance(audio_out.get("voice"), str):
        new.voice = audio_out["voice"][:64]
    # Turn detection.
    if "turn_detection" in audio_in or "turn_detection" in update:
        td = audio_in["turn_detection"] if "turn_detection" in audio_in else update["turn_detection"]
        new.turn_detection = _turn_detection(td)
    if "transcription" in audio_in or "input_audio_transcription" in update:
        tr = audio_in["transcription"] if "transcription" in audio_in else update["input_audio_transcription"]
        if tr is not None and not isinstance(tr, dict):
            raise RealtimeError("transcription must be an object or null", "invalid_value", "transcription")
        new.transcription = tr
    return new


def _ga_format(value: object, param: str) -> str:
    if not isinstance(value, dict) or value.get("type") not in GA_FORMATS:
        raise RealtimeError(f"{param}.type must be one of {', '.join(GA_FORMATS)}", "invalid_value", param)
    name = str(value["type"])
    rate = value.get("rate")
    if rate is not None and rate != GA_FORMATS[name][1]:
        raise RealtimeError(f"{name} is served at {GA_FORMATS[name][1]} Hz only", "invalid_value", param + ".rate")
    return name


def _turn_detection(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
        raise RealtimeError("turn_detection.type must be server_vad, semantic_vad or null", "invalid_value",
                            "turn_detection")  # fmt: skip
    silence = value.get("silence_duration_ms")
    if silence is not None and (
        isinstance(silence, bool) or not isinstance(silence, int | float) or not 100 <= silence <= 5000
    ):
        raise RealtimeError("silence_duration_ms must be 100..5000", "invalid_value",
                            "turn_detection.silence_duration_ms")  # fmt: skip
    return {k: v for k, v in value.items() if isinstance(k, str)}


handle_realtime = RealtimeCall.handle
