"""The server around the calls: listeners and routes, admission, limits,
drain, metrics, tracing, logs, the shared runtime, config and CLI."""
