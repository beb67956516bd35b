"""Bad input everywhere: property-based fuzzing of every parser and decoder,
and random frames into live calls on the real server.

Contract under test: a parser returns a message or raises its documented
error type with a documented code, never anything else; on the wire every
bad frame gets exactly one ``error`` event, the socket stays open, and
other calls do not notice. Example counts are small so the file stays a few
seconds in CI; raise them locally with ``--hypothesis-seed`` / profiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from websockets.exceptions import ConnectionClosed

from benchmarks.client import NativeCaller
from streaming.codecs import ENCODINGS, SAMPLE_RATES, CodecError, StreamResampler, decode, encode
from tests.conftest import with_silence
from voice.call.start import MAX_AUDIO_FRAME, ProtocolError, Start, check_audio_frame
from voice.server.limits import CallLimits
from voice.transports.native.protocol import Commit, Stop, parse_text

# Every code docs/protocol.md lists for client mistakes.
CLIENT_ERROR_CODES = {
    "invalid_json",
    "invalid_message",
    "unknown_event",
    "unsupported_version",
    "unsupported_encoding",
    "unsupported_sample_rate",
    "not_started",
    "already_started",
    "invalid_audio",
    "frame_too_large",
    "message_too_large",
}

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
# Plausible-looking messages: the right keys with wrong (or right) values.
audio_field = st.fixed_dictionaries(
    {},
    optional={
        "encoding": st.sampled_from([*ENCODINGS, "opus", "PCM16", ""]) | json_values,
        "sample_rate": st.sampled_from([*SAMPLE_RATES, 44100, 0, -8000, 8000.0, True]) | json_values,
    },
)
options_field = st.fixed_dictionaries(
    {},
    optional={
        "endpoint_silence_ms": st.integers(-10, 10_000) | st.floats() | json_values,
        "partials": st.booleans() | json_values,
        "max_tokens": st.integers(-5, 5000) | json_values,
    },
)
start_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["start", "input.commit", "stop", "dance", ""]) | json_values},
    optional={
        "version": st.sampled_from([1, 2, 1.0, "1", None]) | json_values,
        "audio": audio_field | json_values,
        "options": options_field | json_values,
        "system_prompt": st.text(max_size=50) | st.just("x" * 9000) | json_values,
        "metadata": json_values,
    },
)


def _check_parsed(raw: str) -> None:
    try:
        msg = parse_text(raw)
    except ProtocolError as exc:
        assert exc.code in CLIENT_ERROR_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        return
    assert isinstance(msg, Start | Commit | Stop)
    if isinstance(msg, Start):
        assert msg.encoding in ENCODINGS
        assert msg.sample_rate in SAMPLE_RATES and isinstance(msg.sample_rate, int)
        assert msg.encoding == "pcm16" or msg.sample_rate == 8000
        assert msg.endpoint_silence_s is None or 0.1 <= msg.endpoint_silence_s <= 5.0
        assert msg.max_tokens is None or 1 <= msg.max_tokens <= 1024
        assert msg.system_prompt is None or (isinstance(msg.system_prompt, str) and len(msg.system_prompt) <= 8192)
        assert isinstance(msg.metadata, dict)


@FAST
@given(st.text(max_size=200))
def test_parse_text_any_text(raw: str) -> None:
    _check_parsed(raw)


@FAST
@given(start_like)
def test_parse_text_message_shaped(msg: dict) -> None:
    _check_parsed(json.dumps(msg))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["[" * 100_000, '{"a":' * 50_000, '{"type":"start","n":' + "9" * 5000 + "}"]), st.booleans())
def test_parse_text_hostile_documents(raw: str, pad: bool) -> None:
    """Deep nesting and a 5000-digit number (int parsing limit) are errors, not crashes."""
    _check_parsed(raw[: 64 * 1024 - 1] if pad else raw)


@FAST
@given(
    st.binary(max_size=2048) | st.integers(0, 4).map(lambda k: b"\x00" * (MAX_AUDIO_FRAME - 2 + k)),
    st.sampled_from([*ENCODINGS, "opus", ""]),
)
def test_check_audio_frame(payload: bytes, encoding: str) -> None:
    try:
        check_audio_frame(payload, encoding)
    except ProtocolError as exc:
        assert exc.code in {"frame_too_large", "invalid_audio"}
        return
    assert len(payload) <= MAX_AUDIO_FRAME
    assert encoding != "pcm16" or len(payload) % 2 == 0


@FAST
@given(st.binary(max_size=4096), st.sampled_from([*ENCODINGS, "opus", "PCM16", ""]))
def test_decode_any_bytes(payload: bytes, encoding: str) -> None:
    try:
        pcm = decode(payload, encoding)  # type: ignore[arg-type]
    except CodecError:
        assert encoding not in ENCODINGS or (encoding == "pcm16" and len(payload) % 2)
        return
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert len(pcm) == (len(payload) // 2 if encoding == "pcm16" else len(payload))


@FAST
@given(hnp.arrays(np.int16, st.integers(0, 2000)), st.sampled_from(ENCODINGS))
def test_encode_decode_round_trip(samples: np.ndarray, encoding: str) -> None:
    wire = encode(samples, encoding)  # type: ignore[arg-type]
    back = decode(wire, encoding)  # type: ignore[arg-type]
    assert len(back) == len(samples)
    if encoding == "pcm16":
        assert np.array_equal(back, samples)
    else:
        # G.711 is lossy but stable: re-encoding what it decoded changes nothing.
        assert decode(encode(back, encoding), encoding).tobytes() == back.tobytes()  # type: ignore[arg-type]
        # ...and within its quantisation step (~1/16 of magnitude, 2% + 40 LSB near 0).
        err = np.abs(back.astype(np.int32) - samples.astype(np.int32))
        assert np.all(err <= np.abs(samples.astype(np.int32)) // 16 + 1100)


@FAST
@given(st.binary(max_size=64), st.text(max_size=8).filter(lambda e: e not in ENCODINGS))
def test_codecs_reject_unknown_encoding(payload: bytes, encoding: str) -> None:
    with pytest.raises(CodecError):
        decode(payload, encoding)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        encode(np.zeros(4, np.int16), encoding)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(SAMPLE_RATES),
    st.sampled_from(SAMPLE_RATES),
    st.lists(st.integers(0, 1200), min_size=1, max_size=12),
    st.integers(0, 2**32 - 1),
)
def test_stream_resampler_any_chunking(in_rate: int, out_rate: int, sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    rs = StreamResampler(in_rate, out_rate)
    total_out = 0
    for n in sizes:
        out = rs.process(rng.uniform(-1, 1, n).astype(np.float32))
        assert out.dtype == np.float32 and out.ndim == 1 and np.all(np.isfinite(out))
        total_out += len(out)
    total_out += len(rs.process(np.zeros(0, np.float32), last=True))
    expected = sum(sizes) * out_rate / in_rate
    assert abs(total_out - expected) <= 2, (total_out, expected)


# ---- carrier transports: their text parsers, in process on the warm runtime ----


def _carrier_classes() -> list[type]:
    from voice.server.routes import NATIVE_PATH, WS_ROUTES

    classes = []
    for path, handler in WS_ROUTES.items():
        if path == NATIVE_PATH:
            continue
        cls = getattr(handler, "__self__", None)
        if isinstance(cls, type) and hasattr(cls, "on_text"):
            classes.append(cls)
    return classes


carrier_events = st.sampled_from(["connected", "media", "dtmf", "mark", "stop", "websocket:media", "dance", ""])
carrier_messages = st.fixed_dictionaries(
    {"event": carrier_events | json_values},
    optional={
        "media": st.fixed_dictionaries(
            {}, optional={"payload": st.sampled_from(["", "AAAA", "%%%", "QUJD"]) | json_values, "track": json_values}
        )
        | json_values,
        "dtmf": st.fixed_dictionaries({}, optional={"digit": json_values}) | json_values,
        "mark": st.fixed_dictionaries({}, optional={"name": json_values}) | json_values,
        "streamSid": json_values,
        "sequenceNumber": json_values,
    },
)


@pytest.mark.skipif(not _carrier_classes(), reason="no carrier transports in this tree")
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(_carrier_classes() or [object]),
    st.lists(
        carrier_messages.map(json.dumps)
        | st.text(max_size=80)
        | st.sampled_from(['{"event":"media","n":' + "9" * 5000 + "}", "[" * 100_000]),
        min_size=1,
        max_size=6,
    ),
)
async def test_carrier_parsers_never_crash(server, cls: type, frames: list[str]) -> None:
    """Before a start, nothing a carrier sends may escape as anything but the
    transport's MalformedMessage / CallEnded (the read loop logs and goes on)."""
    from voice.transports.telephony import CallEnded, MalformedMessage

    call = cls(None, server.runtime)
    try:
        for frame in frames:
            try:
                await call.on_text(frame)
            except (MalformedMessage, CallEnded):
                pass
    finally:
        await call.finish("fuzz")


