"""Every websocket route: path -> transport handler. The only module, with
the app that serves it, that knows the transports. AudioSocket is TCP:
see voice.transports.audiosocket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection

from voice.server.runtime import Runtime
from voice.transports.carriers import asterisk_ws, exotel, freeswitch, plivo, telnyx, twilio, vonage
from voice.transports.native import call as native
from voice.transports.realtime import call as realtime

CallHandler = Callable[[ServerConnection, Runtime], Awaitable[None]]

NATIVE_PATH = "/v1/call"

WS_ROUTES: dict[str, CallHandler] = {
    NATIVE_PATH: native.handle_native,
    twilio.PATH: twilio.handle_twilio,
    telnyx.PATH: telnyx.handle_telnyx,
    plivo.PATH: plivo.handle_plivo,
    exotel.PATH: exotel.handle_exotel,
    vonage.PATH: vonage.handle_vonage,
    asterisk_ws.PATH: asterisk_ws.handle_asterisk_ws,
    freeswitch.PATH: freeswitch.handle_freeswitch,
    realtime.PATH: realtime.handle_realtime,
}
