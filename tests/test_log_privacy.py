"""Caller data out of logs, internals out of replies: no DTMF digits or
frame snippets at INFO/WARNING, malformed-input warnings capped per call,
and turn errors that tell the client a code and a plain sentence while the
detail (an internal URL, a library's message) stays in the server log."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.asyncio.client import connect

from benchmarks.callers.base import to_wire
from benchmarks.callers.twilio import Twilio
from benchmarks.client import NativeCaller
from llm.base import EngineError
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher
from voice.call.reply_policy import ReplyPolicy
from voice.call.turn import plain_error
from voice.server.app import VoiceServer
from voice.server.log_format import WarningBudget, redact_quoted

INTERNAL = "stream from LLM server http://127.0.0.1:40123/v1 cut mid-reply (ClientPayloadError: Response payload)"


def loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured line at INFO and above."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]


def test_redaction_and_the_warning_budget() -> None:
    assert redact_quoted("not JSON: 'card 4111 1111'") == "not JSON: '…'"
    assert redact_quoted('unknown event "dance" of 3 B') == "unknown event '…' of 3 B"
    budget = WarningBudget(first=3)
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    assert budget.summary() == "5 malformed messages in all, 2 not logged"
    assert WarningBudget().summary() is None


def test_a_token_in_a_logged_url_is_redacted_however_it_was_encoded() -> None:
    """The demo page puts a token a subprotocol cannot hold in ?token=,
    encoded by encodeURIComponent, which leaves ( ) ! * ' as they are:
    neither the raw token nor quote()'s form of it is in the line."""
    import logging

    from voice.server.log_format import REDACTED, ContextFilter

    token = "a/b(c)=d"
    record = logging.LogRecord("websockets.server", logging.DEBUG, __file__, 1,
                               "< GET /v1/call?token=%s&x=1 HTTP/1.1", ("a%2Fb(c)%3Dd",), None)  # fmt: skip
    assert ContextFilter([token]).filter(record)
    assert record.getMessage() == f"< GET /v1/call?token={REDACTED}&x=1 HTTP/1.1"
    # A resume token opens the caller's stored conversation: a credential
    # too, though no server secret names it.
    record = logging.LogRecord("websockets.server", logging.DEBUG, __file__, 1,
                               "< GET /v1/realtime?model=x&resume=%s HTTP/1.1", ("Zq3_k9",), None)  # fmt: skip
    assert ContextFilter([]).filter(record)
    assert record.getMessage() == f"< GET /v1/realtime?model=x&resume={REDACTED} HTTP/1.1"
    # A token offered as a subprotocol, base64url as a browser sends one the
    # header cannot hold ("openssl rand -base64" makes "/", "+", "="):
    # websockets logs the header at DEBUG, where no secret's form matched it.
    record = logging.LogRecord(
        "websockets.server",
        logging.DEBUG,
        __file__,
        1,
        "%s",
        ("< Sec-WebSocket-Protocol: firstline, firstline-token-b64.YS9iK2M9, openai-insecure-api-key.k1",),
        None,
    )
    assert ContextFilter(["a/b+c="]).filter(record)
    assert record.getMessage() == (
        f"< Sec-WebSocket-Protocol: firstline, firstline-token-b64.{REDACTED}, openai-insecure-api-key.{REDACTED}"
    )


def test_a_line_of_caller_text_stays_one_line_without_its_numbers() -> None:
    """A field name is the caller's text: one holding a newline forged a log
    line of its own in the text format, with a card number at WARNING."""
    from voice.server.log_format import PlainFormatter, loggable

    forged = "sampling.\nERROR fake: 4111111111111111: unknown sampling field 'x'"
    assert loggable(forged) == "sampling.\\nERROR fake: …: unknown sampling field '…'"
    assert len(loggable("x" * 1000)) == 160
    said = "a\r\nB\x85C\u2028D\x1b[2J\tE"  # line breaks of every kind, a terminal escape, a tab
    record = logging.LogRecord("voice", logging.WARNING, __file__, 1, "ignored: %s", (said,), None)
    line = PlainFormatter().format(record)
    assert len(line.splitlines()) == 1 and line.endswith("ignored: a\\r\\nB\\x85C\\u2028D\\x1b[2J\tE"), line


