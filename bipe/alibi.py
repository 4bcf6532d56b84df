"""ALiBi (Press et al. 2022): a per-head linear penalty on the relative distance.

Plain ALiBi uses token distance with the standard slopes; BiPE-ALiBi uses the distance in segments
with the slopes multiplied by a factor (96 in the released BiPE code, docs/methods.md section 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bipe.relative import LinearBias


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2 ** (-8 / n)
    return [start ** (k + 1) for k in range(n)]


def alibi_slopes(num_heads: int) -> Tensor:
    """Standard ALiBi slopes, float32 `[num_heads]`: `2^(-8k/H)` for k = 1..H when H is a power
    of two; otherwise the slopes of the nearest lower power of two followed by every other slope
    of the next power of two (the rule of the ALiBi reference code)."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = _power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(LinearBias):
    """The relative part `alibi`: adds `-slope_h * (p_i - p_j)` to the attention logits, with the
    standard slopes times `slope_multiplier`."""

    def __init__(self, head_dim: int, n_heads: int, slope_multiplier: float = 1.0, **_: Any):
        super().__init__(alibi_slopes(n_heads) * slope_multiplier)
