"""The ``response.*`` family: the client asks for or cancels a reply, and
the server side of a reply's life (created, deltas, done with firstline's
timings in its metadata)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from voice.call.turn import PLAIN_ERRORS, SpokenFirst
from voice.transports.realtime.protocol import (
    MAX_INSTRUCTIONS,
    UNSPOKEN_REPLIES_PER_S,
    UNSPOKEN_REPLY_BURST,
    RealtimeError,
    new_id,
    output_modalities,
)

if TYPE_CHECKING:
    from voice.transports.realtime.call import RealtimeCall


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
    # Released, its held events still going out: new ones queue behind them.
    draining: bool = False
    # The item before its caller's item, and whether the two left the
    # conversation (the caller went on: turn.resumed).
    before_item_id: str | None = None
    retracted: bool = False
    # Milliseconds of its audio sent (a truncate may name any point of it;
    # after a barge-in the playout keeps only the sentences wholly played).
    audio_sent_ms: float = 0.0
    text: str = ""
    done: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    cancel_reason: str = "turn_detected"
    # Its audio was stopped while it still played (barge-in, response.cancel
    # after the text was all written): response.done says cancelled.
    cut_short: bool = False
    # response.done is on the wire: nothing of it is in progress any more.
    finished: bool = False
    # Set once response.created and its item/part events are on the wire:
    # nothing of the reply may overtake them.
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    # Held (never shown), and the client changed the conversation since
    # (a text item, new instructions): written without that, it is not the
    # reply a response.create now asks for.
    stale: bool = False
    # Asked for (auto-respond, or a create) while another the client was
    # shown is in progress (written, its audio still going out: barge-in
    # off): released once that one's response.done is out. Two responses
    # in flight is what OpenAI refuses, and clients keep one at a time
    # (LiveKit's lost the second reply).
    queued: bool = False


# ---- client events ---------------------------------------------------------


async def create(call: RealtimeCall, msg: dict[str, Any]) -> None:
    _refuse_unserved(call, msg)
    instructions = _instructions(msg)
    if instructions:
        try:
            call.session.check_reply_instructions(instructions)
        except ValueError as exc:  # ContextTooLarge
            raise RealtimeError(str(exc), "context_too_large", "response.instructions") from None
    held = [r for r in call.responses.values() if not r.released and not r.dropped and not r.queued]
    if held and _caller_turn_coming(call, held[-1].turn):
        # A turn committed after the held reply's is still decoding: the
        # conversation now ends with it, so this create is for its reply
        # (the held one, never shown, is dropped at that transcript).
        call.request_response(msg)
        return
    if held and not held[-1].stale and instructions is None:
        if in_progress(call):
            held[-1].queued = True  # shown once the one in progress is done
            return
        await release(call, held[-1])
        return
    if held:
        # Written before the context the client added since (the usual
        # manual flow: commit, add what was looked up, then create), or
        # without the instructions this create gives: dropped unseen, its
        # generation stopped (the caller's words stay their turn), and this
        # create answers the conversation as it stands once that turn is over.
        drop(call, held[-1])
        call.session.cancel_reply()
        call.defer_create(msg)
        return
    waiting = call.session.reply_in_flight()
    if waiting and not any(r.done is None and not r.dropped for r in call.responses.values()):
        # The transcript of the committed turn is still being decoded:
        # release its reply the moment it exists.
        call.request_response(msg)
        return
    # A response whose text is written but whose audio still goes out is in
    # progress too (its response.done waits for the audio): a new one now
    # would send the old one's audio under the new one's ids. Once its
    # response.done is out, none of its audio is left to send: what the
    # client still plays is its own business, as on OpenAI (the server's
    # clock said "playing" for as long as the audio lasted).
    if waiting or in_progress(call):
        raise RealtimeError("a response is already in progress", "conversation_already_has_active_response", "response")
    # Nothing held or pending: answer the conversation as it stands (text
    # items, or a greeting right after session.update), as OpenAI's API does.
    if not call.unspoken_replies.take():
        # A refused event like any other: past the call's allowance of
        # those, the call is closed (voice/transports/telephony.py).
        raise RealtimeError(
            f"too many responses requested: at most {UNSPOKEN_REPLY_BURST} at once, "
            f"then one every {1 / UNSPOKEN_REPLIES_PER_S:g} s",
            "rate_limit_exceeded",
            "response",
        )
    await call.ensure_started()
    turn = call.session.speak_first(SpokenFirst(instructions=instructions or None))
    response = Response(turn, user_item_id=call.last_item_id or "", released=True)
    call.responses[turn] = response
    await start(call, response)


def _refuse_unserved(call: RealtimeCall, msg: dict[str, Any]) -> None:
    """Refuse a response.create asking for a response firstline cannot give:
    answered as a usual reply, an out-of-band one (a classification, a
    summary) was spoken to the caller and kept in the conversation, and a
    text-only one in an audio session came as audio a text client never
    read. Refused, the client is told and the caller hears nothing."""
    options = msg.get("response")
    if not isinstance(options, dict):
        return
    conversation = options.get("conversation")
    if conversation is not None and conversation != "auto":
        raise RealtimeError(
            "out-of-band responses (conversation other than 'auto') are not served", "unsupported_parameter",
            "response.conversation",
        )  # fmt: skip
    if options.get("input") is not None:
        raise RealtimeError("a response's own input items are not served", "unsupported_parameter", "response.input")
    modalities = options.get("output_modalities", options.get("modalities"))
    if modalities is not None:
        if output_modalities(modalities, "response.output_modalities") != call.settings.output_modalities:
            raise RealtimeError(
                f"a response's output_modalities must be the session's ({call.settings.output_modalities})",
                "unsupported_parameter", "response.output_modalities",
            )  # fmt: skip


def own_instructions(msg: dict[str, Any]) -> bool:
    """Whether a (checked) response.create gives instructions of its own."""
    options = msg.get("response")
    return isinstance(options, dict) and bool(options.get("instructions"))


def _instructions(msg: dict[str, Any]) -> str | None:
    """The create's own instructions (``response.instructions``), checked."""
    options = msg.get("response") if isinstance(msg.get("response"), dict) else {}
    instructions = options.get("instructions")
    if instructions is not None and (not isinstance(instructions, str) or len(instructions) > MAX_INSTRUCTIONS):
        raise RealtimeError(
            f"response.instructions must be a string of at most {MAX_INSTRUCTIONS} chars",
            "invalid_value",
            "response.instructions",
        )
    return instructions or None


