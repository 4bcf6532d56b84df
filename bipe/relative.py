"""The contract between a relative part and attention (docs/architecture.md, "One contract for
relative parts").

A relative part acts inside attention in exactly one of two ways, and attention
(`bipe.attention`, `bipe.lm_infinite`) reads it through this interface only, never by name:

* `RotaryPart`: rotates queries and keys by their positions. For one forward pass it gives a
  `Rotation` (`part.rotation(k_pos)`: dynamic scaling reads the positions' range), which gives
  `cos, sin` in the half-split layout of `apply_rotary`, `rotate(x, pos)` and `at_origin(x)`. A
  rotation is relative (q rotated by `i` and k by `j` score as at distance `i - j`), so
  LM-Infinite's capped pair is the query rotated by the cap and the key by 0 (docs/methods.md 4).
  Keys turn as queries do unless the rotation sets `keys_apart` (xPos scales them the other
  way, around a centre of the pass): they then turn by `key_cos_sin` / `rotate_key`, and
  attention turns every key in each pass instead of caching them turned.
* `BiasPart`: adds a bias that is a function of query and key positions, given twice: as a
  float32 tensor `[B or 1, H, Tq, Tk]` for SDPA (`bias`) and as a flex `score_mod`
  (`score_mod`), both with the distance clamped at `cap` when one is given (LM-Infinite). The two
  must agree: tests/test_attention_contract.py runs every registered part on every kernel
  against a dense reference. `DistanceBias` writes both from one elementwise function of the head
  and the distance, for the biases that depend on nothing else (ALiBi, T5, KERPLE).

Positions are the index the part reads (token index, or segment index for BiPE): a part over
segment indices is the bilevel version of the same part, with no other change. A new part
subclasses `RotaryPart` or `BiasPart` and is registered in `bipe.encoding.RELATIVE_PARTS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

# flex_attention's score_mod: (score, batch, head, query index, key index) -> score, 0-d tensors.
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` `[B, H, T, D]` by `cos`, `sin` `[B or 1, 1, T, D]` (half-split layout)."""
    return x * cos + rotate_half(x) * sin


def distances(q_pos: Tensor, k_pos: Tensor, cap: int | None = None) -> Tensor:
    """`min(p_i - p_j, cap)`, long `[B or 1, 1, Tq, Tk]`, from `[B or 1, Tq]`, `[B or 1, Tk]`."""
    d = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).unsqueeze(1)
    return d if cap is None else d.clamp(max=cap)


@dataclass(frozen=True)
class FarField:
    """A bias part's form from distance `start` on: `offset[h] + slope[h] * d` for every
    distance `d = p_i - p_j >= start` (`offset`, `slope` float `[H]`, `slope <= 0`). ALiBi is
    affine from 0 (`-m_h d`); T5's buckets are constant from their maximum distance on."""

    start: int
    offset: Tensor
    slope: Tensor


class Rotation(ABC):
    """The rotation of one forward pass, in the half-split layout (dimension `d` pairs with
    `d + D/2`, Hugging Face Llama's)."""

    # True when keys turn by `key_cos_sin`, not as queries do, by an amount that depends on the
    # pass (xPos's centre): a key turned in one pass is then wrong in the next, so attention
    # caches keys unturned and turns every key in each pass.
    keys_apart: ClassVar[bool] = False

    @abstractmethod
    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Long positions `[B or 1, T]` -> the queries' cos, sin float32 `[B or 1, 1, T, D]`; a
        0-d position (LM-Infinite's cap) -> `[D]` (or `[B or 1, 1, 1, D]`)."""

    def key_cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """The keys' cos, sin (as `cos_sin`): the queries' unless `keys_apart`."""
        return self.cos_sin(pos)

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """Queries `x` `[B, H, T, D]` rotated by positions `[B or 1, T]`, or all by one 0-d
        position."""
        cos, sin = self.cos_sin(pos)
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))

    def rotate_key(self, x: Tensor, pos: Tensor) -> Tensor:
        """Keys `x` rotated by their positions (as `rotate`, by `key_cos_sin`)."""
        cos, sin = self.key_cos_sin(pos)
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))

    def at_origin(self, x: Tensor) -> Tensor:
        """Keys `x` as rotated by position 0: the key of a pair LM-Infinite caps (its query is
        rotated by the cap)."""
        return self.rotate_key(x, torch.zeros((), dtype=torch.long, device=x.device))


class FrequencyRotation(Rotation):
    """Rotation by per-pair frequencies `inv_freq` `[D/2]`, cos and sin times `scale` (YaRN's
    attention factor, so logits grow by its square)."""

    def __init__(self, inv_freq: Tensor, scale: float = 1.0):
        self.inv_freq, self.scale = inv_freq, scale

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        freqs = pos.float().unsqueeze(-1) * self.inv_freq  # (B, T, D/2), fp32 as in HF Llama
        emb = torch.cat((freqs, freqs), dim=-1)
        if emb.dim() == 3:
            emb = emb.unsqueeze(1)  # (B, 1, T, D)
        return emb.cos() * self.scale, emb.sin() * self.scale

    def at_origin(self, x: Tensor) -> Tensor:
        return x * self.scale  # cos 0 = 1, sin 0 = 0


