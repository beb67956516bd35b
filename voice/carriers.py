"""Websocket routes of the carrier and Realtime transports (merged into
voice.server.WS_ROUTES). AudioSocket is TCP: see voice.audiosocket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection

from voice import asterisk_ws, exotel, plivo, realtime, telnyx, twilio, vonage
from voice.runtime import Runtime

CARRIER_ROUTES: dict[str, Callable[[ServerConnection, Runtime], Awaitable[None]]] = {
    twilio.PATH: twilio.handle_twilio,
    telnyx.PATH: telnyx.handle_telnyx,
    plivo.PATH: plivo.handle_plivo,
    exotel.PATH: exotel.handle_exotel,
    vonage.PATH: vonage.handle_vonage,
    asterisk_ws.PATH: asterisk_ws.handle_asterisk_ws,
    realtime.PATH: realtime.handle_realtime,
}