# ---- the native protocol on the wire ------------------------------------------

wire_frames = (
    st.text(max_size=120).map(lambda t: ("text", t))
    | start_like.map(lambda m: ("text", json.dumps(m)))
    | st.binary(max_size=700).map(lambda b: ("bytes", b))
    | st.just(("bytes", b"\x00" * (MAX_AUDIO_FRAME + 2)))
    | st.just(("text", " " * (64 * 1024 + 1)))
)


def _expected_error(kind: str, data: str | bytes, started: Start | None) -> tuple[str | None, Start | None]:
    """The oracle: which error code (if any) the server must answer with."""
    if kind == "bytes":
        assert isinstance(data, bytes)
        if started is None:
            return "not_started", started
        try:
            check_audio_frame(data, started.encoding)
        except ProtocolError as exc:
            return exc.code, started
        return None, started
    assert isinstance(data, str)
    try:
        msg = parse_text(data)
    except ProtocolError as exc:
        return exc.code, started
    if isinstance(msg, Start):
        return ("already_started", started) if started is not None else (None, msg)
    if isinstance(msg, Commit):
        return (None if started is not None else "not_started"), started
    return "stop", started


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(wire_frames, min_size=1, max_size=20))
async def test_random_frames_into_a_live_call(call_url, frames: list[tuple[str, str | bytes]]) -> None:
    expected: list[str] = []
    started: Start | None = None
    sent: list[tuple[str, str | bytes]] = []
    for kind, data in frames:
        code, started = _expected_error(kind, data, started)
        if code == "stop":
            break  # a valid stop ends the call; the rest of the list is moot
        sent.append((kind, data))
        if code is not None:
            expected.append(code)
    async with NativeCaller(call_url) as caller:
        for _, data in sent:
            await caller.send_raw(data)
        # A sentinel: once its error arrives, every earlier frame was handled.
        await caller.send_json({"type": "fuzz.sentinel"})
        await caller.wait_for("error", timeout=20, message="unknown message type 'fuzz.sentinel'")
        codes = [e["code"] for e in caller.result.of("error")][:-1]
        assert codes == expected
        assert all(e.get("message") for e in caller.result.of("error"))
        assert not caller.result.of("call.ended")
        assert caller.ws is not None and caller.ws.close_code is None  # still open


