"""LLM engines behind one interface: llama.cpp (embedded CPU), vLLM (in-process), remote."""
