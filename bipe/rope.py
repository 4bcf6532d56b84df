"""Rotary position embedding (RoPE) over arbitrary integer positions, with context scaling.

The layout is Hugging Face Llama's half-split one: dimension `d` pairs with `d + D/2`, so
Llama-format checkpoints load without permuting q/k weights. cos/sin are computed from the
positions of each forward pass, so there is no precomputed table to overflow at 8x or 64x the
training length. Scaling types follow docs/methods.md section 5 (YaRN paper, HF
`modeling_rope_utils`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bipe.config import normalize_scaling
from bipe.errors import ConfigError
from bipe.relative import FrequencyRotation, RotaryPart
from bipe.relative import apply_rotary as apply_rotary  # re-exported: the public layout helpers
from bipe.relative import rotate_half as rotate_half


def _base_inv_freq(head_dim: int, base: float) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _linear(head_dim: int, base: float, s: Mapping[str, Any], seq_len: int | None):
    """Position interpolation: every position divided by the factor."""
    return _base_inv_freq(head_dim, base) / s["factor"], 1.0


def _ntk(head_dim: int, base: float, s: Mapping[str, Any], seq_len: int | None):
    """NTK-aware: the base becomes `b * s^(D / (D - 2))`."""
    return _base_inv_freq(head_dim, base * s["factor"] ** (head_dim / (head_dim - 2))), 1.0


def _dynamic(head_dim: int, base: float, s: Mapping[str, Any], seq_len: int | None):
    """Dynamic NTK, as Hugging Face's `dynamic`: past `original_max_position` (L) the base
    becomes `b * (factor * seq_len / L - (factor - 1)) ^ (D / (D - 2))` for the current length;
    with `factor` 1 (the default) the NTK factor is simply `seq_len / L`."""
    original = s["original_max_position"]
    if seq_len is None or seq_len <= original:
        return _base_inv_freq(head_dim, base), 1.0
    factor = s.get("factor") or 1.0
    ntk = factor * seq_len / original - (factor - 1)
    return _base_inv_freq(head_dim, base * ntk ** (head_dim / (head_dim - 2))), 1.0


def yarn_correction_dim(rotations: float, head_dim: int, base: float, length: int) -> float:
    """Index of the frequency pair that turns `rotations` times within `length` tokens."""
    return head_dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp_range(head_dim: int, base: float, original: int, beta_fast: float = 32.0,
                    beta_slow: float = 1.0) -> tuple[int, int]:
    """Frequency pairs `[low, high]` over which YaRN ramps from keeping to interpolating."""
    low = math.floor(yarn_correction_dim(beta_fast, head_dim, base, original))
    high = math.ceil(yarn_correction_dim(beta_slow, head_dim, base, original))
    # Clamped to [0, D - 1] as in the YaRN reference code and Hugging Face (not D/2 - 1): the
    # same ramp wherever it ends inside the pairs, and equal frequencies where it does not.
    return max(low, 0), min(high, head_dim - 1)


def _yarn(head_dim: int, base: float, s: Mapping[str, Any], seq_len: int | None):
    """NTK-by-parts: fast pairs keep their frequency, slow ones are divided by the factor."""
    factor = s["factor"]
    inv_freq = _base_inv_freq(head_dim, base)
    low, high = yarn_ramp_range(head_dim, base, s["original_max_position"],
                                s.get("beta_fast", 32.0), s.get("beta_slow", 1.0))
    # ramp = 0 for pairs that rotate fast (kept), 1 for slow ones (interpolated).
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3))
    ramp = ramp.clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    scale = s.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, float(scale)


# One function per scaling type (the keys each takes: `bipe.config.SCALING_KEYS`).
SCALING_FUNCTIONS: dict[str, Callable] = {"linear": _linear, "ntk": _ntk, "dynamic": _dynamic,
                                          "yarn": _yarn}


def rope_frequencies(head_dim: int, base: float = 10000.0,
                     scaling: Mapping[str, Any] | None = None,
                     seq_len: int | None = None) -> tuple[Tensor, float]:
    """Rotary frequencies: `(inv_freq float32 [head_dim // 2], attention_scale)`.

    `attention_scale` multiplies cos and sin (so logits grow by its square); 1.0 unless YaRN.
    `seq_len` is the current length, used by `dynamic` scaling only.
    """
    if head_dim % 2:
        raise ConfigError(f"rotary head size {head_dim} is odd; choose model.hidden_size / "
                          "model.n_heads even")
    scaling = normalize_scaling(scaling)
    if scaling is None:
        return _base_inv_freq(head_dim, base).float(), 1.0
    if scaling.get("factor", None) == 1 and scaling["type"] != "dynamic":
        return _base_inv_freq(head_dim, base).float(), 1.0  # exactly unscaled
    inv_freq, scale = SCALING_FUNCTIONS[scaling["type"]](head_dim, base, scaling, seq_len)
    return inv_freq.float(), scale


class Rotary(RotaryPart):
    """The relative part `rope`: rotates q and k by per-token positions (token or segment index)."""

    def __init__(self, head_dim: int, n_heads: int, base: float = 10000.0,
                 scaling: Mapping[str, Any] | None = None, **_: Any):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.scaling = normalize_scaling(scaling)
        inv_freq, scale = rope_frequencies(head_dim, base, self.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scale = scale

    def set_scaling(self, scaling: Mapping[str, Any] | None) -> None:
        """Change the scaling in place (evaluation-time or fine-tuning-time context extension)."""
        self.scaling = normalize_scaling(scaling)
        inv_freq, self.attention_scale = rope_frequencies(self.head_dim, self.base, self.scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def frequencies(self, pos: Tensor) -> tuple[Tensor, float]:
        """`(inv_freq, attention_scale)` for positions `pos` (dynamic scaling reads their range)."""
        if self.scaling is not None and self.scaling["type"] == "dynamic":
            # The current length is measured in the units of the index (tokens or segments).
            inv_freq, scale = rope_frequencies(self.head_dim, self.base, self.scaling,
                                               int(pos.max()) + 1)
            return inv_freq.to(pos.device), scale
        return self.inv_freq, self.attention_scale

    def rotation(self, pos: Tensor) -> FrequencyRotation:
        """The rotation of a forward pass whose keys have positions `pos` (the contract of
        `bipe.relative.RotaryPart`)."""
        return FrequencyRotation(*self.frequencies(pos))

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Long `[B or 1, T]` positions -> cos, sin float32 `[B or 1, 1, T, D]`."""
        return self.rotation(pos).cos_sin(pos)
