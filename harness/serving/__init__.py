"""Serving engines driven across a process boundary (vLLM: docs/vllm.md)."""
