"""Gemma 4 building blocks; each module has ``forward`` (gemma4x ops) and ``forward_native``."""
