"""Twilio Media Streams, bidirectional (``<Connect><Stream url="wss://…/twilio">``).

In: ``connected``, ``start``, ``media`` (base64 μ-law 8 kHz), ``dtmf``,
``mark`` (our mark, echoed once the audio before it has played or was
cleared), ``stop``. Out: ``media`` (20 ms μ-law frames), a ``mark`` after
each reply sentence, and ``clear`` on barge-in. ``<Parameter>`` values arrive
as ``start.customParameters``; ``system_prompt`` among them sets the call's
prompt. Binary or malformed frames are logged and ignored, as Twilio does
(warnings 31950/31951).

Benchmark side channel (off unless asked for): with the custom parameter
``firstline_events`` = ``"1"`` the call also gets every session event
(``transcript.final``, ``response.sentence``, ``turn.metrics``…, as on the
native protocol) wrapped as ``{"event": "firstline", "streamSid", "firstline":
<event>}``, so a load generator speaking the Twilio shape can see transcripts
and per-turn stage timings. Real Twilio never sets it (it would log 31951).

Re-attach (docs/scaling.md): when the stream closes without the call ending
(its replica died, or a drain ran out of time), Twilio fetches the
``<Connect action=…>`` URL. Pointed at ``/twilio/reconnect`` (method GET),
any replica answers with TwiML for a new ``<Stream>`` to the same public
URL, so the call lands on a healthy replica and, keyed by its ``callSid``,
picks up its conversation from the shared store. Bounded: after
:data:`MAX_REATTACH` re-attaches the answer is ``<Hangup/>``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import urlencode, urlsplit
from xml.sax.saxutils import quoteattr

from streaming.playout import OutFormat
from voice.transports.carriers.parameters import RESUME_PARAMETER, start_from_parameters
from voice.transports.media_json import MarkStyleCall, as_int, b64decode, b64encode, obj, optional_obj
from voice.transports.telephony import MalformedMessage, UnsupportedMedia

PATH = "/twilio"
RECONNECT_PATH = "/twilio/reconnect"
MAX_REATTACH = 3
HANGUP_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>'


def resume_proof(token: str, call_sid: str) -> str:
    """What /twilio/reconnect puts in the TwiML of a re-attaching stream,
    and the stream's start must carry to get its call's conversation back:
    keyed with the Twilio auth token every replica holds."""
    return hmac.new(token.encode(), f"firstline-resume:{call_sid}".encode(), hashlib.sha256).hexdigest()[:32]


def reattach_twiml(origin: str, attempt: int, parameters: dict[str, str] | None = None) -> str:
    """TwiML that connects the call to ``origin`` (``https://voice.example.com``)
    again, with a ``<Connect action>`` back here for the next time; a
    ``<Hangup/>`` once ``attempt`` is over :data:`MAX_REATTACH` (a stream that
    keeps failing must not loop the caller forever)."""
    if attempt > MAX_REATTACH:
        return HANGUP_TWIML
    parts = urlsplit(origin)
    secure = parts.scheme in ("https", "wss")  # an origin given as the stream's own scheme counts too
    where = parts.netloc + parts.path.rstrip("/")
    ws_origin = f"{'wss' if secure else 'ws'}://{where}"
    action = f"{'https' if secure else 'http'}://{where}{RECONNECT_PATH}?{urlencode({'attempt': attempt + 1})}"
    params = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in (parameters or {}).items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Response>'
        f'<Connect action={quoteattr(action)} method="GET"><Stream url={quoteattr(ws_origin + PATH)}>{params}</Stream>'
        "</Connect></Response>"
    )


ENCODINGS = {"audio/x-mulaw": "mulaw"}


class TwilioCall(MarkStyleCall):
    transport = "twilio"
    frame_s = 0.02

    stream_sid: str | None = None
    events_channel = False  # customParameters.firstline_events: mirror session events (benchmarks)

    async def on_connected(self, msg: dict[str, Any]) -> None:
        pass  # first frame; carries no stream id yet

    async def on_start(self, msg: dict[str, Any]) -> None:
        if self.session.started:
            raise MalformedMessage("second 'start'")
        start = obj(msg, "start")
        sid = start.get("streamSid") or msg.get("streamSid")
        if not isinstance(sid, str) or not sid:
            raise MalformedMessage("start without streamSid")
        fmt = optional_obj(start, "mediaFormat")
        named = fmt.get("encoding", "audio/x-mulaw")
        if not isinstance(named, str):
            raise MalformedMessage("mediaFormat.encoding is not a string")
        encoding = ENCODINGS.get(named)
        rate = as_int(fmt.get("sampleRate", 8000), "sampleRate")
        if encoding is None or rate != 8000:
            raise UnsupportedMedia(
                f"unsupported media format {named[:24]!r} at {rate} Hz; Twilio streams audio/x-mulaw at 8000 Hz"
            )
        self.stream_sid = sid
        params = optional_obj(start, "customParameters")
        self.events_channel = str(params.get("firstline_events", "")).lower() in ("1", "true", "yes")
        out = OutFormat("mulaw", 8000, chunk_bytes=160)
        call_sid = start.get("callSid")
        # The call id in metadata too (correlation with Twilio's logs), the
        # carrier's own over a custom parameter of that name.
        named = {**params, "callSid": call_sid}
        begun = start_from_parameters(encoding, rate, named, self.runtime.config, carrier="twilio", call_id=call_sid)
        token = self.runtime.config.twilio_auth_token
        if token:
            # A signed upgrade proves the stream is Twilio's, not which call it
            # is (the signature covers only the URL, the same for every call):
            # the stored conversation goes only to a stream /twilio/reconnect
            # named with its proof. A fresh call skips the store's round trip.
            given = params.get(RESUME_PARAMETER)
            begun.may_resume = (
                isinstance(call_sid, str)
                and isinstance(given, str)
                and hmac.compare_digest(given.encode(errors="surrogatepass"), resume_proof(token, call_sid).encode())
            )
        await self.begin(begun, out)

    async def on_media(self, msg: dict[str, Any]) -> None:
        media = obj(msg, "media")
        if media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return  # only the caller's side is ours to hear
        await self.audio(b64decode(media.get("payload")))

    # ---- out ----------------------------------------------------------

    async def send_audio(self, chunk: bytes) -> None:
        await self.send_json({"event": "media", "streamSid": self.stream_sid, "media": {"payload": b64encode(chunk)}})

    async def send_mark(self, name: str) -> None:
        await self.send_json({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def send_clear(self) -> None:
        await self.send_json({"event": "clear", "streamSid": self.stream_sid})

    async def on_session_event(self, ev: dict[str, Any]) -> None:
        if self.events_channel:
            await self.send_json({"event": "firstline", "streamSid": self.stream_sid, "firstline": ev})


handle_twilio = TwilioCall.handle
