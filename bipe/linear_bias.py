"""Attention with a bias linear in the key's position, at the speed of plain attention (CPU,
inference): the kernel `bipe.attention.LinearBiasWindows` runs this.

A part whose bias is `-m_h (p_i - p_j)` (ALiBi over tokens, BiPE-ALiBi over segment indices;
`BiasPart.linear_slopes`) needs no `[H, T, T]` bias, for two reasons:

* **The far past can be skipped exactly.** Query `i` always sees its own key at score at least
  `-|q_i| |k_i| s` (`s = 1/sqrt(D)`), and a key `j` scores at most `|q_i| |k_j| s - m_h d_ij`.
  Once `m_h d_ij > 2 Q_h K_h s + MARGIN` (`Q_h`, `K_h` the largest query and key norms of the
  head in this call), the key's weight is below `exp(-MARGIN)` of the largest: under float32's
  smallest subnormal for `MARGIN = 104`, so leaving it out changes the softmax by nothing
  float32 can hold. Each head thus attends over a window of `reach_h = (2 Q_h K_h s + 104) /
  m_h` positions, computed from the data of each call (a steep head sees a few hundred tokens,
  or a few segments; `m_h = 0` sees everything).
* **The rest of the bias folds into the dot product.** Softmax ignores what is constant per
  query, so over keys before a chunk of queries starting at `a` the bias is `m_h (p_j - p_a)`
  (then corrected by `-m_h (p_i - p_a)` in the log-sum-exp): an extra dimension of the keys
  against a constant one of the queries, and the kernel is fused SDPA without a mask. Centred
  at the chunk and cut at the reach, that column stays within the window's bound, so float32
  holds it to about 1e-5 of a logit where it matters (a column of raw positions would reach
  `m_h p_j`, 1.6e4 at 32k tokens for ALiBi's steepest head, and lose the logits' last digits).

So, per chunk of `chunk` queries `[a, b)` and per head: keys `[lo_h, b)` where `lo_h` is the
first key within reach of query `a` (and so of the whole chunk: positions never decrease).
When that span is short, one SDPA call with the exact bias as a `[B, 1, chunk, b - lo_h]` mask.
Otherwise the diagonal block `[a, b)` with its exact bias (and the causal mask), the keys
`[lo_h, a)` with the folded bias, and the two merged by their log-sum-exp (PyTorch's CPU flash
kernel returns it: `aten._scaled_dot_product_flash_attention_for_cpu`; no gradient flows
through a merge, which is why this runs for inference only). Float32 only: a bfloat16 column
would hold the bias to a fraction of a logit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

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


def reach(q: Tensor, k: Tensor, slopes: Tensor) -> Tensor:
    """Per head `[H]` (float64): the distance past which a key's weight vanishes in float32
    for every query (module docstring); `inf` for a slope of 0."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qn = q.detach().double().norm(dim=-1).amax(dim=(0, 2))  # (H,)
    kn = k.detach().double().norm(dim=-1).amax(dim=(0, 2))
    bound = 2.0 * qn * kn * scale + MARGIN
    m = slopes.detach().double().to(bound.device)
    return torch.where(m > 0, bound / m.clamp(min=1e-300), torch.full_like(bound, math.inf))


def linear_bias_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, slopes: Tensor,
                          chunk: int) -> Tensor:
    """Causal attention of `q`, `k`, `v` `[B, H, T, D]` (float32, no cached tokens) with the bias
    `-slopes[h] * (pos_i - pos_j)`; `pos` `[B or 1, T]` never decreasing along the sequence,
    `slopes` `[H]` >= 0. Equals SDPA with the explicit bias to float32 rounding."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D)
    p = pos.to(torch.float32).expand(B, T)
    p64 = pos.to(torch.float64).expand(B, T).contiguous()
    m = [float(x) for x in slopes.detach().double().cpu()]
    reaches = [float(x) for x in reach(q, k, slopes).cpu()]
    out = torch.empty_like(q)
    folded: tuple[Tensor, Tensor, Tensor] | None = None  # q, k, v with the extra column

    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        rows = b - a
        # The first key within each head's reach of query a, the furthest back over the batch.
        starts = [0 if math.isinf(r) else int(torch.searchsorted(
            p64, p64[:, a:a + 1] - r, side="left").min()) for r in reaches]
        # Exact biases are needed over the diagonal block and the short spans.
        first = min([lo for lo in starts if a - lo <= chunk] + [a])
        # Distances p_i - p_j for keys [first, b), and the causal mask (0 or -inf) over them.
        dist = (p[:, None, a:b, None] - p[:, None, None, first:b])  # (B, 1, rows, b - first)
        causal = torch.zeros(rows, b - first, device=q.device)
        causal.masked_fill_(torch.ones(rows, b - first, dtype=torch.bool, device=q.device)
                            .tril(a - first).logical_not_(), float("-inf"))
        for h in range(H):
            lo = starts[h]
            qh = q[:, h:h + 1, a:b]
            if a - lo <= chunk:  # a short span: one call with the exact bias over it
                bias = torch.add(causal[:, lo - first:], dist[..., lo - first:], alpha=-m[h])
                out[:, h:h + 1, a:b] = F.scaled_dot_product_attention(
                    qh, k[:, h:h + 1, lo:b], v[:, h:h + 1, lo:b], attn_mask=bias)
                continue
            diag_bias = torch.add(causal[:, a - first:], dist[..., a - first:], alpha=-m[h])
            o_d, l_d = _flash_with_lse(qh, k[:, h:h + 1, a:b], v[:, h:h + 1, a:b], diag_bias)
            if folded is None:
                ones = torch.full((B, H, T, 1), 1.0 / scale, dtype=q.dtype, device=q.device)
                zeros = torch.zeros((B, H, T, 1), dtype=q.dtype, device=q.device)
                folded = (torch.cat((q, ones), -1), torch.cat((k, zeros), -1),
                          torch.cat((v, zeros), -1))
            fq, fk, fv = folded
            # The key column m_h (p_j - p_a): q's column is 1/scale, so the score gains it.
            torch.mul(p[:, None, lo:a] - p[:, None, a:a + 1], m[h], out=fk[:, h:h + 1, lo:a, D])
            o_p, l_p = _flash_with_lse(fq[:, h:h + 1, a:b], fk[:, h:h + 1, lo:a],
                                       fv[:, h:h + 1, lo:a], scale=scale)
            l_p = l_p - m[h] * (p[:, None, a:b] - p[:, None, a:a + 1])  # the true log-sum-exp
            lse = torch.logaddexp(l_d, l_p)
            out[:, h:h + 1, a:b] = (o_d * (l_d - lse).exp().unsqueeze(-1)
                                    + o_p[..., :D] * (l_p - lse).exp().unsqueeze(-1))
    return out
