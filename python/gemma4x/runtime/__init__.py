"""Serving runtime: Gemma4Runtime (load, score, generate), KV cache, sampler, CUDA-graph decode."""

from gemma4x.runtime.runtime import ChatResult, Gemma4Runtime, GenerationResult

__all__ = ["ChatResult", "Gemma4Runtime", "GenerationResult"]
