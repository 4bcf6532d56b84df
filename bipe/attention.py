"""What one forward pass's attention layers share, and the attention kernels that read it.

Kernels (DESIGN.md, "Attention kernels"), chosen once per forward pass:

* no additive bias (RoPE, BiPE-RoPE, NoPE, absolute encodings): one
  `scaled_dot_product_attention(is_causal=True)` over the whole sequence, whatever its length:
  PyTorch's fused kernels tile it, so memory grows linearly;
* an additive bias (ALiBi, BiPE-ALiBi): `flex_attention`, compiled, with the bias as a
  `score_mod` over token or segment positions and the causal (or Lambda) mask as block sparsity,
  so no `[H, T, T]` tensor exists; where flex cannot run (a backward on the CPU, or a sequence
  too short for its compilation to pay, see `AttentionOptions.kernel`), SDPA with a 4-D float
  bias, queries in chunks of `chunk_size` so memory stays linear;
* LM-Infinite (`options.lm_infinite`): the Lambda mask and the distance cap; flex for bias and
  no-relative encodings, the block-wise `lm_infinite.lambda_attention` for RoPE (the capped
  rotation is not a function of the score); a KV cache keeps the window in a ring buffer with
  its keys rotated once (`attend_lambda`).

The kernel in use is logged once per kind (`bipe.attention` logger, INFO).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bipe.lm_infinite import lambda_attention, lambda_block, rotate

log = logging.getLogger(__name__)
KERNELS = ("auto", "sdpa", "flex")
_LOGGED: set[str] = set()


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

    `chunk_size`: SDPA with an additive bias processes queries in chunks of this many tokens
    once the input is longer, so no `T x T` bias is held for all heads at once. `lm_infinite`:
    switch to Lambda attention (None = off). `kernel` for additive biases and Lambda masks:
    `sdpa`; `flex` (compiled `flex_attention`: forward everywhere, backward on GPUs); `auto`
    (default): flex where it has what the call needs (no gradient on the CPU) and the queries
    number at least `flex_min_length`, below which compiling it (about 20 s per shape on a
    CPU) does not pay; SDPA otherwise.
    """

    chunk_size: int | None = 1024
    lm_infinite: LMInfinite | None = None
    kernel: str = "auto"
    flex_min_length: int = 2048

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"attention kernel {self.kernel!r} is unknown; choose one of "
                             f"{KERNELS}")


def _log_kernel(what: str) -> None:
    if what not in _LOGGED:
        _LOGGED.add(what)
        log.info("attention kernel: %s", what)


@functools.cache
def compiled_flex() -> Callable[..., Tensor]:
    """`flex_attention`, compiled once per process (each new shape compiles anew)."""
    from torch.nn.attention.flex_attention import flex_attention  # lazy: only when flex runs

    return torch.compile(flex_attention, dynamic=False)


def flex_available(q: Tensor) -> bool:
    """Whether this call can run flex: a forward without gradient, or any call on a GPU."""
    return q.device.type == "cuda" or not (torch.is_grad_enabled() and q.requires_grad)


