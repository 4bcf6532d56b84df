"""T5's relative bias (Raffel et al., JMLR 2020; docs/methods.md section 6): a learned scalar per
head and distance bucket added to the logits.

Causal buckets over `n = max(p_i - p_j, 0)`: with B buckets and maximum distance M, `n < B/2` is
its own bucket; beyond, `B/2 + floor(log(n / (B/2)) / log(M / (B/2)) * (B - B/2))`, clipped to
`B - 1`, so every distance from about M on shares the last bucket. Hugging Face's
`T5Attention._relative_position_bucket(key - query, bidirectional=False, ...)` is the reference
(tests/test_bias_parts.py). Over segment indices (`index: inter`) this is BiPE-T5.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bipe.errors import ConfigError
from bipe.relative import DistanceBias, FarField

NUM_BUCKETS = 32  # pe.relative.num_buckets when null (T5's)
MAX_DISTANCE = 128  # pe.relative.max_distance when null (T5's)


def t5_bucket(d: Tensor, num_buckets: int = NUM_BUCKETS, max_distance: int = MAX_DISTANCE
              ) -> Tensor:
    """The causal bucket, long, of each distance `d = p_i - p_j` (negative counts as 0),
    elementwise (also on the 0-d tensors of a flex score_mod)."""
    exact = num_buckets // 2
    n = torch.clamp(d.float(), min=0)
    # log of at least `exact`: the small distances take the other branch, and no -inf is made.
    large = exact + torch.floor(torch.log(torch.clamp(n, min=exact) / exact)
                                / math.log(max_distance / exact) * (num_buckets - exact))
    large = torch.clamp(large, max=num_buckets - 1)
    return torch.where(n < exact, n, large).long()


class T5Bias(DistanceBias):
    """The relative part `t5`: adds `table[h, bucket(p_i - p_j)]`, a learned `[H, B]` table
    shared by every layer (as in T5), initialised N(0, hidden^-0.5) as Hugging Face's T5 does."""

    def __init__(self, head_dim: int, n_heads: int, num_buckets: int | None = None,
                 max_distance: int | None = None, **_: Any):
        super().__init__()
        self.n_heads = n_heads
        self.num_buckets = NUM_BUCKETS if num_buckets is None else int(num_buckets)
        self.max_distance = MAX_DISTANCE if max_distance is None else int(max_distance)
        if self.num_buckets < 2:
            raise ConfigError(f"pe.relative.num_buckets={num_buckets} must be >= 2")
        if self.max_distance <= self.num_buckets // 2:
            raise ConfigError(f"pe.relative.max_distance={max_distance} must exceed half of "
                              f"pe.relative.num_buckets ({self.num_buckets // 2}): the exact "
                              "buckets cover the distances below that")
        # A plain parameter, not an nn.Embedding, so the model's std-0.02 init leaves it alone.
        self.table = nn.Parameter(torch.empty(n_heads, self.num_buckets))
        nn.init.normal_(self.table, std=(head_dim * n_heads) ** -0.5)

    def distance_bias(self, d: Tensor, h: Tensor) -> Tensor:
        return self.table[h, t5_bucket(d, self.num_buckets, self.max_distance)]

    def far_field(self) -> FarField:
        """Every distance from `max_distance` on is in the last bucket: a constant per head."""
        last = self.table[:, -1].detach()
        return FarField(self.max_distance, last, torch.zeros_like(last))
