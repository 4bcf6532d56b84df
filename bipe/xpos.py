"""xPos (Sun et al., ACL 2023, "A Length-Extrapolatable Transformer"; docs/methods.md section 6):
RoPE whose every rotary pair also decays with the distance.

Pair `i` of a `D`-dim head turns as RoPE's (frequency `base^(-2i/D)`); on top, queries at
position `n` are scaled by `zeta_i^((n - c) / gamma)` and keys at `m` by `zeta_i^(-(m - c) /
gamma)`, so pair `i`'s share of a logit is RoPE's times `zeta_i^((n - m) / gamma)`:

    q_n . k_m = sum_i zeta_i^((n - m) / gamma) * (RoPE's pair-i term of q_n . k_m)

with `zeta_i = (2i + 0.4 D) / (1.4 D)` (in (0.29, 1): fast pairs decay most) and `gamma`
(`pe.relative.scale_base`) 512, as torchscale's `component/xpos_relative_position.py`
(microsoft/torchscale, commit 776b070d). Layout: torchscale's pair `i` is dimensions `(2i, 2i+1)`
(interleaved); here it is `(i, i + D/2)`, Hugging Face's half-split layout (`bipe.relative`), at
the same frequency, so the same `zeta_i` scales both of its dimensions.

The centre `c` cancels in every logit; it keeps the powers in float range. torchscale centres on
the keys of the pass: `c = ceil(L / 2)` for `L` keys at positions `0..L-1` (its `min_pos`); here
`c = ceil((max p + 1) / 2)` over the keys' positions, per row, which is the same for token
positions and centres segment positions too. A query and the keys it meets must share `c`, and
`c` moves as a sequence grows, so the rotation sets `keys_apart`: keys are cached unturned and all
turned in each pass, as torchscale's incremental decoding does. Range: float32 and bfloat16 hold
`zeta_0^(x / gamma)` for `|x| < 88.7 gamma / ln(1 / zeta_0)`, about 36k positions each side of
`c` at `gamma` 512 (sequences to about 72k tokens); float16 about 4k each side.

LM-Infinite's distance cap is well defined: a logit depends on `n - m` alone, so the capped pair
(query at the cap, key at 0) scores as at distance `cap`, rotation and decay alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bipe.errors import ConfigError
from bipe.relative import FrequencyRotation, RotaryPart, Rotation
from bipe.rope import rope_frequencies

DEFAULT_SCALE_BASE = 512.0  # gamma, torchscale's `xpos_scale_base`


def xpos_zeta(head_dim: int) -> Tensor:
    """`zeta_i = (2i + 0.4 D) / (1.4 D)` for pairs `i < D/2`, float64 `[D/2]`."""
    return (torch.arange(0, head_dim, 2, dtype=torch.float64) + 0.4 * head_dim) / (1.4 * head_dim)


def xpos_centre(pos: Tensor) -> Tensor:
    """`ceil((max p + 1) / 2)` per row of positions `[B or 1, T]` -> long `[B or 1, 1]`
    (torchscale's `-min_pos` for positions `0..L-1`)."""
    return (pos.amax(dim=-1, keepdim=True) + 2) // 2


class XPosRotation(Rotation):
    """RoPE's rotation with queries scaled by `zeta^((p - c) / gamma)` and keys by its inverse,
    `c` this pass's centre (module docstring)."""

    keys_apart = True

    def __init__(self, inv_freq: Tensor, log_zeta: Tensor, scale_base: float, centre: Tensor):
        self.angles = FrequencyRotation(inv_freq)
        self.log_zeta, self.scale_base, self.centre = log_zeta, scale_base, centre

    def _scaled(self, pos: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        """RoPE's cos, sin times `zeta^(sign (p - c) / gamma)`, per dimension."""
        cos, sin = self.angles.cos_sin(pos)
        exponent = (pos - self.centre).float() / self.scale_base  # (B or 1, T); (B or 1, 1) 0-d
        scale = torch.exp(sign * exponent.unsqueeze(-1) * self.log_zeta).unsqueeze(1)
        return cos * scale, sin * scale  # (B or 1, 1, T, D)

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self._scaled(pos, 1.0)

    def key_cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self._scaled(pos, -1.0)


class XPos(RotaryPart):
    """The relative part `xpos`: RoPE plus xPos's per-pair decay (module docstring)."""

    def __init__(self, head_dim: int, n_heads: int, base: float = 10000.0,
                 scale_base: float | None = None, **_: Any):
        super().__init__()
        inv_freq, _ = rope_frequencies(head_dim, base)  # one-line error for an odd head size
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        zeta = xpos_zeta(head_dim)
        self.register_buffer("log_zeta", torch.cat([zeta, zeta]).log().float(), persistent=False)
        self.scale_base = DEFAULT_SCALE_BASE if scale_base is None else float(scale_base)
        if not self.scale_base > 0:
            raise ConfigError(f"pe.relative.scale_base={scale_base} must be positive (xPos's "
                              "gamma; null: 512)")

    def rotation(self, pos: Tensor) -> XPosRotation:
        """The rotation of a pass whose keys have positions `pos`, centred on them (the contract
        of `bipe.relative.RotaryPart`)."""
        return XPosRotation(self.inv_freq, self.log_zeta, self.scale_base, xpos_centre(pos))