async def test_a_forged_line_in_a_sampling_field_name_is_not_logged_as_one(call_url, caplog) -> None:
    """The native start's sampling block, an unknown field whose name holds a
    newline and a card number: the error names it (quoted) to the client;
    the WARNING line holds neither the line break nor the number."""
    caplog.set_level(logging.DEBUG)
    async with NativeCaller(call_url) as caller:
        await caller.send_json({"type": "start", "audio": {"encoding": "pcm16", "sample_rate": 16000},
                                "options": {"sampling": {"\nERROR fake: 4111111111111111": 1}}})  # fmt: skip
        error = await caller.wait_for("error", timeout=10)
    assert error["code"] == "invalid_sampling" and error["message"].startswith("sampling: unknown sampling field")
    lines = loud(caplog)
    assert any("invalid_sampling" in line for line in lines), lines
    assert not [line for line in lines if "4111111111111111" in line or "\n" in line], lines


async def test_sampling_nested_past_the_recursion_limit_is_a_bad_message_not_a_dead_call(call_url) -> None:
    """A value nested just shallow enough for the JSON parser: its repr in
    the error recursed past Python's limit, and the call ended as an
    internal error (no cool-down, a traceback per connection). Each depth is
    a bad message now, and the call goes on to start; so for the audio
    format's fields, whose errors quoted the value's str()."""
    audio = '"audio": {"encoding": "pcm16", "sample_rate": 16000}'
    frames = {
        "temperature": lambda v: f'{{"type": "start", {audio}, "options": {{"sampling": {{"temperature": {v}}}}}}}',
        "stop": lambda v: f'{{"type": "start", {audio}, "options": {{"sampling": {{"stop": {v}}}}}}}',
        "encoding": lambda v: f'{{"type": "start", "audio": {{"encoding": {v}, "sample_rate": 16000}}}}',
        "sample_rate": lambda v: f'{{"type": "start", "audio": {{"encoding": "pcm16", "sample_rate": {v}}}}}',
    }
    async with NativeCaller(call_url) as caller:
        depths = [(field, depth) for field in frames for depth in range(800, 1000, 20)]
        for field, depth in depths:
            await caller.send_raw(frames[field]("[" * depth + "1" + "]" * depth))

        def errors() -> list[dict]:
            return [r.event for r in caller.result.events if r.event.get("type") == "error"]

        async with asyncio.timeout(20):
            while len(errors()) < len(depths):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        codes = {e["code"] for e in errors()}
        said = {"invalid_sampling", "unsupported_encoding", "unsupported_sample_rate"}
        assert codes <= {"invalid_json", *said} and said <= codes, errors()
        ready = await caller.start("pcm16", 16000)
        assert ready["type"] == "ready", ready


async def test_digits_and_malformed_frames_stay_out_of_info_logs(server: VoiceServer, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    twilio = Twilio(sid="MZ1", call_sid="CA1")  # the one Twilio client (benchmarks/callers)
    with CallWatcher() as watcher:
        async with connect(f"ws://127.0.0.1:{server.port}/twilio") as ws:
            for msg in twilio.opening():
                await ws.send(to_wire(msg))
            call = await watcher.one()
            async with asyncio.timeout(30):
                while not call.session.started:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            for digit in "4111":
                await ws.send(to_wire(twilio.dtmf(digit)))
            for i in range(10):
                await ws.send(f"my card is 5500-{i:04d}")  # not JSON: a frame snippet in the detail
            async with asyncio.timeout(10):
                while call.malformed < 10:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        async with asyncio.timeout(10):
            while not call.finished:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    lines = loud(caplog)
    assert not [line for line in lines if "5500-" in line or "DTMF" in line], lines
    ignored = [line for line in lines if "ignored message" in line]
    assert len(ignored) == 3, ignored  # the first three, then silence...
    assert any("10 malformed messages in all, 7 not logged" in line for line in lines)  # ...and one summary
    # The detail is there for whoever turns DEBUG on.
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("5500-0009" in line for line in debug) and any("DTMF 4" in line for line in debug)


async def test_connections_are_not_logged_one_line_each_above_debug(server: VoiceServer, caplog) -> None:
    """websockets logs each connection at INFO (open, rejected, closed):
    anyone reaching the port wrote lines as fast as they could connect.
    At INFO they are quiet; at DEBUG they say everything."""
    from websockets.exceptions import InvalidStatus

    from voice.server.log_format import quiet_connection_logs

    saved = logging.getLogger("websockets").level
    try:
        for level, logged in (("INFO", False), ("DEBUG", True), ("ERROR", False)):
            quiet_connection_logs(level)
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="voice"):
                for _ in range(3):
                    with pytest.raises(InvalidStatus):  # 404: no such route
                        await connect(f"ws://127.0.0.1:{server.port}/nowhere")
            lines = [r.getMessage() for r in caplog.records if r.name.startswith("websockets")]
            assert any(line.startswith("HTTP response sent (404") for line in lines) == logged, (level, lines)
    finally:
        logging.getLogger("websockets").setLevel(saved)


