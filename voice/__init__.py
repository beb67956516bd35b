"""The server, its transports and the per-call session."""
