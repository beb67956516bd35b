"""The built-in call page (voice/server/web/), served by the server itself and
driven in a real browser: Debian's Chromium through Playwright, with a real
recording as its microphone.

Chromium's fake capture device plays a WAV file (a clip, then silence) in
a loop. The test drives the page's own buttons: Start, then Mute once the
clip's words are over, so the loop cannot talk over a reply that a loaded
machine makes slow; then Unmute at a moment when the loop's next words will
land while reply audio is still playing. That is the barge-in: the server
must send ``response.audio.clear`` and the page must stop its scheduled
audio. The clip is one read sentence without a pause (jfk.wav has two 1.1 s
pauses, which the default adaptive endpoint rightly takes as turn ends:
tests/test_asr.py), so a pass of the loop is one turn.

Set FIRSTLINE_SAVE_SCREENSHOT=1 to refresh the README's screenshot
(benchmarks/results/demo/demo_page.png).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from asr.vad import CHUNK, SileroVAD
from asr.wer import word_error_rate
from benchmarks.corpus import Utterance, shared_clip
from tests.http_get import http_get
from voice.server.app import DEMO_FILES, VoiceServer, page_url
from voice.server.config import ServerConfig

CHROMIUM = Path(os.environ.get("FIRSTLINE_CHROMIUM", "/usr/bin/chromium"))
HAVE_CHROMIUM = CHROMIUM.exists()
SCREENSHOT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo" / "demo_page.png"
CLIP = "librispeech_quilter.wav"  # "Mr. Quilter is the apostle of the middle classes…", 5.9 s
# More than the longest endpoint window (1.2 s), so every pass ends its turn;
# short, so that after an unmute the loop's words come back soon.
TRAILING_SILENCE_S = 2.0
# Unmute only if the reply audio queued in the page outlasts the wait for the
# loop's next words by this much (VAD needs 200 ms of voice; a loaded server
# takes a while to act on it).
BARGE_IN_MARGIN_S = 1.2
FRAME_S = 0.02  # the page sends 20 ms frames: its frame count is the call's audio clock
# A reply of many sentences: still playing when the caller speaks again.
STORY = "You are a storyteller. Always answer with a long story of many short sentences."
STAGES = ["speech_end", "endpoint", "asr_final", "first_token", "first_sentence", "first_audio"]


# ---- plain HTTP: the static route -----------------------------------------


async def test_page_and_assets_are_served_with_safe_headers(server: VoiceServer) -> None:
    expected = {
        "/": "text/html",
        "/demo": "text/html",
        "/demo/app.js": "text/javascript",
        "/demo/capture-worklet.js": "text/javascript",
        "/demo/style.css": "text/css",
        "/demo/favicon.svg": "image/svg+xml",
    }
    for path, content_type in expected.items():
        status, headers, body = await http_get(server.port, path)
        assert status == 200, (path, status)
        assert headers["content-type"].startswith(content_type), (path, headers)
        assert int(headers["content-length"]) == len(body) > 0
        assert headers["cache-control"] == "no-cache"
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp and "unsafe" not in csp
        assert headers["x-content-type-options"] == "nosniff"
    _, _, page = await http_get(server.port, "/?token=abc")  # the query is not part of the path
    assert b'src="demo/app.js"' in page and b"<script>" not in page  # no inline code: the CSP forbids it
    # Its links are relative (a proxy's path prefix is kept); from /demo/
    # they would miss, so /demo/ sends the browser to /demo, relatively.
    status, headers, _ = await http_get(server.port, "/demo/")
    assert status == 308 and headers["location"] == "../demo", (status, headers)
    # Only the allow-list: no traversal, no other file of the package.
    for path in ["/demo/../app.py", "/demo/%2e%2e/app.py", "/demo/__init__.py", "/demo/index.html/", "/demo//app.js",
                 "/demo/app.js/../../config.py", "/web/app.js", "/..%2fapp.py"]:  # fmt: skip
        status, _, _ = await http_get(server.port, path)
        assert status == 404, path


async def test_no_demo_turns_the_page_off(server: VoiceServer) -> None:
    side = VoiceServer(ServerConfig(port=0, demo_page=False), runtime=server.runtime)
    await side.start()
    try:
        for path in DEMO_FILES:
            status, headers, _ = await http_get(side.port, path)
            assert status == 404 and "content-security-policy" not in headers, path
        assert (await http_get(side.port, "/healthz"))[0] == 200
    finally:
        await side.close()


def test_cli_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from voice.server.cli import build_parser, config_from_args

    def demo_page(*argv: str) -> bool:
        return config_from_args(build_parser().parse_args(["serve", *argv])).demo_page

    monkeypatch.delenv("FIRSTLINE_DEMO_PAGE", raising=False)
    assert demo_page() is True
    assert demo_page("--no-demo") is False
    monkeypatch.setenv("FIRSTLINE_DEMO_PAGE", "0")
    assert demo_page() is False
    monkeypatch.setenv("FIRSTLINE_DEMO_PAGE", "1")
    assert demo_page() is True
    # The URL `make serve` prints: a wildcard bind is reached on loopback.
    assert page_url("127.0.0.1", 8765) == "http://127.0.0.1:8765/"
    assert page_url("0.0.0.0", 8765) == "http://127.0.0.1:8765/"
    assert page_url("::1", 8765) == "http://[::1]:8765/"


# ---- a call from Chromium ----------------------------------------------------


@dataclass
class Loop:
    """Where Chromium's looping fake microphone is, from the call's audio clock."""

    period_s: float  # clip + trailing silence
    onset_s: float  # first voiced sample of the clip
    end_s: float  # end of its last voiced chunk
    offset_s: float = 0.0  # file position at call-audio position 0

    def phase(self, frames_sent: int) -> float:
        return (frames_sent * FRAME_S + self.offset_s) % self.period_s

    def until_words(self, phase: float) -> float:
        """Seconds until the loop is speaking (0: it is now)."""
        if self.onset_s <= phase < self.end_s - 0.3:
            return 0.0
        return (self.onset_s - phase) % self.period_s

    def just_finished(self, phase: float) -> bool:
        """The clip's words are over and the silence has begun."""
        return self.end_s + 0.1 <= phase < self.end_s + 0.7


