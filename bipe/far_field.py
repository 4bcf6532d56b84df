"""Attention with a bias that is affine in the distance far from the diagonal, at the speed of
plain attention (CPU, inference): the kernel `bipe.attention.FarFieldSDPA` runs this.

A bias part states its far field (`BiasPart.far_field`): from distance `start` on, the bias is
`c_h + s_h d` (`d = p_i - p_j`, `s_h <= 0`). ALiBi is affine from 0 (`c = 0`, `s = -m`, over
tokens; BiPE-ALiBi over segment indices); T5's buckets are constant from their maximum distance
on (`s = 0`). Such a bias needs no `[H, T, T]` tensor, for three reasons:

* **Near the diagonal the exact bias is small.** For a block of queries `[a, b)`, the keys
  closer than `start` to query `a` get the part's own bias (`BiasPart.bias`) as a mask of
  `[B, H, b - a, about b - a + start]`, with the causal mask.
* **The far field folds into the dot product.** Softmax ignores what is constant per query, so
  over the far keys the bias is `s_h (p_a - p_j)` plus `c_h + s_h (p_i - p_a)` for the query: an
  extra key dimension against a constant query dimension (none when `s_h = 0`), fused SDPA
  without a mask, and the query's part added to its log-sum-exp. The near and far partial
  softmaxes are merged by their log-sum-exp, which PyTorch's CPU flash kernel returns
  (`aten._scaled_dot_product_flash_attention_for_cpu`); no gradient flows through a merge, which
  is why this runs for inference only.
* **A decaying far field ends.** Query `i` sees its own key at score at least
  `-|q_i||k_i| / sqrt(D) + bias(0)`, and a far key `j` scores at most
  `|q_i||k_j| / sqrt(D) + c_h + s_h d_ij`. Once `-s_h d_ij > 2 Q_h K_h / sqrt(D) + c_h - bias(0)
  + 104` (`Q_h`, `K_h` the head's largest query and key norms in this call), the key weighs less
  than `exp(-104)` of the largest: under float32's smallest subnormal, so leaving it out changes
  nothing float32 can hold. ALiBi's steep heads see a few hundred tokens, BiPE-ALiBi's (slopes
  96x, over segments) a few segments.

Centred at each block and cut at the reach, the folded column stays small where it matters, so
float32 holds the logits to about 1e-6 (a column of raw positions would reach `m p_j`, 1.6e4 at
32k tokens for ALiBi's steepest head, and lose the logits' last digits). Float32 only: a
bfloat16 column would hold the bias to a fraction of a logit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bipe.relative import BiasPart, FarField

# exp(-104) < 1.4e-45, float32's smallest subnormal: a weight that far below the largest
# contributes exactly nothing to a float32 sum that includes the largest.
MARGIN = 104.0


def _flash_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                    scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Fused CPU attention (no causal mask) returning `(out, logsumexp)` `[B, H, Tq, Dv]`,
    `[B, H, Tq]`; `mask` an additive float mask broadcast to `[B, H, Tq, Tk]`."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


def _runs(keys: list[tuple]) -> list[tuple[int, int]]:
    """`[start, end)` of each run of equal consecutive keys."""
    runs, h0 = [], 0
    for h in range(1, len(keys) + 1):
        if h == len(keys) or keys[h] != keys[h0]:
            runs.append((h0, h))
            h0 = h
    return runs


def reach(q: Tensor, k: Tensor, far: FarField, at_zero: Tensor) -> Tensor:
    """Per head `[H]` (float64): the distance past which a key's weight vanishes in float32
    for every query (module docstring), at least `far.start`; `inf` where the far field does not
    decay. `at_zero`: the bias at distance 0, `[H]`."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qn = q.detach().double().norm(dim=-1).amax(dim=(0, 2))  # (H,)
    kn = k.detach().double().norm(dim=-1).amax(dim=(0, 2))
    c, s = far.offset.detach().double().cpu(), far.slope.detach().double().cpu()
    bound = (2.0 * qn * kn * scale).cpu() + c - at_zero.detach().double().cpu() + MARGIN
    steep = s < 0
    d = torch.where(steep, bound / torch.where(steep, -s, 1.0), torch.full_like(bound, math.inf))
    return d.clamp(min=far.start)