def _caller_turn_coming(call: RealtimeCall, turn: int) -> bool:
    """A caller turn later than ``turn`` is ending or decoding, its
    transcript (and so its response) not out yet."""
    later_response = any(r.turn > turn for r in call.responses.values())
    return not later_response and call.session.caller_turn_after(turn)


def drop(call: RealtimeCall, response: Response) -> None:
    """A held reply the client will never be shown leaves the conversation:
    now if its turn is over (its response.done was held), else when it is."""
    ended = any(e.get("type") == "response.done" for e in response.held)
    response.dropped = True
    response.held.clear()
    if ended:
        call.session.reply_heard(response.turn, "")


def context_changed(call: RealtimeCall) -> None:
    """The client changed what a reply should answer: held replies are stale."""
    for response in call.responses.values():
        if not response.released and not response.dropped and not response.queued:
            response.stale = True


def in_progress(call: RealtimeCall) -> bool:
    """Whether a response the client was shown (or one queued behind it)
    has not had its response.done."""
    return any((r.released or r.queued) and not r.dropped and not r.finished for r in call.responses.values())


async def cancel(call: RealtimeCall, msg: dict[str, Any]) -> None:
    """Stop a reply the client sees in progress: still being written (the
    generation is cancelled) or written but still playing (its response.done
    waits for the audio, so to the client it is not over). Its audio stops
    and the history keeps what the playout clock says was heard."""
    wanted = msg.get("response_id")
    # Only a reply the client was shown (released): one held for a
    # response.create it has not sent yet is not its to cancel.
    live = [
        r
        for r in call.responses.values()
        if r.released and not r.dropped and not r.finished and (r.done is None or r.started)
    ]
    if wanted is not None:
        live = [r for r in live if r.id == wanted]
    response = live[-1] if live else None
    if response is None and wanted is None and call.withdraw_request():
        # A create not answered yet (its turn still decoding, or waiting on
        # the turn in flight): the reply is held as if never asked for, and
        # the client gets the created/done pair OpenAI's API gives a
        # response cancelled at once, so one waiting on response.done is not
        # left hanging.
        await cancelled_before_start(call)
        return
    if response is None:
        raise RealtimeError("no response in progress to cancel", "response_cancel_not_active", "response_id")
    writing = response.done is None and call.session.cancel_reply()
    playing = call.playing() == response.turn
    if not writing and not playing:
        raise RealtimeError("no response in progress to cancel", "response_cancel_not_active", "response_id")
    response.cancel_reason = "client_cancelled"
    response.cut_short = True
    if playing:
        await call.cut_reply("response.cancel")