def fake_microphone(clip: Utterance, path: Path) -> Loop:
    """The clip as Chromium's fake capture wants it: a 16-bit PCM WAV, with
    trailing silence so the turn ends before the loop starts again."""
    audio = clip.load(16000)
    voiced = np.nonzero(SileroVAD().stream().process(audio) >= 0.5)[0]
    loop = Loop(
        period_s=len(audio) / 16000 + TRAILING_SILENCE_S,
        onset_s=float(voiced[0] * CHUNK / 16000),
        end_s=float((voiced[-1] + 1) * CHUNK / 16000),
    )
    audio = np.concatenate([audio, np.zeros(int(16000 * TRAILING_SILENCE_S), np.float32)])
    soundfile.write(str(path), audio, 16000, subtype="PCM_16")
    return loop


def chromium_args(wav: Path) -> list[str]:
    return [
        "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--headless=new",
        "--no-sandbox",  # containers (CI runs as root)
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--autoplay-policy=no-user-gesture-required",
        # A background tab's timers are throttled; the page is never in front here.
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
    ]


# What the barge-in driver needs from the page, in one round trip.
PROBE = """() => {
    const s = window.firstline;
    const turns = Object.values(s.turns);
    return {
        sent: s.mic.framesSent,
        muted: s.mic.muted,
        ahead: s.audio.active > 0 ? Math.max(0, s.audio.playingUntil - performance.now()) / 1000 : 0,
        stopped: s.audio.clearLog.some(c => c.stopped >= 1),
        idle: turns.length > 0 && turns.every(t => t.done) && s.audio.active === 0,
    };
}"""


class Page:
    """The page's own view of the call: window.firstline."""

    def __init__(self, page: Any) -> None:
        self.page = page

    async def state(self) -> dict[str, Any]:
        return json.loads(await self.page.evaluate("JSON.stringify(window.firstline)"))

    async def wait(self, condition: str, what: str, timeout_s: float) -> None:
        """Wait until a JS expression over `s` (window.firstline) is true."""
        try:
            await self.page.wait_for_function(
                f"(() => {{ const s = window.firstline; return Boolean({condition}); }})",
                timeout=timeout_s * 1000,
                polling=100,
            )
        except Exception as exc:
            state = await self.state()
            raise AssertionError(f"timed out waiting for {what}: {json.dumps(state)[:4000]}") from exc

    async def barge_in(self, loop: Loop, timeout_s: float) -> int:
        """Unmute when the loop's next words will land while reply audio is
        still queued; mute again when they are over (that turn then gets its
        reply: a new chance). Returns the number of unmutes it took."""
        deadline = time.monotonic() + timeout_s
        unmutes = 0
        while time.monotonic() < deadline:
            probe = await self.page.evaluate(PROBE)
            if probe["stopped"]:
                return unmutes
            phase = loop.phase(probe["sent"])
            wait_s = loop.until_words(phase)
            if probe["muted"] and not loop.just_finished(phase):
                # Over the reply; or, with nothing left to talk over, a new turn
                # (unmuted just before the words, so that it is a whole one).
                if probe["ahead"] > wait_s + BARGE_IN_MARGIN_S or (probe["idle"] and wait_s < 0.5):
                    await self.page.click("#mute")
                    unmutes += 1
            elif not probe["muted"] and loop.just_finished(phase):
                await self.page.click("#mute")
            await asyncio.sleep(0.1)
        state = json.dumps(await self.state())[:4000]
        raise AssertionError(f"no barge-in while audio played after {unmutes} unmutes: {state}")


