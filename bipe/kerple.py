"""KERPLE, logarithmic variant (Chi et al., NeurIPS 2022; docs/methods.md section 6): the bias
`-r1_h * log(1 + r2_h * |p_i - p_j|)` with `r1, r2 > 0` learned per head.

Positivity: `r = softplus(raw)`. The authors' code (as ported to NVIDIA NeMo,
`kerple_relative_position_embedding.py`) instead clamps the parameters' data in place to at least
0.01 in every forward pass (projected gradient descent); a softplus keeps the forward pass free
of side effects on the weights, and unlike a clamp inside the graph it never leaves a parameter
with a zero gradient. Initialisation as that code's: `r1 ~ U(0, 2)`, `r2 ~ U(0, 1)` per head,
floored at 0.01 as its first forward pass would make them, stored as their softplus inverses.
Over segment indices (`index: inter`) this is BiPE-KERPLE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bipe.relative import DistanceBias

FLOOR = 1e-2  # the smallest initial r1, r2 (the KERPLE code's clamp)


def inverse_softplus(x: Tensor) -> Tensor:
    """The `raw` with `softplus(raw) == x`, for `x > 0`."""
    return x + torch.log(-torch.expm1(-x))


class KerpleLog(DistanceBias):
    """The relative part `kerple`: adds `-r1_h * log(1 + r2_h * |d|)`, `r1 = softplus(raw_r1)`,
    `r2 = softplus(raw_r2)`, one pair per head shared by every layer."""

    def __init__(self, head_dim: int, n_heads: int, **_: Any):
        super().__init__()
        self.n_heads = n_heads
        r1 = (torch.rand(n_heads) * 2).clamp(min=FLOOR)
        r2 = torch.rand(n_heads).clamp(min=FLOOR)
        self.raw_r1 = nn.Parameter(inverse_softplus(r1))
        self.raw_r2 = nn.Parameter(inverse_softplus(r2))

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """`(r1, r2)`, float `[H]`, both positive."""
        return F.softplus(self.raw_r1), F.softplus(self.raw_r2)

    def distance_bias(self, d: Tensor, h: Tensor) -> Tensor:
        r1, r2 = self.coefficients()
        return -r1[h] * torch.log1p(r2[h] * torch.abs(d))
