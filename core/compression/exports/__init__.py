"""Formats an artifact is also written in, for the tools users run (ONNX Runtime, transformers/vLLM, llama.cpp)."""
