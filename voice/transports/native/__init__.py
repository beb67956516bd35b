"""firstline's own websocket protocol (docs/protocol.md), at /v1/call."""
