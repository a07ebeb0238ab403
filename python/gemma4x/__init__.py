"""gemma4x: fast, faithful Gemma 4 inference on NVIDIA GPUs."""

from __future__ import annotations

__version__ = "0.1.0"

from gemma4x import ops, reference  # noqa: E402,F401


def __getattr__(name: str):
    # The runtime pulls in the model stack; import it only when asked for.
    if name in ("ChatResult", "Gemma4Runtime", "GenerationResult"):
        from gemma4x import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'gemma4x' has no attribute {name!r}")
