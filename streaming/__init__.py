"""Streaming stages of a call: sentence segmentation for the TTS, telephone audio codecs."""
