"""FreeSWITCH ``mod_audio_stream`` (amigniter's module; not in Debian).

FreeSWITCH is the websocket client: ``uuid_audio_stream <uuid> start
wss://HOST/freeswitch mono 16k <metadata>``. It sends the metadata text
first, then the caller's audio as binary L16 (16-bit little-endian PCM)
frames, 20 ms each by default. The rate is not on the wire, so the metadata
must say it: a JSON object with ``sample_rate`` (8000 or 16000, as the
command's ``8k``/``16k``), the rest read as any carrier's custom
parameters (``firstline_secret``, ``system_prompt``; any other field is the
call's metadata: voice/transports/carriers/parameters.py). Without it the call is refused at
once (``unsupported_media_format``): audio read at a guessed rate is
garbage the ASR would answer.

Out: the open-source module has no audio channel back. A ``streamAudio``
message (``audioDataType: raw`` at the stream's rate, base64) is written to
a file and announced as the ESL event ``mod_audio_stream::play``, which the
application plays (``uuid_broadcast``). So each sentence goes as one such
message (20 ms messages would be 50 files a second; a sentence over
MAX_MESSAGE_S in parts), at most ``lead_s`` ahead of playback, and on
barge-in firstline sends ``{"type": "clear"}``, surfaced as
``mod_audio_stream::json``, on which the application stops its playback
(``uuid_break <uuid> all``). No marks: what the caller heard is the
playout clock's. The call ends when FreeSWITCH closes the socket
(``uuid_audio_stream <uuid> stop``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from streaming.playout import OutFormat
from streaming.shown import shown_value
from voice.transports.carriers.parameters import start_from_parameters
from voice.transports.media_json import MAX_TEXT_FRAME, WebSocketCall, b64encode
from voice.transports.telephony import MalformedMessage, UnsupportedMedia

log = logging.getLogger(__name__)

PATH = "/freeswitch"
# The command's rates, as a number or as the command spells them.
RATES = {"8000": 8000, "16000": 16000, "8k": 8000, "16k": 16000}
FRAME_S = 0.02
# The most audio one streamAudio message carries: a longer sentence goes in
# parts (each a file the application plays in turn). 4 s at 16 kHz is
# 171 KB of base64, inside the connection's write buffer.
MAX_MESSAGE_S = 4.0


def _scalar(value: object) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def parse_metadata(text: str) -> tuple[int, dict[str, Any]]:
    """The metadata text -> (sample rate, the rest); refused if it does not
    say the rate."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise UnsupportedMedia('metadata must be a JSON object with "sample_rate" (8000 or 16000)')
    given = meta.get("sample_rate")
    # A number or a string only: a list or an object is no rate (and is
    # not hashable: looked up as it is, it ended the call as a server error).
    rate = RATES.get(str(given).lower()) if _scalar(given) else None
    if rate is None:
        raise UnsupportedMedia(f"metadata sample_rate {shown_value(given)} is not 8000 or 16000")
    channels = meta.get("channels", 1)
    if not _scalar(channels) or channels != 1:
        # "stereo" interleaves two channels, read here as one: garbage the
        # ASR would answer. ("mixed" is one channel with the agent's own
        # voice in it: the docs say to stream "mono".)
        raise UnsupportedMedia(f"metadata channels {shown_value(channels)}: stream the caller alone ('mono')")
    return rate, {k: v for k, v in meta.items() if k not in ("sample_rate", "channels")}


class FreeSwitchCall(WebSocketCall):
    transport = "freeswitch"
    echoes_marks = False
    # At most this far ahead of the playout clock. Pacing holds back each
    # 20 ms chunk, and a message goes when its sentence (or part) is whole,
    # so with a lead of a message's length and 2 s more the next file is
    # always in before the one before it ends: no gap between sentences.
    lead_s = MAX_MESSAGE_S + 2.0

    rate = 8000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sentence = bytearray()  # the sentence's 20 ms chunks, sent whole at its end

    async def on_text(self, frame: str) -> None:
        if self.session.started:
            # The module's `send_text` and `stop <metadata>` texts: the
            # application's, nothing for the call to act on.
            if len(frame) > MAX_TEXT_FRAME:
                raise MalformedMessage(f"text frame of {len(frame)} chars")
            self.take_control_event(len(frame))
            log.debug("call %s (freeswitch): text message of %d chars", self.call_id, len(frame))
            return
        if len(frame) > MAX_TEXT_FRAME:
            raise UnsupportedMedia(f"metadata of {len(frame)} chars")
        rate, params = parse_metadata(frame)
        self.rate = rate
        # No resume key: the module does not reconnect a stream it lost.
        start = start_from_parameters("pcm16", rate, params, self.runtime.config)
        await self.begin(start, OutFormat.framed("pcm16", rate, FRAME_S))

    async def on_binary(self, frame: bytes) -> None:
        if not self.session.started:
            raise UnsupportedMedia('audio before the metadata: send a JSON object with "sample_rate" first')
        await self.audio(frame)

    async def send_audio(self, chunk: bytes) -> None:
        self._sentence += chunk
        if len(self._sentence) >= MAX_MESSAGE_S * self.rate * 2:
            await self._send_sentence()

    async def send_mark(self, name: str) -> None:
        # The end of a sentence: its audio goes as one message.
        await self._send_sentence()

    async def _send_sentence(self) -> None:
        if not self._sentence:
            return
        data, self._sentence = bytes(self._sentence), bytearray()
        await self.send_json(
            {
                "type": "streamAudio",
                "data": {"audioDataType": "raw", "sampleRate": self.rate, "audioData": b64encode(data)},
            }
        )

    async def send_clear(self) -> None:
        self._sentence.clear()
        await self.send_json({"type": "clear"})


handle_freeswitch = FreeSwitchCall.handle