async def test_garbage_flood_does_not_disturb_another_call(call_url, phone_prompts) -> None:
    """One caller sends 400 random frames while another has a real turn:
    each bad frame gets its error until the call's allowance is spent, then
    the garbage call is closed (1008); the other call's turn goes on."""
    rng = random.Random(6)
    limits = CallLimits()

    async def garbage() -> int:
        async with NativeCaller(call_url) as caller:
            await caller.start("pcm16", 16000)
            with contextlib.suppress(ConnectionClosed):
                for i in range(400):
                    choice = rng.random()
                    if choice < 0.3:
                        await caller.send_raw(bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 641]))))
                    elif choice < 0.6:
                        await caller.send_raw("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(60))))
                    else:
                        await caller.send_json({"type": rng.choice(["start", "nope", 7, None]), "audio": rng.random()})
                    if i % 50 == 0:
                        await asyncio.sleep(0.05)
            ended = await caller.wait_for("call.ended", timeout=30)
            assert ended["reason"] == "malformed_flood"
            assert caller.ws is not None
            await asyncio.wait_for(caller.ws.wait_closed(), 5)
            assert caller.ws.close_code == 1008 and caller.ws.close_reason == "too many malformed messages"
            return len(caller.result.of("error"))

    async def real_call() -> dict:
        clip = phone_prompts[5]
        async with NativeCaller(call_url) as caller:
            await caller.start("mulaw", 8000)
            await caller.play(with_silence(clip.load(8000), 8000, 1.0), 8000, "mulaw", realtime=True, speed=4.0)
            done = await caller.wait_for("response.done", timeout=60)
            assert not caller.result.of("error")
            return done

    errors, done = await asyncio.gather(garbage(), real_call())
    # Text garbage and odd pcm16 frames: one error each, the allowance's worth at least.
    assert limits.malformed_burst <= errors < 400
    assert done["text"] and not done["cancelled"]