def far_field_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, part: BiasPart,
                        block: int) -> Tensor:
    """Causal attention of `q`, `k`, `v` `[B, H, T, D]` (float32, no cached tokens) with
    `part`'s bias over positions `pos` `[B or 1, T]` (never decreasing along the sequence), in
    query blocks of `block`. Equals SDPA with the explicit bias to float32 rounding."""
    far = part.far_field()
    assert far is not None, "far_field_attention needs a part with a far field"
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D)
    p = pos.to(torch.float32).expand(B, T)
    p64 = pos.to(torch.float64).expand(B, T).contiguous()
    zero = torch.zeros(1, 1, dtype=pos.dtype, device=pos.device)
    at_zero = part.bias(zero, zero)[0, :, 0, 0]
    c = [float(x) for x in far.offset.detach().double().cpu()]
    s = [float(x) for x in far.slope.detach().double().cpu()]
    reaches = [float(x) for x in reach(q, k, far, at_zero)]
    out = torch.empty_like(q)
    folded: tuple[Tensor, Tensor, Tensor] | None = None  # q, k, v with the extra column

    def first_key(distance: float, a: int) -> int:
        """The first key within `distance` of query `a` in every batch row (the keys before it
        are at least that far from every query of the block)."""
        if math.isinf(distance):
            return 0
        return int(torch.searchsorted(p64, p64[:, a:a + 1] - distance, side="right").min())

    for a in range(0, T, block):
        b = min(a + block, T)
        rows = b - a
        near = min(first_key(far.start, a), a)  # keys before near: start or more from all
        starts = [min(first_key(r, a), near) for r in reaches]  # [start_h, near): far field
        # The exact bias over the near keys, and over the whole span of a head whose far keys
        # are few (one call is then cheaper than two and a merge).
        short = [a - lo <= block for lo in starts]
        first = min([lo for lo, sh in zip(starts, short, strict=True) if sh] + [near])
        bias = part.bias(pos[..., a:b], pos[..., first:b]).to(q.dtype)  # (B or 1, H, rows, n)
        causal = torch.ones(rows, b - first, dtype=torch.bool, device=q.device).tril(a - first)
        bias = bias.masked_fill(~causal, float("-inf"))
        # Consecutive heads that split the keys alike run as one call.
        for h0, h1 in _runs([(lo, sh or lo == near, s_h == 0.0)
                             for lo, sh, s_h in zip(starts, short, s, strict=True)]):
            lo, heads, qh = starts[h0], slice(h0, h1), q[:, h0:h1, a:b]
            if short[h0] or lo == near:
                out[:, heads, a:b] = F.scaled_dot_product_attention(
                    qh, k[:, heads, lo:b], v[:, heads, lo:b],
                    attn_mask=bias[:, heads, :, lo - first:])
                continue
            o_n, l_n = _flash_with_lse(qh, k[:, heads, near:b], v[:, heads, near:b],
                                       bias[:, heads, :, near - first:])
            # The far keys [lo, near): the query's part of their bias, c + s (p_i - p_a).
            c_g = torch.tensor(c[h0:h1], dtype=q.dtype, device=q.device).view(1, -1, 1)
            s_g = torch.tensor(s[h0:h1], dtype=q.dtype, device=q.device).view(1, -1, 1)
            from_a = p[:, None, a:b] - p[:, None, a:a + 1]  # (B, 1, rows)
            if s[h0] == 0.0:  # a constant: plain attention over them
                o_f, l_f = _flash_with_lse(qh, k[:, heads, lo:near], v[:, heads, lo:near])
                l_f = l_f + c_g
            else:  # the key's part, s (p_a - p_j), as an extra dimension
                if folded is None:
                    col = torch.full((B, H, T, 1), 1.0 / scale, dtype=q.dtype, device=q.device)
                    zeros = torch.zeros((B, H, T, 1), dtype=q.dtype, device=q.device)
                    folded = (torch.cat((q, col), -1), torch.cat((k, zeros), -1),
                              torch.cat((v, zeros), -1))
                fq, fk, fv = folded
                torch.mul(p[:, None, a:a + 1] - p[:, None, lo:near], s_g,
                          out=fk[:, heads, lo:near, D])
                o_f, l_f = _flash_with_lse(fq[:, heads, a:b], fk[:, heads, lo:near],
                                           fv[:, heads, lo:near], scale=scale)
                o_f, l_f = o_f[..., :D], l_f + c_g + s_g * from_a
            lse = torch.logaddexp(l_n, l_f)
            out[:, heads, a:b] = (o_n * (l_n - lse).exp().unsqueeze(-1)
                                  + o_f * (l_f - lse).exp().unsqueeze(-1))
    return out
