"""Model assemblies: decoder layers + embeddings + head, per Gemma 4 family member."""

from gemma4x.models.text import DecoderLayer, Gemma4TextModel

__all__ = ["DecoderLayer", "Gemma4TextModel"]
