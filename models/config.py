"""The decoder's configuration, without torch: `DecoderShape` (the `model.*` keys of a run,
a Hydra structured config) and `ModelConfig` (the shape plus the positional encoding, what a
checkpoint stores and `Transformer` is built from)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bipe.config import PEConfig, build
from bipe.errors import ConfigError


@dataclass
class DecoderShape:
    """The `model` config group: a Llama-style decoder's sizes (docs/methods.md section 1)."""

    vocab_size: int | None = None  # None: the tokenizer's size (a run fills it in)
    n_layers: int = 4
    hidden_size: int = 128
    n_heads: int = 4
    intermediate_size: int | None = None  # SwiGLU width; None = 4 * hidden (paper: 3072 for 768)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02


@dataclass
class ModelConfig(DecoderShape):
    """A decoder and its positional encoding; every value checked (one line naming the key)."""

    vocab_size: int | None = 8192
    pe: PEConfig = field(default_factory=lambda: PEConfig.named("rope"))

    def __post_init__(self) -> None:
        self.pe = build(PEConfig, self.pe, "pe")
        for key in ("vocab_size", "n_layers", "hidden_size", "n_heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key}={value!r} must be a positive integer")
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.n_heads={self.n_heads}; choose sizes whose ratio is the "
                              "head size")
        if self.pe.relative.type in ("rope", "xpos") and self.head_dim % 2:
            raise ConfigError(f"rotary head size model.hidden_size/model.n_heads="
                              f"{self.head_dim} is odd; RoPE rotates pairs of dimensions, "
                              "choose an even head size")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return build(cls, data, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