HANDLERS = {
    "response.create": create,
    "response.cancel": cancel,
}


# ---- a reply's life on the wire --------------------------------------------


async def release(call: RealtimeCall, response: Response) -> None:
    """The client asked for a reply that was generated ahead: send what was
    held, then what was written meanwhile, in order. The reply's new events
    are held until the last held one is out: a send that waits (a client
    reading slowly) let them overtake the held ones."""
    response.released = response.draining = True
    try:
        await start(call, response)
        while response.held:
            await call.forward(response.held.pop(0))
    finally:
        response.draining = False  # no await since the list was found empty


async def start(call: RealtimeCall, response: Response) -> None:
    if response.started:
        await response.opened.wait()
        return
    response.started = True
    # Before the sends: a resume handled while they wait restores the item
    # before this one's caller item, and must not be overwritten after.
    call.last_item_id = response.item_id
    await call.send_event("response.created", response=response_obj(call, response, "in_progress"))
    item = item_obj(call, response, "in_progress")
    await call.send_event("response.output_item.added", response_id=response.id, output_index=0, item=item)
    await call.send_event("conversation.item.added", previous_item_id=response.user_item_id, item=item)
    await call.send_event("response.content_part.added", **content_ref(response), part=part(call, ""))
    response.opened.set()


async def cancelled_before_start(call: RealtimeCall) -> None:
    response = Response(-1, released=True, started=True, finished=True, cancel_reason="client_cancelled")
    await call.send_event("response.created", response=response_obj(call, response, "in_progress"))
    body = response_obj(call, response, "cancelled")
    body["status_details"] = {"type": "cancelled", "reason": response.cancel_reason}
    body["usage"] = usage_obj({})
    await call.send_event("response.done", response=body)


async def delta(call: RealtimeCall, response: Response, text: str) -> None:
    await start(call, response)
    response.text += text
    name = "response.output_audio_transcript.delta" if call.settings.audio_out else "response.output_text.delta"
    await call.send_event(name, **content_ref(response), delta=text)


