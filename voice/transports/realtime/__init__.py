"""The OpenAI-Realtime-compatible endpoint (docs/realtime.md), at
/v1/realtime: one small handler per client event, by event family."""
