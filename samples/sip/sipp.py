"""Drive SIPp (Debian ``sip-tester``) against the bridge, on loopback only.

``prepare_call`` turns a recording into the raw G.711 file SIPp's
``rtp_stream`` plays (payload type 0 or 8, 160 bytes per 20 ms packet) and fills
in a scenario from ``scenarios/``; ``sipp_command`` builds the command line.
"""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
LOOPBACK = "127.0.0.1"
DTMF_DIR = Path("/usr/share/sip-tester")


def sipp_binary() -> str | None:
    return shutil.which("sipp")


def dtmf_pcap(digit: str) -> Path:
    name = {"*": "star", "#": "pound"}.get(digit, digit)
    return DTMF_DIR / f"dtmf_2833_{name}.pcap"


def _alaw_encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # A-law works on 13 bits (audioop.lin2alaw)
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.minimum(np.where(pcm >= 0, pcm, -pcm - 1), 0xFFF)
    exponent = np.where(mag >= 32, np.floor(np.log2(np.maximum(mag, 1))).astype(np.int32) - 4, 0)
    mantissa = np.where(exponent == 0, mag >> 1, mag >> exponent) & 0x0F
    return (((exponent << 4) | mantissa) ^ mask).astype(np.uint8)


PCM_TO_ALAW = _alaw_encode_table()
PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}


def write_g711(pcm16: np.ndarray, path: Path, codec: str = "PCMU") -> Path:
    """Mono int16 8 kHz samples -> raw G.711 bytes, as SIPp's rtp_stream plays them."""
    from bridge import ulaw_encode  # samples/sip/bridge.py

    pcm = np.asarray(pcm16, dtype="<i2")
    if codec == "PCMU":
        path.write_bytes(ulaw_encode(pcm.tobytes()))
    elif codec == "PCMA":
        path.write_bytes(PCM_TO_ALAW[pcm.astype(np.int32) + 32768].tobytes())
    else:
        raise ValueError(f"codec {codec!r}: PCMU or PCMA")
    return path


def read_wav_8k(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getframerate() != 8000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: need 8 kHz 16-bit mono (Asterisk prompts are)")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def prepare_call(
    workdir: Path,
    pcm16: np.ndarray,
    hold_ms: int,
    digit: str | None = "5",
    template: str = "uac_speech.xml",
    codec: str = "PCMU",
) -> Path:
    """Write the audio and a ready-to-run scenario into ``workdir``; returns the scenario.
    ``codec="PCMA"`` offers A-law only and streams A-law."""
    audio = write_g711(pcm16, workdir / f"caller.{codec.lower()}", codec)
    text = (SCENARIOS / template).read_text()
    if codec == "PCMA":
        text = text.replace("RTP/AVP 0 8 101", "RTP/AVP 8 101").replace("      a=rtpmap:0 PCMU/8000\n", "")
        text = text.replace("@AUDIO@,1,0", "@AUDIO@,1,8")
    if digit is None:  # no key press: drop the RFC 4733 pcap
        text = "\n".join(line for line in text.splitlines() if "@DTMF_PCAP@" not in line)
    else:
        text = text.replace("@DTMF_PCAP@", str(dtmf_pcap(digit)))
    text = text.replace("@AUDIO@", str(audio))
    text = text.replace("@HOLD_MS@", str(int(hold_ms)))
    out = workdir / template
    out.write_text(text)
    return out


def sipp_command(scenario: Path, bridge_sip_port: int, sip_port: int, media_port: int, calls: int = 1) -> list[str]:
    return [
        sipp_binary() or "sipp",
        f"{LOOPBACK}:{bridge_sip_port}",
        "-sf",
        str(scenario),
        "-i",
        LOOPBACK,
        "-mi",
        LOOPBACK,
        "-p",
        str(sip_port),
        "-mp",
        str(media_port),
        "-m",
        str(calls),
        "-l",
        str(calls),
        "-r",
        str(calls),
        "-nostdin",
        "-trace_err",
        "-timeout",
        "90s",
        "-timeout_error",
    ]
