"""Logging setup: plain or JSON lines, call/turn ids from context, and a
filter that keeps audio bytes and secrets out of every log record.

The call id and turn id live in context variables: a transport binds the
call id once in its handler task, and every task the call spawns (replies,
partials) inherits it, so any log line from inside a call carries it without
the code that logs having to know.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from urllib.parse import quote

call_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_id", default=None)
turn_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("turn", default=None)

REDACTED = "[redacted]"
# websockets' debug log prints frame payloads ("< BINARY 7f ff ... [160 bytes]")
# and TEXT frames; audio and transcripts of callers must not land in logs.
_FRAME_LINE = re.compile(r"^[<>] (BINARY|TEXT|CONT)\b")
_AUTH_HEADER = re.compile(
    r"(?i)^[<>] (authorization|cookie|x-api-key|proxy-authorization|x-twilio-signature"
    r"|x-twilio-webhooks-signature-settings): "
)
# A token in a logged URL's query, however the client percent-encoded it
# (a browser's encodeURIComponent leaves ()!*' as they are, quote() does not,
# so the secret's own forms above can miss it).
# resume=: a Realtime or native client's resume token opens its stored
# conversation for the state's TTL (an hour): a credential too.
_TOKEN_QUERY = re.compile(r"(?i)([?&](?:token|access_token|resume)=)[^&\s#]*")
_CLIENT_SECRET = re.compile(r"fl_ek_[A-Za-z0-9._-]*")
# A token offered as a websocket subprotocol (voice/server/app.py
# TOKEN_SUBPROTOCOLS): websockets logs the Sec-WebSocket-Protocol header at
# DEBUG, and the base64url form matches no secret's own forms.
_TOKEN_SUBPROTOCOL = re.compile(r"(?i)((?:openai-insecure-api-key|firstline-token(?:-b64)?)\.)[^,\s]*")
# A quoted snippet in a message about input (a repr of what the caller sent).
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')


def redact_quoted(text: str) -> str:
    """``text`` with every quoted snippet (``'…'``, a repr of caller input:
    a frame's start, an event name, a digit) replaced, for INFO/WARNING lines;
    the full text belongs at DEBUG."""
    return _QUOTED.sub("'…'", text)


# How much of an error about a caller's input an INFO/WARNING line keeps: the
# reason, not the input (which a caller controls and may make a megabyte long).
CALLER_TEXT_LOGGED_CHARS = 160
# Longer than any rate, bit depth or frame size an error names (48000): a
# card or phone number a caller put where a field name or value goes.
_LONG_NUMBER = re.compile(r"\d{7,}")
# What a terminal or a log reader may take for a new line or a command: C0
# and C1 controls (ESC sequences, NEL) and Unicode's line and paragraph
# separators; a tab stays.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def loggable(text: str) -> str:
    """An error that may hold what a caller sent, fit for INFO/WARNING:
    quoted snippets and long numbers replaced, control characters escaped (a
    field name holding a newline forged a log line of its own), cut short.
    Redacted whole first: a cut may split a quote."""
    text = _LONG_NUMBER.sub("…", redact_quoted(text))
    return _CONTROL.sub(_escaped, text)[:CALLER_TEXT_LOGGED_CHARS]


class WarningBudget:
    """Malformed-input warnings per call: the first ``first`` are logged,
    then silence, then one summary when the call ends. A client sending
    garbage at 50 frames a second must not flood the log (or its disk)."""

    def __init__(self, first: int = 3) -> None:
        self.first = first
        self.count = 0

    def take(self) -> bool:
        """Count one; True while it may still be logged."""
        self.count += 1
        return self.count <= self.first

    def summary(self) -> str | None:
        """The end-of-call line for the warnings not logged (None: none)."""
        if self.count <= self.first:
            return None
        return f"{self.count} malformed messages in all, {self.count - self.first} not logged"


def bind_call(call_id: str) -> None:
    call_id_var.set(call_id)
    turn_var.set(None)


def bind_turn(turn: object) -> None:
    if isinstance(turn, int) and not isinstance(turn, bool) and turn_var.get() != turn:
        turn_var.set(turn)


class ContextFilter(logging.Filter):
    """Stamps call_id/turn onto records and scrubs what must never be logged."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Each secret as sent and percent-encoded (a ?token= in a logged URL).
        self.secrets = sorted({form for s in secrets if s for form in (s, quote(s, safe=""))}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        record.call_id = call_id_var.get()
        record.turn = turn_var.get()
        if isinstance(record.args, tuple) and any(isinstance(a, bytes | bytearray | memoryview) for a in record.args):
            record.args = tuple(_scrub_arg(a) for a in record.args)
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken log call is logging's problem to report, not ours
        changed = False
        if record.name.startswith("websockets"):
            frame = _FRAME_LINE.match(message)
            if frame:
                message, changed = f"{message[0]} {frame.group(1)} frame (payload not logged)", True
            elif _AUTH_HEADER.match(message):
                message, changed = message.split(":", 1)[0] + ": " + REDACTED, True
        for secret in self.secrets:
            if secret in message:
                message, changed = message.replace(secret, REDACTED), True
        if "fl_ek_" in message:  # a browser's client secret (client_secrets.py): a credential until it expires
            message, changed = _CLIENT_SECRET.sub(REDACTED, message), True
        if "token" in (lowered := message.lower()) or "api-key." in lowered:
            scrubbed = _TOKEN_SUBPROTOCOL.sub(lambda m: m.group(1) + REDACTED, message)
            message, changed = scrubbed, changed or scrubbed != message
        if "token=" in lowered or "resume=" in lowered:
            scrubbed = _TOKEN_QUERY.sub(lambda m: m.group(1) + REDACTED, message)
            message, changed = scrubbed, changed or scrubbed != message
        if changed:
            record.msg, record.args = message, ()
        if record.exc_info and self.secrets:
            # A traceback can quote a URL or header too; formatters use exc_text once set.
            text = record.exc_text or _TRACEBACKS.formatException(record.exc_info)
            for secret in self.secrets:
                text = text.replace(secret, REDACTED)
            record.exc_text = text
        return True


_TRACEBACKS = logging.Formatter()


def _scrub_arg(arg: object) -> object:
    # Raw bytes in a log call are almost always audio: log their size only.
    if isinstance(arg, bytes | bytearray | memoryview):
        return f"<{len(arg)} bytes>"
    return arg


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        call_id = getattr(record, "call_id", None)
        if call_id is not None:
            out["call_id"] = call_id
        turn = getattr(record, "turn", None)
        if turn is not None:
            out["turn"] = turn
        if record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ctx)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: a message carrying a newline or a terminal
        # escape (any library's, with a caller's text in it) would forge a
        # line of its own.
        record.message = _CONTROL.sub(_escaped, record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        parts = [p for p in (getattr(record, "call_id", None), getattr(record, "turn", None)) if p is not None]
        record.ctx = f" [{' t'.join(str(p) for p in parts)}]" if parts else ""
        return super().format(record)


def configure_logging(level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = ()) -> logging.Handler:
    """Root handler on stderr; ``fmt`` is "text" or "json"."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    # On the handler, not a logger: it then sees records from every library.
    handler.addFilter(ContextFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_connection_logs(level)
    return handler


def quiet_connection_logs(level: str) -> None:
    """websockets logs every connection at INFO (open, rejected, closed):
    anyone who can reach the port could write lines as fast as they could
    connect, past the registry's per-address throttle on refusals. Its
    warnings and errors stay; at DEBUG it says everything."""
    asked = logging.getLevelName(level.upper())
    asked = asked if isinstance(asked, int) else logging.INFO
    # Never louder than asked (at ERROR its warnings stay out too).
    logging.getLogger("websockets").setLevel(asked if asked <= logging.DEBUG else max(asked, logging.WARNING))