def block_mask(q_len: int, kv_len: int, past: int, *, n_global: int | None = None,
               n_local: int | None = None, device: torch.device, block: int = 128) -> Any:
    """The flex `BlockMask` of causal attention (query i at token `past + i` sees keys
    `j <= past + i`), or of LM-Infinite's Lambda (also `j < n_global` or within `n_local`),
    built from block bounds in O(blocks^2) integers, never from a `[T, T]` mask."""
    from torch.nn.attention.flex_attention import BlockMask  # lazy: only when flex runs

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        q = qi + past
        ok = ki <= q
        if n_local is not None:
            ok = ok & ((q - ki < n_local) | (ki < n_global))
        return ok

    nq, nk = -(-q_len // block), -(-kv_len // block)
    q_lo = torch.arange(nq, device=device)[:, None] * block + past
    q_hi = torch.minimum((torch.arange(nq, device=device)[:, None] + 1) * block,
                         torch.tensor(q_len, device=device)) - 1 + past
    k_lo = torch.arange(nk, device=device)[None, :] * block
    k_hi = torch.minimum(k_lo + block, torch.tensor(kv_len, device=device)) - 1
    any_ok = k_lo <= q_hi  # some pair causal
    all_ok = k_hi <= q_lo  # every pair causal
    if n_local is not None:
        some_band = k_hi > q_lo - n_local  # the closest pair is within the local band
        every_band = k_lo > q_hi - n_local
        some_global, every_global = k_lo < n_global, k_hi < n_global
        any_ok = any_ok & (some_band | some_global)
        all_ok = all_ok & (every_band | every_global)
    partial = any_ok & ~all_ok
    # A block that is neither full nor empty is evaluated element-wise by mask_mod.
    full_ok = all_ok & (k_hi < kv_len)

    def pack(sel: Tensor) -> tuple[Tensor, Tensor]:
        counts = sel.sum(-1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full_ok)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def alibi_score_mod(slopes: Tensor, q_pos: Tensor, k_pos: Tensor,
                    cap: int | None = None) -> Callable[..., Tensor]:
    """flex `score_mod` adding `-slope_h * min(p_i - p_j, cap)` (ALiBi over token or segment
    positions; `q_pos` `[B or 1, Tq]`, `k_pos` `[B or 1, Tk]`)."""
    qb, kb = q_pos.shape[0] > 1, k_pos.shape[0] > 1
    slopes = slopes.float()

    def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        d = q_pos[b if qb else 0, qi] - k_pos[b if kb else 0, ki]
        if cap is not None:
            d = torch.clamp(d, max=cap)
        return score - slopes[h] * d.to(score.dtype)

    return score_mod


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
    _shared: dict = field(default_factory=dict, repr=False)

    @property
    def lm_infinite(self) -> LMInfinite | None:
        return self.options.lm_infinite

    def _once(self, key: Any, build: Callable[[], Any]) -> Any:
        """`build()` once per forward pass (shared by every layer)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def rotary(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin in the query dtype, cast once per forward pass rather than once per layer."""
        return self._once(("rot", dtype), lambda: (self.cos.to(dtype), self.sin.to(dtype)))

    def use_flex(self, q: Tensor) -> bool:
        """The kernel choice for masks and biases (AttentionOptions.kernel)."""
        kernel = self.options.kernel
        if kernel == "sdpa":
            return False
        ok = flex_available(q)
        if kernel == "flex":
            if not ok:
                raise RuntimeError("attention kernel flex has no backward on the CPU; use "
                                   "kernel=sdpa (or auto) for training there")
            return True
        return ok and q.shape[2] >= self.options.flex_min_length

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
        if self.bias_fn is None:
            if self.past == 0:
                _log_kernel("sdpa causal")
                return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1,
                                                      dropout_p=dropout_p)
            mask = self._once(("mask", q.dtype), lambda: self._mask(0, Tq, q.dtype, q.device))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if dropout_p == 0.0 and self.use_flex(q):
            _log_kernel("flex (compiled), ALiBi as score_mod")
            bm = self._once("block_mask", lambda: block_mask(Tq, k.shape[2], self.past,
                                                             device=q.device))
            score_mod = self._once("score_mod", lambda: alibi_score_mod(
                self.slopes, self.q_pos, self.k_pos))
            return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=bm)
        c = self.options.chunk_size
        if c is None or Tq <= c:
            _log_kernel("sdpa with a 4-D bias")
            mask = self._once(("mask", q.dtype), lambda: self._mask(0, Tq, q.dtype, q.device))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        _log_kernel(f"sdpa with a 4-D bias, queries in chunks of {c}")
        out = []
        for s in range(0, Tq, c):
            e = min(s + c, Tq)
            end = self.past + e  # later keys are masked for every query in the chunk
            out.append(F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, :end], v[:, :, :end],
                attn_mask=self._mask(s, e, q.dtype, q.device), dropout_p=dropout_p))
        return torch.cat(out, dim=2)

    def attend_lambda(self, q: Tensor, k: Tensor, v: Tensor, cache: Any = None,
                      layer: int = 0) -> Tensor:
        """LM-Infinite attention of unrotated `q`, `k`, `v`; with a cache (a windowed one), the
        kept keys and the new ones, then the new ones are written into its ring buffer."""
        lm = self.lm_infinite
        kw = dict(n_global=lm.n_global, n_local=lm.n_local, inv_freq=self.inv_freq,
                  alibi_slopes=self.slopes, distance_cap=lm.distance_cap,
                  rope_scale=self.rope_scale)
        if cache is None or self.past == 0:
            y = self._lambda_full(q, k, v, kw)
            if cache is not None:
                cache.write_window(layer, k, v, self._rotated_keys(k))
            return y
        k_rot = self._rotated_keys(k)
        Tq = q.shape[2]
        q_tok = torch.arange(self.past, self.past + Tq, device=q.device)
        if Tq == 1:  # the slot it overwrites is outside this query's window: write first
            cache.write_window(layer, k, v, k_rot)
            keys, rots, values, k_tok, k_pos = cache.window_keys(layer)
        else:  # a chunk: earlier queries of it still see the keys its later tokens overwrite
            keys, rots, values, k_tok, k_pos = cache.window_keys(layer, extra=(k, k_rot, v))
            cache.write_window(layer, k, v, k_rot)
        return lambda_block(q, keys, values, q_tok=q_tok, k_tok=k_tok, q_pos=self._positions(q),
                            k_pos=k_pos, k_rot=rots, **kw)

    def _rotated_keys(self, k: Tensor) -> Tensor | None:
        """Keys rotated by their own positions (cached once, LM-Infinite decoding)."""
        if self.inv_freq is None:
            return None
        return rotate(k, self._positions(k), self.inv_freq, self.rope_scale)

    def _lambda_full(self, q: Tensor, k: Tensor, v: Tensor, kw: dict[str, Any]) -> Tensor:
        """Lambda attention over a whole sequence: flex for bias and no-relative encodings (the
        cap is a clamp of the distance), the block-wise reference for RoPE."""
        lm = self.lm_infinite
        if self.inv_freq is None and self.use_flex(q):
            _log_kernel("flex (compiled), LM-Infinite Lambda mask")
            Tq = q.shape[2]
            bm = self._once("lambda_mask", lambda: block_mask(
                Tq, k.shape[2], 0, n_global=lm.n_global, n_local=lm.n_local, device=q.device))
            score_mod = None
            if self.slopes is not None:
                pos = self._positions(q)
                score_mod = self._once("lambda_score_mod", lambda: alibi_score_mod(
                    self.slopes, pos, pos, lm.distance_cap))
            return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=bm)
        _log_kernel("LM-Infinite block-wise attention")
        return lambda_attention(q, k, v, positions=self._positions(q), **kw)

    def _positions(self, q: Tensor) -> Tensor:
        if self.q_pos is not None:
            return self.q_pos
        return torch.arange(self.past, self.past + q.shape[2], device=q.device).unsqueeze(0)
