"""The caller's side of every wire protocol firstline speaks, once each.

One module per protocol, each a :class:`~benchmarks.callers.base.Wire` (or,
for AudioSocket over TCP, its equivalent): ``native``, ``realtime``,
``twilio``, ``telnyx``, ``plivo``, ``exotel``, ``vonage``, ``asterisk_ws``,
``freeswitch`` and ``audiosocket``. ``base`` has what is the same for all of them. The
drivers (test fakes, load generator, NativeCaller, the SIP bridge) build and
read messages only through these. Standard library only.
"""

from __future__ import annotations

from benchmarks.callers.asterisk_ws import AsteriskWS
from benchmarks.callers.base import Audio, Clear, Control, Event, Mark, Message, ServerEvent, Wire, WireError
from benchmarks.callers.exotel import Exotel
from benchmarks.callers.freeswitch import FreeSwitch
from benchmarks.callers.native import Native
from benchmarks.callers.plivo import Plivo
from benchmarks.callers.realtime import Realtime
from benchmarks.callers.telnyx import Telnyx
from benchmarks.callers.twilio import Twilio
from benchmarks.callers.vonage import Vonage

# The websocket protocols by name.
WIRES: dict[str, type[Wire]] = {
    w.name: w for w in (Native, Realtime, Twilio, Telnyx, Plivo, Exotel, Vonage, AsteriskWS, FreeSwitch)
}

__all__ = [
    "WIRES",
    "AsteriskWS",
    "Audio",
    "Clear",
    "Control",
    "Event",
    "Exotel",
    "FreeSwitch",
    "Mark",
    "Message",
    "Native",
    "Plivo",
    "Realtime",
    "ServerEvent",
    "Telnyx",
    "Twilio",
    "Vonage",
    "Wire",
    "WireError",
]
