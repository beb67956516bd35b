"""The ``session.*`` family: the session as the client configured it, the
``session.update`` handler, and the session object the server reports."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from voice.call.start import ProtocolError
from voice.transports.realtime.protocol import (
    BETA_FORMATS,
    GA_FORMATS,
    MAX_INSTRUCTIONS,
    MAX_OUTPUT_TOKENS,
    RealtimeError,
    format_obj,
    output_modalities,
)
from voice.transports.realtime.response import context_changed

if TYPE_CHECKING:
    from voice.transports.realtime.call import RealtimeCall

log = logging.getLogger(__name__)


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


async def session_update(call: RealtimeCall, msg: dict[str, Any]) -> None:
    update = msg.get("session")
    if not isinstance(update, dict):
        raise RealtimeError("'session' missing or not an object", "missing_required_parameter", "session")
    new = apply_update(call.settings, update)
    # Checked, then applied: an update that gets an error changes nothing.
    overrides = sampling_overrides(update)
    if any(key in update for key in ("max_output_tokens", "max_response_output_tokens")):
        # "inf" (None here) means the server's own cap.
        overrides["max_tokens"] = new.max_output_tokens or call.runtime.config.llm.max_tokens
    sampling_before = call.session.sampling
    if call.session.started:
        old = call.settings
        locked = [
            name
            for name, before, after in (
                ("input audio format", old.input_format, new.input_format),
                ("output audio format", old.output_format, new.output_format),
                ("output modalities", old.audio_out, new.audio_out),
                # Automatic turns <-> push-to-talk changes what ends a turn
                # (and whether a pause starts work); a window changes live.
                ("turn_detection to or from null", old.turn_detection is None, new.turn_detection is None),
            )
            if before != after
        ]
        if locked:
            raise RealtimeError(
                f"cannot change {', '.join(locked)} after audio has started; open a new session",
                "session_locked",
                "session",
            )
    if overrides:
        try:
            call.session.set_sampling(overrides)
        except ProtocolError as exc:
            raise RealtimeError(exc.message, "invalid_value", "session.sampling") from None
    # The instructions must leave room for the reply cap this update sets,
    # however it sets it (one set by sampling.max_tokens was not checked
    # against the client's instructions, and every turn of the call failed).
    prompt = new.instructions or call.runtime.config.llm.system_prompt
    if new.instructions or new.instructions != call.settings.instructions or "max_tokens" in overrides:
        try:
            call.session.check_new_instructions(prompt)
            if call.session.started and new.instructions != call.settings.instructions:
                # Cleared ("" or null): the server's own instructions again.
                call.session.set_system_prompt(prompt)
                context_changed(call)
        except ValueError as exc:
            call.session.sampling = sampling_before
            raise RealtimeError(str(exc), "context_too_large", "instructions") from None
    if call.session.started and new.turn_detection is not None and new.turn_detection != call.settings.turn_detection:
        call.session.set_turn_detection(*turn_taking(new.turn_detection))
    call.settings = new
    await call.send_event("session.updated", session=call.session_object())
    ignored = unserved_fields(update)
    if ignored:
        # The rest of the update took, and session.updated reports what is
        # served (no tools, speed 1.0, no noise reduction). No ``error`` event:
        # pipecat's client ends its session on any error but two, and a
        # pipecat bot with tools in its context lost every call at setup.
        # The operator's log says what was left out (names only), once a
        # session at INFO: a client may send updates 50 times a second.
        level = logging.DEBUG if call.unserved_logged else logging.INFO
        call.unserved_logged = True
        log.log(level, "realtime call %s: session.update left out %s", call.call_id,
                ", ".join(f"{name} ({why})" for name, why in ignored))  # fmt: skip


def unserved_fields(update: dict[str, Any]) -> list[tuple[str, str]]:
    """Fields of a ``session.update`` asking for what firstline does not serve
    (their values are left out of the session): (param, why)."""
    audio = update.get("audio") if isinstance(update.get("audio"), dict) else {}
    audio_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
    audio_out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
    ignored: list[tuple[str, str]] = []
    if update.get("tools"):
        ignored.append(("tools", "function calling is not served; replies are text and speech only"))
    choice = update.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        ignored.append(("tool_choice", "no tools are served"))
    speed = audio_out.get("speed", update.get("speed"))
    if speed is not None and speed != 1.0:
        ignored.append(("audio.output.speed", "replies are spoken at speed 1.0"))
    noise = audio_in.get("noise_reduction", update.get("input_audio_noise_reduction"))
    if noise is not None:
        ignored.append(("audio.input.noise_reduction", "the audio is decoded as it comes"))
    return ignored


def sampling_overrides(update: dict[str, Any]) -> dict[str, Any]:
    """Sampling asked for in a ``session.update``: ``temperature`` (as in
    OpenAI's beta sessions) and firstline's ``sampling`` object (any field of
    llm/sampling.py: top_p, repetition_penalty, stop, seed, …)."""
    overrides: dict[str, Any] = {}
    if "temperature" in update:
        overrides["temperature"] = update["temperature"]
    sampling = update.get("sampling")
    if sampling is not None:
        if not isinstance(sampling, dict):
            raise RealtimeError("'sampling' must be an object of sampling fields", "invalid_value", "session.sampling")
        overrides.update(sampling)
    return overrides


def session_object(call: RealtimeCall) -> dict[str, Any]:
    s = call.settings
    if call.beta:
        beta_format = {v: k for k, v in BETA_FORMATS.items()}
        return {
            "id": call.session_id,
            "object": "realtime.session",
            "model": s.model,
            "modalities": ["text", "audio"] if s.audio_out else ["text"],
            "instructions": s.instructions or "",
            "voice": s.voice,
            "input_audio_format": beta_format[s.input_format],
            "output_audio_format": beta_format[s.output_format],
            "input_audio_transcription": s.transcription,
            "turn_detection": s.turn_detection,
            "tools": [],
            "tool_choice": "auto",
            "temperature": call.session.sampling.temperature,
            "max_response_output_tokens": call.session.max_tokens,
            "sampling": call.session.sampling.as_dict(),
        }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": call.session_id,
        "model": s.model,
        "output_modalities": list(s.output_modalities),
        "instructions": s.instructions or "",
        "audio": {
            "input": {
                "format": format_obj(s.input_format),
                "transcription": s.transcription,
                "noise_reduction": None,
                "turn_detection": s.turn_detection,
            },
            "output": {"format": format_obj(s.output_format), "voice": s.voice, "speed": 1.0},
        },
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": call.session.max_tokens,
        # firstline's extension: every sampling value in force for this session.
        "sampling": call.session.sampling.as_dict(),
    }


def turn_taking(td: dict[str, Any]) -> tuple[float | None, bool]:
    """(endpoint silence window s, barge-in) of an automatic
    ``turn_detection``: ``server_vad`` with ``silence_duration_ms`` is a
    fixed window, anything else firstline's own end of turn; OpenAI stops a
    reply on speech unless ``interrupt_response`` is false."""
    silence_ms = td.get("silence_duration_ms") if td.get("type") == "server_vad" else None
    return None if silence_ms is None else silence_ms / 1000.0, td.get("interrupt_response", True) is not False


def apply_update(current: RealtimeSettings, update: dict[str, Any]) -> RealtimeSettings:
    """``current`` with a GA or beta ``session.update`` applied; raises
    :class:`RealtimeError` on a value we cannot serve."""
    new = RealtimeSettings(**{f: getattr(current, f) for f in current.__dataclass_fields__})
    modalities = update.get("output_modalities", update.get("modalities"))
    if modalities is not None:
        new.output_modalities = output_modalities(modalities, "output_modalities")
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
        new.transcription = None if tr is None else _scalar_fields(tr)
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
    return _scalar_fields(value)


# What a settings object may keep of the client's: echoed in every session
# object, so nothing nested (any depth the parser took was kept whole and sent
# back with every session.updated) and no long text.
MAX_ECHOED_FIELDS = 32
MAX_ECHOED_CHARS = 1024


def _scalar_fields(value: dict[Any, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, item in value.items():
        if len(kept) == MAX_ECHOED_FIELDS:
            break
        if not isinstance(key, str) or len(key) > 64:
            continue
        short_text = isinstance(item, str) and len(item) <= MAX_ECHOED_CHARS
        if item is None or isinstance(item, bool | int | float) or short_text:
            kept[key] = item
    return kept
