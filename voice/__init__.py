"""The voice server: a call from the wire to a sentence back out.

- ``voice.call``: one call, whatever its transport (session, turn, history
  and reply policy, how a call starts). Imports asr, llm, streaming and the
  server's shared runtime; never a transport.
- ``voice.transports``: one wire protocol each (native, Realtime, the
  carriers, AudioSocket), over two shared bases (``telephony``: reply audio
  out; ``media_json``: the websocket read loop and JSON helpers). A transport
  imports ``voice.call``, the bases and the server's per-call services, never
  a sibling transport.
- ``voice.server``: listeners, routes, admission, limits, metrics, tracing,
  logs, runtime, config, CLI. Only ``app``, ``routes`` and ``cli`` import
  transports.

tests/test_architecture.py checks these rules; docs/architecture.md draws
the flow.
"""
