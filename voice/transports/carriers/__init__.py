"""Telephony carriers' media-stream websockets (docs/telephony.md): Twilio,
Telnyx, Plivo, Exotel, Vonage, Asterisk chan_websocket."""