async def finish(call: RealtimeCall, response: Response) -> None:
    await start(call, response)
    done = response.done or {}
    # A reply the engine failed (and no fallback sentence replaced) is
    # "failed" in OpenAI's terms, not a caller's interruption.
    failed = (
        done.get("reply_end") == "failed" and not response.cut_short and not (response.metrics or {}).get("fallback")
    )
    cut = bool(done.get("cancelled") or response.cut_short)  # a cut keeps what it found heard
    status = "failed" if failed else "cancelled" if cut else "completed"
    generated = int((done.get("usage") or {}).get("completion_tokens") or 0)
    if status == "completed" and (done.get("reply_end") == "token_cap" or generated >= call.session.max_tokens):
        # OpenAI's word for a reply max_output_tokens cut short (mid-sentence
        # or, by chance, at a sentence's end): a client that set the cap can
        # tell its reply was not finished.
        status = "incomplete"
    text = str(done.get("text") or response.text)
    playout = call.playout
    if call.settings.audio_out and playout is not None and response.turn in playout.failed_turns and not cut:
        # A sentence's audio failed (the voice could not say it, a send
        # broke): the caller never heard it and the history left it out
        # (TelephonyCall._keep_what_went_out), so the item the client keeps
        # says what went out, not what was written.
        text = playout.sent(response.turn)
    ref = content_ref(response)
    if call.settings.audio_out:
        await call.send_event("response.output_audio.done", **ref)
        await call.send_event("response.output_audio_transcript.done", **ref, transcript=text)
    else:
        await call.send_event("response.output_text.done", **ref, text=text)
    await call.send_event("response.content_part.done", **ref, part=part(call, text))
    item = item_obj(call, response, "completed" if status == "completed" else "incomplete", text)
    await call.send_event("response.output_item.done", response_id=response.id, output_index=0, item=item)
    if not call.beta:
        await call.send_event("conversation.item.done", previous_item_id=response.user_item_id, item=item)
    body = response_obj(call, response, status, [item])
    if status == "cancelled":
        body["status_details"] = {"type": "cancelled", "reason": response.cancel_reason}
    elif status == "incomplete":
        body["status_details"] = {"type": "incomplete", "reason": "max_output_tokens"}
    elif status == "failed":
        code = str(done.get("error_code") or "server_error")
        message = PLAIN_ERRORS.get(code, "the reply could not be generated")
        body["status_details"] = {"type": "failed", "error": {"type": "server_error", "code": code, "message": message}}
    body["usage"] = usage_obj(done.get("usage") or {})
    body["metadata"] = metadata(call, response)
    response.finished = True
    await call.send_event("response.done", response=body)
    if response.retracted:
        await call.send_event("conversation.item.deleted", item_id=response.item_id)
    queued = next((r for r in call.responses.values() if r.queued and not r.dropped), None)
    if queued is not None:
        queued.queued = False
        await release(call, queued)
    # Kept (the newest few, see RealtimeCall.prune): a client truncates an
    # item while it is still playing it, after response.done.
    call.prune()


def usage_obj(usage: dict[str, Any]) -> dict[str, Any]:
    """A reply's token counts as response.done carries them: every field
    OpenAI's usage has (strict clients, pipecat's beta service among them,
    validate each event and refuse a response.done without the details)."""
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {
        "total_tokens": prompt + completion,
        "input_tokens": prompt,
        "output_tokens": completion,
        "input_token_details": {
            "cached_tokens": int(usage.get("cached_tokens") or 0),
            "text_tokens": prompt,
            "audio_tokens": 0,
        },
        "output_token_details": {"text_tokens": completion, "audio_tokens": 0},
    }


def metadata(call: RealtimeCall, response: Response) -> dict[str, str]:
    """firstline's per-turn timings, as Realtime metadata (≤ 16 string values)."""
    metrics = {k: v for k, v in (response.metrics or {}).items() if k.endswith("_ms") and v is not None}
    metrics.update({k: v for k, v in call.audio_metrics.get(response.turn, {}).items() if k == "ttfa_ms"})
    return {f"firstline_{k}": str(v) for k, v in list(metrics.items())[:16]}


# ---- shapes ----------------------------------------------------------------


def content_ref(response: Response) -> dict[str, Any]:
    return {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}


def part(call: RealtimeCall, text: str) -> dict[str, Any]:
    if call.settings.audio_out:
        return {"type": "audio", "transcript": text}
    return {"type": "text", "text": text}


def item_obj(call: RealtimeCall, response: Response, status: str, text: str = "") -> dict[str, Any]:
    # The beta vocabulary names an assistant's content "audio" / "text"
    # (GA: "output_audio" / "output_text"); strict beta clients refuse others.
    audio, written = ("audio", "text") if call.beta else ("output_audio", "output_text")
    content: dict[str, Any] = {"type": written, "text": text}
    if call.settings.audio_out:
        content = {"type": audio, "transcript": text}
    return {"id": response.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": status, "content": [content] if text or status != "in_progress" else []}  # fmt: skip


def response_obj(
    call: RealtimeCall, response: Response, status: str, output: list[Any] | None = None
) -> dict[str, Any]:
    modalities = "modalities" if call.beta else "output_modalities"  # the beta name
    return {
        "id": response.id,
        "object": "realtime.response",
        "status": status,
        "status_details": None,
        "output": output or [],
        "conversation_id": call.session_id,
        modalities: list(call.settings.output_modalities),
        "metadata": None,
        "usage": None,
    }
