"""Wire protocols: each turns its messages into CallSession calls and the
session's events into its own messages. No transport imports another."""
