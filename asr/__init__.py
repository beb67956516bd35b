"""Audio in, VAD, streaming Whisper, transcripts out."""
