"""Telnyx media streaming: a fake Telnyx (out-of-order chunks included) drives the real server."""

from __future__ import annotations

import base64
import random

from asr.wer import word_error_rate
from tests.conftest import with_silence
from tests.fake_carrier import CallWatcher, FakeTelnyx
from tests.transport_checks import (
    barge_in_call,
    hangups_release_everything,
    malformed_then_call,
    prompt_clip,
    refused_at_once,
    reply_call,
    server_base,
)
from voice.transports.carriers.telnyx import Reorder


def test_reorder_releases_in_order_and_skips_lost_chunks():
    r = Reorder(depth=3)
    assert r.push(2, b"b") == []
    assert r.push(1, b"a") == [b"a", b"b"]
    assert r.push(1, b"a") == [] and r.late == 1  # duplicate / late
    assert r.push(4, b"d") == [] and r.push(5, b"e") == [] and r.push(6, b"f") == []
    assert r.push(7, b"g") == [b"d", b"e", b"f", b"g"] and r.skipped == 1  # chunk 3 was lost
    assert r.push(3, b"c") == [] and r.late == 2


async def test_telnyx_call_speaks_the_reply(server):
    await reply_call(server, FakeTelnyx(server_base(server)), prompt_clip(11), sizes={160})


async def test_telnyx_pcma_call(server):
    """A PCMA caller: the reply goes out in the stream's bidirectional codec,
    PCMU unless the call names another (A-law played as mu-law is noise:
    -4.9 dB SNR on a tone), and the fake decodes it as Telnyx would."""
    carrier = FakeTelnyx(server_base(server))
    carrier.encoding = "alaw"
    with CallWatcher() as watcher:
        await reply_call(server, carrier, prompt_clip(12), sizes={160}, dtmf=None)
        assert watcher.calls[0].playout.fmt.encoding == "mulaw"
    both_alaw = FakeTelnyx(server_base(server))
    both_alaw.encoding = "alaw"
    both_alaw.wire.parameters["bidirectional_codec"] = "PCMA"  # type: ignore[attr-defined]
    with CallWatcher() as watcher:
        await reply_call(server, both_alaw, prompt_clip(14), sizes={160}, dtmf=None)
        assert watcher.calls[0].playout.fmt.encoding == "alaw"


async def test_telnyx_out_of_order_media_is_reordered(server):
    """Chunks shuffled within windows of 4 (Telnyx guarantees no order): the
    transcript is as good as in order."""
    clip = prompt_clip(13)
    carrier = FakeTelnyx(server_base(server))
    rng = random.Random(7)
    with CallWatcher() as watcher:
        async with carrier:
            call = await watcher.one()
            messages: list[dict] = []
            carrier.send_original = carrier.send  # type: ignore[attr-defined]

            async def collect(msg):  # the fake's frames, held back to be shuffled
                messages.append(msg)

            carrier.send = collect  # type: ignore[method-assign]
            await carrier.say(with_silence(clip.load(8000), 8000, 1.0), speed=None)
            carrier.send = carrier.send_original  # type: ignore[method-assign]
            for i in range(0, len(messages), 4):
                window = messages[i : i + 4]
                rng.shuffle(window)
                for msg in window:
                    await carrier.send(msg)
            final = await watcher.wait_event(call, "transcript.final", timeout=60)
            assert word_error_rate(clip.reference, final["text"]) <= 0.35, final
            assert call.reorder.late == 0 and call.reorder.skipped == 0
            await carrier.wait_audio()


async def test_telnyx_barge_in_clears(server):
    await barge_in_call(server, FakeTelnyx(server_base(server)))


async def test_telnyx_malformed_messages_are_ignored(server):
    sid = FakeTelnyx.sid
    bad = [
        b"\x00binary",
        "{",
        {"event": "media", "stream_id": sid, "media": {"chunk": "x", "payload": "AAAA"}},
        {"event": "media", "stream_id": sid, "media": {"chunk": "3", "payload": "!!"}},
        # Over the frame limit and numbered far ahead: refused, not held in
        # the reorder buffer (until the stream's end; and the stream's own
        # chunks, numbered from 1, then all came too late).
        {
            "event": "media",
            "stream_id": sid,
            "media": {"chunk": "900000", "payload": base64.b64encode(bytes(70_000)).decode()},
        },
        {"event": "dtmf", "dtmf": {"digit": "12"}},
        {"event": "error", "payload": {"code": 100002, "title": "Unknown Error"}},  # logged, not malformed
        {"event": "mystery"},
    ]
    await malformed_then_call(server, FakeTelnyx(server_base(server)), bad, prompt_clip(14), harmless=1)


async def test_telnyx_hangup_mid_reply_releases_everything(server):
    await hangups_release_everything(
        server, lambda: FakeTelnyx(server_base(server)), [prompt_clip(42), prompt_clip(43)]
    )


async def test_telnyx_an_unsupported_codec_is_refused_at_once_not_as_abuse(server, monkeypatch):
    """A stream in a codec the server does not take (G.722)."""
    import benchmarks.callers.telnyx as wire

    monkeypatch.setitem(wire.ENCODINGS, "g722", "G722")
    await refused_at_once(FakeTelnyx(server_base(server), encoding="g722"), "unsupported media format 'G722'")


async def test_telnyx_a_bidirectional_codec_it_cannot_send_is_refused_at_once(server):
    """A stream whose custom bidirectional_codec the server cannot send
    (G.722) was a malformed start: every media frame after it counted as
    malformed, and the flood cooled the Telnyx address down."""
    carrier = FakeTelnyx(server_base(server), parameters={"bidirectional_codec": "G722"})
    await refused_at_once(carrier, "unsupported bidirectional_codec 'G722'")
