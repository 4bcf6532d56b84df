"""FIRE (Li et al., ICLR 2024, "Functional Interpolation for Relative Positions Improves Long
Context Transformers"; docs/methods.md section 6): the bias `f(psi(i - j) / psi(max(L, i)))`.

For a query at position `i` and a key at `j <= i`: `psi(x) = log(c x + 1)` with `c > 0` learned,
`L` a learned threshold (a query below it is normalised by `psi(L)`, not by its own position),
and `f` an MLP with one ReLU hidden layer (width 32) from the scalar to one value per head.
Every query's distances are mapped into [0, 1] ("progressive interpolation"), so a longer input
asks `f` about no input it has not seen. Parameterisation and initialisation as the public
implementation others reuse (github mcleish7/arithmetic, `cramming/architectures/embeddings.py`;
that it copies the paper's appendix listing is not checked here): `c = |c_raw|` starting at 0.1,
`L = |L_mult| * 512` with `L_mult` learned from 1, an epsilon of 1e-6 added to the normaliser,
the MLP initialised as `nn.Linear`'s default. The bias reads the query's position as well as the
distance, so it is a `BiasPart` of its own; one FIRE is shared by every layer. Over segment
indices (`index: inter`) this is BiPE-FIRE: `i`, `j` and `L` count segments.

LM-Infinite's cap: the distance is clamped at `cap` and the query position is left as it is, so
a far key scores as the key `cap` back from the same query, `f(psi(cap) / psi(max(L, i)))`:
LM-Infinite's rule `bias(min(i - j, cap))` read literally, continuous at the cap. A consequence:
past `L` that input shrinks as the query moves on, so at long lengths far keys take the value
FIRE gives relatively nearer keys. The alternative, a far pair scored as if its query were at
position `cap` too (`psi(cap) / psi(max(L, cap))`, the farthest key seen in training), would
jump at the cap; it is not implemented.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bipe.errors import ConfigError
from bipe.relative import BiasPart, ScoreMod, distances

WIDTH = 32  # pe.relative.fire_width when null
THRESHOLD = 512.0  # pe.relative.fire_threshold when null: the initial L
C_INIT = 0.1
EPS = 1e-6


class FIRE(BiasPart):
    """The relative part `fire`: adds `f(psi(min(d, cap)) / psi(max(L, i)))[h]`, `d = i - j`,
    computed by one elementwise function (`fire_bias`) for the tensor and the score_mod."""

    def __init__(self, head_dim: int, n_heads: int, fire_width: int | None = None,
                 fire_threshold: float | None = None, **_: Any):
        super().__init__()
        self.n_heads = n_heads
        self.width = WIDTH if fire_width is None else int(fire_width)
        self.threshold = THRESHOLD if fire_threshold is None else float(fire_threshold)
        if self.width < 1:
            raise ConfigError(f"pe.relative.fire_width={fire_width} must be >= 1")
        if not self.threshold > 0:
            raise ConfigError(f"pe.relative.fire_threshold={fire_threshold} must be > 0")
        self.c = nn.Parameter(torch.tensor(C_INIT))
        self.threshold_scale = nn.Parameter(torch.tensor(1.0))  # L = |this| * threshold
        # The MLP as plain parameters, not nn.Linear, so the model's std-0.02 init leaves them
        # alone; initialised as nn.Linear(1, width) and nn.Linear(width, n_heads) would be.
        self.w1 = nn.Parameter(torch.empty(self.width))
        self.b1 = nn.Parameter(torch.empty(self.width))
        self.w2 = nn.Parameter(torch.empty(n_heads, self.width))
        self.b2 = nn.Parameter(torch.empty(n_heads))
        for p, fan_in in ((self.w1, 1), (self.b1, 1), (self.w2, self.width),
                          (self.b2, self.width)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(p, -bound, bound)

    def normalised(self, d: Tensor, i: Tensor) -> Tensor:
        """`psi(d) / psi(max(L, i))` at float distances `d >= 0` and query positions `i`."""
        c = torch.abs(self.c)
        big = torch.maximum(i, torch.abs(self.threshold_scale) * self.threshold)
        return torch.log1p(c * d) / (torch.log1p(c * big) + EPS)

    def mlp(self, x: Tensor, h: Tensor) -> Tensor:
        """`f(x)[h]`, written as a sum over the hidden units so that it stays elementwise: a
        score_mod sees 0-d tensors, and compiled flex fuses pointwise code into its kernel."""
        out = self.b2[h]
        for k in range(self.width):
            out = out + self.w2[h, k] * torch.relu(self.w1[k] * x + self.b1[k])
        return out

    def fire_bias(self, d: Tensor, i: Tensor, h: Tensor, cap: int | None) -> Tensor:
        """The bias at long distances `d` for long query positions `i` and head indices `h`,
        elementwise with broadcasting; `d` clamped at `cap` (and at 0: a later key is masked
        anyway, and its log must stay finite)."""
        # LM-Infinite: the distance capped, the query position (the normaliser) kept (module
        # docstring).
        d = torch.clamp(d, min=0) if cap is None else torch.clamp(d, min=0, max=cap)
        return self.mlp(self.normalised(d.float(), i.float()), h)

    def bias(self, q_pos: Tensor, k_pos: Tensor, cap: int | None = None) -> Tensor:
        d = distances(q_pos, k_pos)  # (B, 1, Tq, Tk)
        i = q_pos[:, None, :, None]  # (B, 1, Tq, 1)
        h = torch.arange(self.n_heads, device=d.device).view(1, -1, 1, 1)
        return self.fire_bias(d, i, h, cap).float()

    def score_mod(self, q_pos: Tensor, k_pos: Tensor, cap: int | None = None) -> ScoreMod:
        qb, kb = q_pos.shape[0] > 1, k_pos.shape[0] > 1

        def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            i = q_pos[b if qb else 0, qi]
            d = i - k_pos[b if kb else 0, ki]
            return score + self.fire_bias(d, i, h, cap).to(score.dtype)

        return score_mod
