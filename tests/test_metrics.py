"""Observability: /metrics after a real call, JSON logs with call and turn ids,
and nothing a caller sent (audio, tokens) in any log line."""

from __future__ import annotations

import io
import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.client import NativeCaller
from tests.conftest import with_silence
from tests.http_get import http_get
from voice.server.app import VoiceServer
from voice.server.log_format import ContextFilter, JsonFormatter


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_a_real_call(server: VoiceServer, call_url: str, phone_prompts) -> None:
    before = await scrape(server.port)
    clip = phone_prompts[7]
    log_buffer = io.StringIO()
    handler = logging.StreamHandler(log_buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # websockets' frame dumps included: they must be scrubbed
    try:
        async with NativeCaller(call_url) as caller:
            ready = await caller.start("mulaw", 8000)
            await caller.send_json({"type": "nope"})
            await caller.play(with_silence(clip.load(8000), 8000, 1.0), 8000, "mulaw", realtime=True, speed=4.0)
            turn = await caller.wait_for("turn.metrics", timeout=60)
            await caller.send_json({"type": "stop"})
            await caller.wait_for("call.ended", timeout=10)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    after = await scrape(server.port)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("firstline_ttfs_seconds_count") >= 1
    assert turn["ttfs_ms"] is not None
    assert grew("firstline_ttfs_seconds_sum") > 0
    for stage in ("asr_final", "first_sentence", "asr_decode", "llm_ttft"):
        assert grew("firstline_turn_stage_seconds_count", stage=stage) >= 1, stage
    assert grew("firstline_llm_ttft_seconds_count") >= 1
    assert grew("firstline_asr_decode_seconds_count", kind="final") >= 1
    assert grew("firstline_turns_total") >= 1
    assert grew("firstline_errors_total", code="unknown_event") == 1
    assert grew("firstline_calls_admitted_total") >= 1
    assert grew("firstline_calls_ended_total", reason="client_stop") >= 1
    assert ("firstline_active_calls", ()) in after and ("firstline_asr_queue_depth", ()) in after

    # Structured logs: JSON lines, the call's lines carry its id, no audio.
    lines = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("call_id") == ready["call_id"]]
    assert any("ended" in line["msg"] for line in mine), mine[-5:]
    frames = [line for line in lines if line["logger"].startswith("websockets") and "frame" in line["msg"]]
    assert frames, "websockets debug logging was expected at DEBUG"
    for line in lines:
        assert "BINARY" not in line["msg"] or "payload not logged" in line["msg"], line
        assert "transcript" not in line["msg"]  # no event payloads (caller's words) either


def test_secrets_and_bytes_never_reach_a_log_line() -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter(secrets=["s3cr3t-token"]))
    log = logging.getLogger("firstline.test.secrets")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        log.info("upgrade with %s", "Bearer s3cr3t-token")
        log.info("frame %r", b"\x7f\xff\x00\x01" * 40)
        logging.getLogger("websockets.server").addHandler(handler)
        logging.getLogger("websockets.server").propagate = False
        logging.getLogger("websockets.server").setLevel(logging.DEBUG)
        logging.getLogger("websockets.server").debug("< %s: %s", "Authorization", "Bearer other-token")
        logging.getLogger("websockets.server").debug("< %s", "BINARY 7f ff 00 01 [4 bytes]")
    finally:
        logging.getLogger("websockets.server").removeHandler(handler)
        logging.getLogger("websockets.server").propagate = True
        logging.getLogger("websockets.server").setLevel(logging.NOTSET)
        log.removeHandler(handler)
    text = buffer.getvalue()
    assert "s3cr3t-token" not in text and "other-token" not in text
    assert "\\x7f" not in text and "7f ff" not in text
    assert "<160 bytes>" in text and "[redacted]" in text


async def test_metrics_are_rendered_again_for_an_exempt_address_only(server: VoiceServer, monkeypatch) -> None:
    """/metrics is open, and each render takes the loop every call shares
    for milliseconds: a flood of scrapes held it. An address that is not
    exempt gets the last render again for METRICS_REUSE_S; an exempt one
    (a local Prometheus; loopback by default) always a fresh one."""
    from tests.conftest import side_server
    from voice.server import app

    monkeypatch.setattr(app, "METRICS_REUSE_S", 60.0)  # no test waits it out
    async with side_server(server, per_address_exempt=[]) as open_to_all:
        first = value(await scrape(open_to_all.port), "firstline_calls_admitted_total")
        server.runtime.metrics.call_admitted()  # the count moves on
        assert value(await scrape(open_to_all.port), "firstline_calls_admitted_total") == first
        assert value(await scrape(server.port), "firstline_calls_admitted_total") == first + 1  # loopback: exempt
