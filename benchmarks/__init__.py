"""Latency benchmarks and the real-speech corpus they (and the tests) play."""