async def test_an_engine_failure_reaches_the_client_as_a_plain_message(
    server: VoiceServer, call_url: str, phone_prompts, monkeypatch, caplog
) -> None:
    engine = server.runtime.engine

    async def broken_stream(request):
        raise EngineError(INTERNAL)
        yield  # an async generator, like the real one

    monkeypatch.setattr(engine, "stream", broken_stream)
    caplog.set_level(logging.INFO)
    async with NativeCaller(call_url) as caller:
        await caller.start("mulaw", 8000, options={"partials": False})
        clip = phone_prompts[2]
        await caller.play(with_silence(clip.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=4.0)
        err = await caller.wait_for("error", timeout=60)
        done = await caller.wait_for("response.done", turn=1, timeout=30)
    assert err["code"] == "llm_failed"
    assert err["message"] == plain_error("llm_failed", 1) == "turn 1: the reply could not be generated"
    # A phone caller hears no error event: the turn says the failure line
    # (not the fallback, which would ask them to repeat themselves).
    events = [r.event for r in caller.result.events]
    said = [e for e in events if e.get("type") == "response.sentence" and e.get("turn") == 1]
    assert [e["text"] for e in said] == [ReplyPolicy.failure_line], said
    assert done["text"] == ReplyPolicy.failure_line and done["reply_end"] == "failed", done
    assert done["error_code"] == "llm_failed" and done["cancelled"] is True, done
    assert "127.0.0.1" not in json.dumps(err) and "ClientPayloadError" not in json.dumps(err)
    # The server's log keeps what happened.
    assert any(INTERNAL in (r.exc_text or "") or INTERNAL in str(r.exc_info) for r in caplog.records)


async def test_an_llm_server_killed_mid_reply_stays_out_of_the_clients_error(
    server: VoiceServer, call_url: str, phone_prompts, monkeypatch, caplog
) -> None:
    """The same through a real failure: the turn's reply comes from a real
    LLM server (llm.openai_server on SmolLM2, through RemoteEngine's own
    error wrapping), killed after its first token. The client hears a code
    and a plain sentence; the server's address is only in the server log."""
    from llm.remote_engine import RemoteEngine
    from tests.openai_servers import ServerProcess

    upstream = await ServerProcess().wait_healthy()
    remote = RemoteEngine(upstream.url, system_prompt=None)
    await remote.start()

    async def stream_then_kill(request):
        async for delta in remote.stream(request):
            upstream.kill()  # after its first token: mid-reply
            yield delta

    monkeypatch.setattr(server.runtime.engine, "stream", stream_then_kill)
    caplog.set_level(logging.DEBUG)
    try:
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000, options={"partials": False}, sampling={"max_tokens": 200})
            clip = phone_prompts[2]
            await caller.play(with_silence(clip.load(8000), 8000, 1.5), 8000, "mulaw", realtime=True, speed=4.0)
            err = await caller.wait_for("error", timeout=60)
    finally:
        await remote.close()
        upstream.stop()
    assert err["code"].startswith("llm_"), err
    wire = json.dumps(err)
    assert f":{upstream.port}" not in wire and "127.0.0.1" not in wire, err
    logged = [r.getMessage() + (r.exc_text or "") + str(r.exc_info or "") for r in caplog.records]
    assert any(f":{upstream.port}" in line for line in logged)
