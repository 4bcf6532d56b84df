"""What one forward pass's attention layers share, and the attention kernels that read it.

Kernels (DESIGN.md): SDPA with `is_causal` when there is no bias; SDPA with a 4-D float bias for
ALiBi-type encodings (a 3-D bias falls off the fast CPU path); query chunks for long inputs, so
memory grows linearly with length; LM-Infinite's Lambda attention when it is switched on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from bipe.lm_infinite import lambda_attention, lambda_block


@dataclass
class LMInfinite:
    """LM-Infinite settings: Lambda mask widths in tokens, distance cap in the relative index's
    units (tokens, or segments for BiPE); None = no cap."""

    n_global: int = 100
    n_local: int = 1024
    distance_cap: int | None = 1024


@dataclass
class AttentionOptions:
    """Inference-time attention settings, set on a model with `model.attention = ...`.

    `chunk_size`: full attention processes queries in chunks of this many tokens once the input
    is longer, so no `T x T` score matrix is held for all heads at once. `lm_infinite`: switch
    to Lambda attention (None = off).
    """

    chunk_size: int | None = 1024
    lm_infinite: LMInfinite | None = None


@dataclass
class AttentionContext:
    """Built once per forward pass, shared by all layers.

    cos, sin: `[B or 1, 1, Tq, D]` rotate the new queries and keys (RoPE), else None.
    q_pos, k_pos: relative index of the new queries `[B or 1, Tq]` and of all keys `[.., Tk]`.
    bias_fn: `(q_pos, k_pos) -> [B or 1, H, Tq, Tk]` float32 additive bias (ALiBi), else None.
    past: cached tokens before the queries. inv_freq/rope_scale/slopes: for Lambda attention.
    """

    past: int
    length: int
    cos: Tensor | None = None
    sin: Tensor | None = None
    q_pos: Tensor | None = None
    k_pos: Tensor | None = None
    bias_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    options: AttentionOptions = field(default_factory=AttentionOptions)
    inv_freq: Tensor | None = None
    rope_scale: float = 1.0
    slopes: Tensor | None = None
    _cast: dict = field(default_factory=dict, repr=False)

    @property
    def lm_infinite(self) -> LMInfinite | None:
        return self.options.lm_infinite

    def rotary(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin in the query dtype, cast once per forward pass rather than once per layer."""
        if ("rot", dtype) not in self._cast:
            self._cast["rot", dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return self._cast["rot", dtype]

    def _mask(self, s: int, e: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """SDPA mask for query rows `[s, e)` over keys `[0, past + e)`: the bias with the causal
        mask folded in as -inf, or a bool mask (True = attend), or None when none is needed."""
        rows, first = e - s, self.past + s
        causal = None
        if rows > 1:
            causal = torch.ones(rows, first + rows, dtype=torch.bool, device=device).tril(first)
        if self.bias_fn is None:
            return causal
        bias = self.bias_fn(self.q_pos[..., s:e], self.k_pos[..., : first + rows])
        if causal is not None:
            bias = bias.masked_fill(~causal, float("-inf"))
        return bias.to(dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
        """Causal attention of rotated `q` `[B, H, Tq, D]` over keys `k`, `v` `[B, H, Tk, D]`."""
        Tq = q.shape[2]
        c = self.options.chunk_size
        if c is None or Tq <= c:
            if self.bias_fn is None and self.past == 0:
                return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1,
                                                      dropout_p=dropout_p)
            key = ("mask", q.dtype)
            if key not in self._cast:  # the same for every layer
                self._cast[key] = self._mask(0, Tq, q.dtype, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._cast[key],
                                                  dropout_p=dropout_p)
        out = []
        for s in range(0, Tq, c):
            e = min(s + c, Tq)
            end = self.past + e  # later keys are masked for every query in the chunk
            out.append(F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, :end], v[:, :, :end],
                attn_mask=self._mask(s, e, q.dtype, q.device), dropout_p=dropout_p))
        return torch.cat(out, dim=2)

    def attend_lambda(self, q: Tensor, k: Tensor, v: Tensor, cache=None, layer: int = 0) -> Tensor:
        """LM-Infinite attention of unrotated `q`, `k`, `v`; with a cache, over its kept keys."""
        lm = self.lm_infinite
        kw = dict(n_global=lm.n_global, n_local=lm.n_local, inv_freq=self.inv_freq,
                  alibi_slopes=self.slopes, distance_cap=lm.distance_cap,
                  rope_scale=self.rope_scale)
        if cache is None or self.past == 0:
            y = lambda_attention(q, k, v, positions=self._positions(q), **kw)
            if cache is not None:
                cache.update(layer, k, v)
            return y
        k_all, v_all = cache.update(layer, k, v)
        Tq = q.shape[2]
        q_tok = torch.arange(self.past, self.past + Tq, device=q.device)
        return lambda_block(q, k_all, v_all, q_tok=q_tok, k_tok=cache.key_tokens,
                            q_pos=self._positions(q), k_pos=self.k_pos, **kw)

    def _positions(self, q: Tensor) -> Tensor:
        if self.q_pos is not None:
            return self.q_pos
        return torch.arange(self.past, self.past + q.shape[2], device=q.device).unsqueeze(0)