def same_words(reference: str, heard: str) -> float:
    """WER of a final against the clip. A turn that spans two passes of the
    loop (the caller "resumed" before the reply started, so the words were
    joined) holds the clip twice: compare against it repeated."""
    passes = max(1, round(len(heard.split()) / len(reference.split())))
    return word_error_rate(" ".join([reference] * passes), heard)


@pytest.mark.realtime
@pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"{CHROMIUM} missing (make test-deps installs Debian's chromium)")
async def test_call_from_chromium(server: VoiceServer, tmp_path: Path) -> None:
    async_api = pytest.importorskip("playwright.async_api")
    clip = shared_clip(CLIP)
    wav = tmp_path / "mic.wav"
    loop = fake_microphone(clip, wav)
    started = time.monotonic()
    async with async_api.async_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user-data-dir).
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav), timeout=60_000)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            await page.goto(f"http://127.0.0.1:{server.port}/", wait_until="load")
            await page.click("details.options summary")
            await page.fill("#system-prompt", STORY)
            await page.click("#call")
            fl = Page(page)
            await fl.wait("s.state === 'live'", "the call to start", 60)
            assert (await fl.state())["replyAudio"] == {"encoding": "pcm16", "sample_rate": 16000, "frame_bytes": 640}

            # The clip's first pass is the first turn; then quiet, however long
            # the reply takes. (The file starts with the capture, a little
            # before the page's first frame, so this clock is never early.)
            await fl.wait(f"s.mic.framesSent * {FRAME_S} >= {loop.end_s + 0.15}", "the clip's first pass", 60)
            await page.click("#mute")
            await fl.wait("Object.values(s.turns).some(t => t.final)", "a final transcript", 90)
            first_final = next(t for t in (await fl.state())["turns"].values() if t["final"])
            # Calibrate the loop's clock on where the server heard the words end.
            loop.offset_s = loop.end_s - first_final["audioEndMs"] / 1000
            await fl.wait("Object.values(s.turns).some(t => t.sentences.length > 0)", "a first sentence", 90)
            await fl.wait("s.audio.marksPlayed >= 1 && s.audio.secondsPlayed > 1", "reply audio played", 120)
            # The caller talks over the reply, which stops.
            unmutes = await fl.barge_in(loop, 180)
            # Every stage of a turn in the waterfall, from turn.metrics + turn.audio_metrics.
            await fl.wait(
                "Object.values(s.turns).some(t => t.metrics && t.metrics.first_sentence_ms !== null && t.audioMetrics)",
                "a full waterfall",
                60,
            )
            await page.click("#call")  # hang up
            await fl.wait("s.state === 'ended'", "the hang-up", 30)
            state = await fl.state()
            # Hung up means quiet: no capture, no playback, ready for a new call.
            hung_up = await page.evaluate(
                "[document.getElementById('mic-level').style.width, document.getElementById('playing').className,"
                " document.getElementById('call').textContent]"
            )
            assert hung_up == ["0%", "light", "Start call"], hung_up
            assert state["audio"]["active"] == 0, state["audio"]
            waterfalls = await page.evaluate(
                """() => [...document.querySelectorAll('#waterfalls .wf')].map(box => ({
                    turn: Number(box.dataset.turn),
                    rows: Object.fromEntries([...box.querySelectorAll('.wf-row[data-stage]')].map(
                        row => [row.dataset.stage, row.dataset.ms === '' ? null : Number(row.dataset.ms)])),
                    ttfs: box.querySelector('.kpi.ttfs').dataset.ms,
                    ttfa: box.querySelector('.kpi.ttfa').dataset.ms,
                    bars: box.querySelectorAll('.wf-bar').length,
                }))"""
            )
            finals = await page.eval_on_selector_all(
                "#turns li .you[data-final=true] .text", "nodes => nodes.map(n => n.textContent)"
            )
            shown = await page.inner_text("#turns")
            stats_text = await page.inner_text("section.stats")
            shot = tmp_path / "demo_page.png"
            await page.screenshot(path=str(shot), full_page=True, animations="disabled")
        finally:
            await browser.close()
    dump = json.dumps(state)[:4000]
    elapsed = time.monotonic() - started

    # Transcripts: the first turn's final is the clip's words, on the page.
    turns = {int(k): v for k, v in state["turns"].items()}
    assert same_words(clip.reference, first_final["final"]) <= 0.5, (clip.reference, first_final["final"])
    assert first_final["final"] in finals, finals
    # Partials while the caller spoke, if the server sent any (it sheds them
    # when ASR is behind, as on a loaded machine): the page kept them.
    if state["events"].get("transcript.partial"):
        assert any(t["partial"] for t in turns.values()), dump

    # The reply: sentences shown as they came, their audio scheduled and played.
    answered = [t for t in turns.values() if t["sentences"]]
    assert answered and answered[0]["sentences"][0] in shown, dump
    audio = state["audio"]
    assert audio["framesReceived"] >= 50 and audio["framesScheduled"] >= 50, dump  # ≥ 1 s of 20 ms frames
    assert audio["peak"] > 0.05, f"reply audio is silence: {dump}"
    assert audio["marksPlayed"] >= 1 and audio["secondsPlayed"] > 1.0, dump
    assert state["mic"]["framesSent"] > 5 / FRAME_S, dump  # the microphone really went up

    # The waterfall: every stage of a turn has a time; TTFS and TTFA as numbers.
    full = [w for w in waterfalls if all(w["rows"].get(stage) is not None for stage in STAGES)]
    assert full, waterfalls
    w = full[-1]
    metrics = turns[w["turn"]]["metrics"]
    assert w["bars"] == len(STAGES) - 1 and float(w["ttfs"]) == metrics["ttfs_ms"] > 0, (w, metrics)
    assert float(w["ttfa"]) >= float(w["ttfs"]), w
    assert "TTFS P50" in stats_text.upper() and state["ttfs"] and state["ttfa"], stats_text

    # Barge-in: a clear stopped audio that was really playing, all of it, at once.
    clears = audio["clearLog"]
    clear = next(c for c in clears if c["stopped"] >= 1)
    assert all(c["activeAfter"] == 0 for c in clears), clears
    assert clear["droppedS"] > 0 and turns[clear["turn"]]["bargeIn"], (clear, dump)
    assert not problems, problems
    if os.environ.get("FIRSTLINE_SAVE_SCREENSHOT") == "1":  # only a passing call makes the README
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    print(f"browser call: {elapsed:.1f} s, {len(turns)} turns, {unmutes} unmutes, clears {clears}, waterfall {w}")


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"{CHROMIUM} missing (make test-deps installs Debian's chromium)")
# A token a subprotocol holds as it is, and a base64 one ('/', '+', '='),
# which went in the URL's query.
@pytest.mark.parametrize("secret", ["page-secret", "pa/ge+secret=="])
async def test_the_page_sends_its_token_as_a_subprotocol(server: VoiceServer, tmp_path: Path, secret: str) -> None:
    """On a server with --auth-token, the page's call goes through with the
    token typed in, carried as a subprotocol (not in the URL, which proxies
    log), and a wrong one is refused."""
    from tests.conftest import side_server

    async_api = pytest.importorskip("playwright.async_api")
    wav = tmp_path / "mic.wav"
    fake_microphone(shared_clip(CLIP), wav)
    async with side_server(server, auth_token=secret) as srv, async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(wav), timeout=60_000)
        try:
            page = await (await browser.new_context()).new_page()
            urls: list[str] = []
            page.on("websocket", lambda ws: urls.append(ws.url))
            await page.goto(f"http://127.0.0.1:{srv.port}/", wait_until="load")
            fl = Page(page)
            await page.fill("#token", "wrong")
            await page.click("#call")
            await fl.wait("s.state === 'failed' || s.state === 'ended'", "the refusal", 30)
            await page.fill("#token", secret)
            await page.click("#call")
            await fl.wait("s.state === 'live'", "the call to start", 60)
            await page.click("#call")  # hang up
            await fl.wait("s.state === 'ended'", "the hang-up", 30)
            assert urls and not any("token" in url for url in urls), urls
        finally:
            await browser.close()
