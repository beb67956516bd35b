"""The ``conversation.item.*`` family: text context added by the client,
and truncation of a reply to what the caller heard."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voice.transports.realtime.protocol import RealtimeError, new_id
from voice.transports.realtime.response import context_changed

if TYPE_CHECKING:
    from voice.transports.realtime.call import RealtimeCall

# conversation.item.create: text messages only, as context for the audio turns.
CONTEXT_ROLES = ("user", "assistant", "system")
TEXT_PARTS = ("input_text", "text", "output_text")
MAX_CONTEXT_CHARS = 8192
# A client's own item id: printable, no longer than this. It is echoed in
# every event about the item and kept in the call's state for its length.
MAX_ITEM_ID_CHARS = 64


async def item_create(call: RealtimeCall, msg: dict[str, Any]) -> None:
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
    item_id = item.get("id", None)
    if item_id is None:
        item_id = new_id("item")
    elif not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ITEM_ID_CHARS or not item_id.isprintable():
        why = f"'item.id' must be 1..{MAX_ITEM_ID_CHARS} printable characters"
        raise RealtimeError(why, "invalid_value", "item.id")
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
        # Before the first audio the client's instructions are not the
        # call's yet: a system item is checked with them, not the server's.
        pending = None if call.session.started else call.settings.instructions
        call.session.add_context(role, text, pending)
    except ValueError as exc:
        raise RealtimeError(str(exc), "context_too_large", "item.content") from None
    context_changed(call)
    previous = call.last_item_id
    # The parts echoed are the ones read, not the client's objects whole:
    # anything else in them (nested to the parser's limit, say) is not
    # sent back, so the echo cannot fail where the parse did not.
    echoed = [{"type": p["type"], "text": p["text"]} for p in parts]
    created = {
        "id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
        "content": echoed,
    }  # fmt: skip
    await call.send_event("conversation.item.added", previous_item_id=previous, item=created)
    if not call.beta:
        await call.send_event("conversation.item.done", previous_item_id=previous, item=created)
    call.last_item_id = item_id


# A client's clock and ours round differently: this much past the audio we
# sent is still "all of it".
TRUNCATE_SLACK_MS = 100
# No reply plays for a day: a larger value (or a 400-digit one, which JSON
# allows and float() overflows on) is refused before any arithmetic.
MAX_AUDIO_END_MS = 86_400_000


async def item_truncate(call: RealtimeCall, msg: dict[str, Any]) -> None:
    """The client played ``audio_end_ms`` of a reply: history keeps the
    sentences that fit in it."""
    item_id = msg.get("item_id")
    audio_end_ms = msg.get("audio_end_ms")
    if (
        isinstance(audio_end_ms, bool)
        or not isinstance(audio_end_ms, int | float)
        or not 0 <= audio_end_ms <= MAX_AUDIO_END_MS  # NaN fails both
    ):
        raise RealtimeError(
            f"'audio_end_ms' must be a number from 0 to {MAX_AUDIO_END_MS}", "invalid_value", "audio_end_ms"
        )
    content_index = msg.get("content_index", 0)
    if content_index != 0 or isinstance(content_index, bool):
        # An assistant item has one content part (OpenAI: "Set this to 0").
        raise RealtimeError("'content_index' must be 0", "invalid_value", "content_index")
    response = next((r for r in call.responses.values() if r.item_id == item_id), None)
    if response is None:
        raise RealtimeError(f"no assistant item {str(item_id)[:40]!r}", "item_not_found", "item_id")
    if call.playout is not None:
        pieces = call.playout.duration_s(response.turn)
        # What was sent, not what the playout keeps: after a barge-in it
        # keeps only the sentences wholly played, and a client truncates
        # where its playback stopped, mid-sentence.
        sent_ms = max(response.audio_sent_ms, 1000.0 * sum(seconds for _, seconds in pieces))
        if response.finished and audio_end_ms > sent_ms + TRUNCATE_SLACK_MS:
            # OpenAI: "If the audio_end_ms is greater than the actual audio
            # duration, the server will respond with an error." Checked once
            # the item's audio is all out (before, more may be on its way).
            raise RealtimeError(
                f"'audio_end_ms' {audio_end_ms:g} is past the item's audio ({sent_ms:.0f} ms)",
                "invalid_value",
                "audio_end_ms",
            )
        heard, budget = [], audio_end_ms / 1000.0
        for text, seconds in pieces:
            if seconds > budget + 0.05:
                break
            heard.append(text)
            budget -= seconds
        # Through the transport: a truncate right after response.cancel
        # comes before the cancelled turn has written its history.
        call.heard_up_to(response.turn, " ".join(heard))
    await call.send_event(
        "conversation.item.truncated", item_id=item_id, content_index=0,
        audio_end_ms=audio_end_ms,
    )  # fmt: skip


async def item_retrieve(call: RealtimeCall, msg: dict[str, Any]) -> None:
    """The server's copy of an item the client was told of (OpenAI's agents
    SDKs ask for each user item once its transcript is in). No audio is
    kept: the item is as last sent, its transcript or text in."""
    item_id = msg.get("item_id")
    item = call.items.get(item_id) if isinstance(item_id, str) else None
    if item is None:
        raise RealtimeError(f"no item {str(item_id)[:40]!r}", "item_not_found", "item_id")
    await call.send_event("conversation.item.retrieved", item=item)


HANDLERS = {
    "conversation.item.create": item_create,
    "conversation.item.truncate": item_truncate,
    "conversation.item.retrieve": item_retrieve,
}
