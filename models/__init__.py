"""The decoder and cached generation."""

from models.generation import KVCache, generate
from models.transformer import ModelConfig, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer", "generate"]