class RelativePart(nn.Module, ABC):
    """A relative positional part: a `RotaryPart` or a `BiasPart` (never both, never neither).

    Built as `part(head_dim, n_heads, **relative_config)`; keys of the config it does not read
    are ignored."""

    uses_bias: ClassVar[bool]


class RotaryPart(RelativePart):
    """A part that rotates queries and keys by their positions."""

    uses_bias = False

    @abstractmethod
    def rotation(self, pos: Tensor) -> Rotation:
        """The rotation of one forward pass whose keys have positions `pos` `[B or 1, Tk]`."""


class BiasPart(RelativePart):
    """A part that adds a bias, a function of query and key positions, to the logits."""

    uses_bias = True

    @abstractmethod
    def bias(self, q_pos: Tensor, k_pos: Tensor, cap: int | None = None) -> Tensor:
        """Positions `[B or 1, Tq]`, `[B or 1, Tk]` -> float32 bias `[B or 1, H, Tq, Tk]`, the
        distance `p_i - p_j` clamped at `cap` when given."""

    @abstractmethod
    def score_mod(self, q_pos: Tensor, k_pos: Tensor, cap: int | None = None) -> ScoreMod:
        """The same bias as a flex `score_mod`: `score + bias[b, h, q_idx, kv_idx]`, with
        `q_idx` indexing `q_pos` `[B, Tq]` and `kv_idx` indexing `k_pos` `[B, Tk]` (attention
        passes one row per batch element)."""

    def far_field(self) -> FarField | None:
        """Where the uncapped bias becomes affine in the distance, if it does (None, the
        default, where it never does). Attention then runs `bipe.far_field` on the CPU at
        inference: the exact bias near the diagonal, the affine part folded into fused SDPA,
        and each head's far past skipped where its weight vanishes in float32."""
        return None


class DistanceBias(BiasPart):
    """A bias that depends on the head and the (capped) distance only: `distance_bias` gives it,
    elementwise, and both forms of the contract follow from it, so they cannot disagree."""

    n_heads: int

    @abstractmethod
    def distance_bias(self, d: Tensor, h: Tensor) -> Tensor:
        """The bias at float distances `d` for long head indices `h`, elementwise with
        broadcasting (`[B, 1, Tq, Tk]` with `[1, H, 1, 1]`, or 0-d tensors in a score_mod)."""

    def bias(self, q_pos: Tensor, k_pos: Tensor, cap: int | None = None) -> Tensor:
        d = distances(q_pos, k_pos, cap)  # (B, 1, Tq, Tk)
        if d.is_floating_point() or d.numel() == 0:
            h = torch.arange(self.n_heads, device=d.device).view(1, -1, 1, 1)
            return self.distance_bias(d, h).float()
        # Integer positions: the bias of each distance once, then gathered (a T5 bucket or a
        # KERPLE log per distance, not per query-key pair).
        lo, hi = int(d.min()), int(d.max())
        h = torch.arange(self.n_heads, device=d.device).view(-1, 1)
        table = self.distance_bias(
            torch.arange(lo, hi + 1, device=d.device, dtype=torch.float32).view(1, -1), h)
        gathered = table.float().index_select(1, (d - lo).flatten())  # (H, B * Tq * Tk)
        return gathered.view(self.n_heads, d.shape[0], *d.shape[2:]).transpose(0, 1).contiguous()

    def score_mod(self, q_pos: Tensor, k_pos: Tensor, cap: int | None = None) -> ScoreMod:
        qb, kb = q_pos.shape[0] > 1, k_pos.shape[0] > 1

        def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            d = q_pos[b if qb else 0, qi] - k_pos[b if kb else 0, ki]
            if cap is not None:
                d = torch.clamp(d, max=cap)
            return score + self.distance_bias(d.to(score.dtype), h)

        return score_mod


class LinearBias(DistanceBias):
    """`-slope_h * d`: a per-head linear penalty on the distance, slopes float `[H]` (ALiBi's
    form; `bipe.alibi.ALiBi` is this with the standard slopes)."""

    def __init__(self, slopes: Tensor):
        super().__init__()
        self.n_heads = slopes.numel()
        self.register_buffer("slopes", slopes.float(), persistent=False)

    def distance_bias(self, d: Tensor, h: Tensor) -> Tensor:
        return -self.slopes[h] * d

    def far_field(self) -> FarField:
        return FarField(0, torch.zeros_like(self.slopes), -self.slopes)
