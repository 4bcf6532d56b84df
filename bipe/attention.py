"""What one forward pass's attention layers share, and the attention kernels that read it.

The relative part acts through `bipe.relative`'s contract only (a `Rotation` of queries and keys,
or a bias given as a tensor and as a flex `score_mod`); no part is named here. The kernel is
chosen once per forward pass, by `choose_kernel`, from the options (`AttentionOptions`), the kind
of part, the device, whether a gradient is needed, the number of queries and of cached tokens
(docs/architecture.md, "Attention kernels"; torchtitan's `build_attention`), and logged once
per kind (`bipe.attention` logger, INFO):

* `CausalSDPA`, no bias (rotary parts, NoPE, absolute encodings): one
  `scaled_dot_product_attention(is_causal=True)` over the whole sequence, whatever its length:
  PyTorch's fused kernels tile it, so memory grows linearly; a bool mask after cached tokens;
* `FarFieldSDPA`, a bias part that is affine in the distance far from the diagonal
  (`BiasPart.far_field`: ALiBi, BiPE-ALiBi, T5, BiPE-T5), inference on the CPU from
  `chunk_size` queries on: `bipe.far_field`, the exact bias near the diagonal, the far field
  folded into fused SDPA, each head's far past left out where its weight vanishes in float32;
  exact to float32 rounding, no `[T, T]` tensor, and about as fast as a rotary part's causal
  SDPA or faster (the bench's long-context section);
* `BiasFlex`, a bias part, long inputs: `flex_attention`, compiled, with the part's `score_mod`
  over token or segment positions and the causal mask as block sparsity, so no `[H, T, T]`
  tensor exists;
* `BiasSDPA`, a bias part otherwise (a backward on the CPU, or a sequence too short for flex's
  compilation to pay): SDPA with the part's 4-D float bias, queries in chunks of `chunk_size`
  so memory stays linear;
* LM-Infinite (`options.lm_infinite`): the Lambda mask and the distance cap; `LambdaFlex` for
  bias parts and no relative part where flex is chosen, `LambdaBlockwise`
  (`lm_infinite.lambda_attention`) otherwise and always for rotary parts (the capped rotation
  is not a function of the score); after cached tokens `LambdaWindow`, over a KV cache's ring
  buffer with its keys rotated once.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bipe.far_field import far_field_attention
from bipe.lm_infinite import lambda_attention, lambda_block
from bipe.relative import BiasPart, RelativePart, RotaryPart, Rotation

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
    (default): flex where it runs (not for a gradient on the CPU) and the queries number at
    least `flex_min_length`, below which compiling it (about 20 s per shape on a CPU) does not
    pay; SDPA otherwise. A bias with a far field (ALiBi, T5 and their BiPE versions) at
    inference on the CPU past `chunk_size` queries gets `FarFieldSDPA` under `auto` and `sdpa`
    (SDPA calls, several times faster there than flex). `choose_kernel` applies these rules.
    """

    chunk_size: int | None = 1024
    lm_infinite: LMInfinite | None = None
    kernel: str = "auto"
    flex_min_length: int = 2048

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"attention kernel {self.kernel!r} is unknown; choose one of "
                             f"{KERNELS}")


def log_kernels_again() -> None:
    """Forget which kernels were logged, so each is logged again when next chosen. A job calls
    it first (`training.job.run_job`): a sweep's worker process runs several jobs, each with its
    own log file, and each log must name the kernels its run used."""
    _LOGGED.clear()


def _log_kernel(what: str) -> None:
    if what not in _LOGGED:
        _LOGGED.add(what)
        log.info("attention kernel: %s", what)


@functools.cache
def compiled_flex() -> Callable[..., Tensor]:
    """`flex_attention`, compiled once per process (each new shape compiles anew)."""
    from torch.nn.attention.flex_attention import flex_attention  # lazy: only when flex runs

    return torch.compile(flex_attention, dynamic=False)


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


def _rows(pos: Tensor, batch: int) -> Tensor:
    """Positions `[B or 1, T]` as `[B, T]`: one score_mod graph for token and segment positions
    (flex compiles once per shape, not once per kind of index)."""
    return pos.expand(batch, -1).contiguous()


def _use_flex(options: AttentionOptions, device: torch.device, needs_grad: bool,
              length: int) -> bool:
    """Whether a bias or a Lambda mask runs on flex (`AttentionOptions.kernel`)."""
    if options.kernel == "sdpa":
        return False
    # flex_attention compiles a forward on every device but a backward only on GPUs (torch
    # 2.13): a gradient on the CPU is the one case where training and evaluation of the same
    # length get different kernels.
    runs = device.type == "cuda" or not needs_grad
    if options.kernel == "flex":
        if not runs:
            raise RuntimeError("attention kernel flex has no backward on the CPU; use "
                               "kernel=sdpa (or auto) for training there")
        return True
    return runs and length >= options.flex_min_length


def choose_kernel(options: AttentionOptions, part: RelativePart | None, *,
                  device: torch.device, needs_grad: bool, length: int,
                  past: int = 0) -> Kernel:
    """The attention kernel of a forward pass of `length` queries after `past` cached tokens,
    with relative part `part` (None: none), on `device`, `needs_grad` when a backward follows:
    the one place a kernel is chosen (module docstring), logged once per kind."""
    if part is not None and not isinstance(part, (RotaryPart, BiasPart)):
        raise TypeError(f"relative part {type(part).__name__} is neither a RotaryPart nor a "
                        "BiasPart (bipe.relative)")
    bias = isinstance(part, BiasPart)
    lm = options.lm_infinite
    kernel: Kernel
    if lm is not None and past > 0:
        kernel = LambdaWindow()  # decoding: the new queries over the cache's ring buffer
    elif lm is None and not bias:
        kernel = CausalSDPA()
    elif lm is not None and isinstance(part, RotaryPart):
        kernel = LambdaBlockwise()  # the capped rotation is not a function of the score
    elif (lm is None and past == 0 and bias and part.far_field() is not None
          and device.type == "cpu" and not needs_grad and options.kernel != "flex"
          and options.chunk_size is not None and length > options.chunk_size):
        # Merges partial softmaxes by their log-sum-exp (no backward), with PyTorch's CPU
        # flash kernel; on a GPU flex does the same work with block sparsity.
        kernel = FarFieldSDPA()
    elif _use_flex(options, device, needs_grad, length):
        # A call with attention dropout (training) runs BiasSDPA instead: flex has no dropout.
        what = "no relative part" if part is None else f"{type(part).__name__} as score_mod"
        kernel = (LambdaFlex(f"flex (compiled), LM-Infinite Lambda mask, {what}") if lm
                  else BiasFlex(f"flex (compiled), {what}", options.chunk_size))
    elif lm is not None:
        kernel = LambdaBlockwise()
    else:
        kernel = BiasSDPA.of(options.chunk_size, length)
    _log_kernel(kernel.name)
    return kernel


class Kernel(ABC):
    """An attention kernel: `attend` reads the forward pass's `AttentionContext`."""

    name: str

    @abstractmethod
    def attend(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, *,
               dropout_p: float = 0.0, cache: Any = None, layer: int = 0) -> Tensor:
        """`q` `[B, H, Tq, D]` over `k`, `v` `[B, H, Tk, D]` -> `[B, H, Tq, D]`; rotated
        already except under LM-Infinite (which rotates per pair); `cache`, `layer`: a
        windowed KV cache (LM-Infinite only)."""


@dataclass(frozen=True)
class CausalSDPA(Kernel):
    name: str = "sdpa causal"

    def attend(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, *,
               dropout_p: float = 0.0, cache: Any = None, layer: int = 0) -> Tensor:
        if ctx.past == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1,
                                                  dropout_p=dropout_p)
        mask = ctx._once(("mask", q.dtype), lambda: ctx._mask(0, q.shape[2], q.dtype, q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@dataclass(frozen=True)
class BiasSDPA(Kernel):
    name: str
    chunk_size: int | None

    @classmethod
    def of(cls, chunk_size: int | None, length: int) -> BiasSDPA:
        if chunk_size is None or length <= chunk_size:
            return cls("sdpa with a 4-D bias", chunk_size)
        return cls(f"sdpa with a 4-D bias, queries in chunks of {chunk_size}", chunk_size)

    def attend(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, *,
               dropout_p: float = 0.0, cache: Any = None, layer: int = 0) -> Tensor:
        Tq, c = q.shape[2], self.chunk_size
        if c is None or Tq <= c:
            mask = ctx._once(("mask", q.dtype), lambda: ctx._mask(0, Tq, q.dtype, q.device))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = []
        for s in range(0, Tq, c):
            e = min(s + c, Tq)
            end = ctx.past + e  # later keys are masked for every query in the chunk
            out.append(F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, :end], v[:, :, :end],
                attn_mask=ctx._mask(s, e, q.dtype, q.device), dropout_p=dropout_p))
        return torch.cat(out, dim=2)


def _explicit_bias(ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, dropout_p: float,
                   chunk_size: int | None, why: str) -> Tensor:
    """A call outside a kernel's domain: SDPA with the part's explicit bias, logged with why."""
    fallback = BiasSDPA.of(chunk_size, q.shape[2])
    _log_kernel(f"{fallback.name} ({why})")
    return fallback.attend(ctx, q, k, v, dropout_p=dropout_p)


@dataclass(frozen=True)
class FarFieldSDPA(Kernel):
    """`bipe.far_field.far_field_attention` over query blocks of `block` (256 measured fastest
    for ALiBi at 8k and 32k tokens on a 2-core Xeon, against 128, 512 and 1024)."""

    name: str = "sdpa, exact bias near the diagonal, far field folded, vanishing past skipped"
    block: int = 256

    def attend(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, *,
               dropout_p: float = 0.0, cache: Any = None, layer: int = 0) -> Tensor:
        pos = ctx._once("far_field_pos", lambda: (
            ctx.q_pos if ctx.q_pos is not None and bool(
                (ctx.q_pos[..., 1:] >= ctx.q_pos[..., :-1]).all()) else None))
        why = ("attention dropout" if dropout_p > 0.0 else
               f"{q.dtype}, not float32" if q.dtype != torch.float32 else
               "positions that decrease" if pos is None else None)
        if why is not None:  # outside what far_field_attention is exact for
            return _explicit_bias(ctx, q, k, v, dropout_p, ctx.options.chunk_size, why)
        return far_field_attention(q, k, v, pos, ctx.bias, self.block)


@dataclass(frozen=True)
class BiasFlex(Kernel):
    name: str
    chunk_size: int | None

    def attend(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, *,
               dropout_p: float = 0.0, cache: Any = None, layer: int = 0) -> Tensor:
        if dropout_p > 0.0:  # flex_attention has no attention dropout: SDPA does those calls
            return _explicit_bias(ctx, q, k, v, dropout_p, self.chunk_size, "attention dropout")
        B = q.shape[0]
        bm = ctx._once("block_mask", lambda: block_mask(q.shape[2], k.shape[2], ctx.past,
                                                        device=q.device))
        score_mod = ctx._once("score_mod", lambda: ctx.bias.score_mod(
            _rows(ctx.q_pos, B), _rows(ctx.k_pos, B)))
        return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=bm)


class LambdaFull(Kernel):
    """LM-Infinite over a whole sequence; with a windowed cache, its kept keys are stored."""

    @abstractmethod
    def full(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Lambda attention of unrotated `q`, `k`, `v` from the first token."""

    def attend(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, *,
               dropout_p: float = 0.0, cache: Any = None, layer: int = 0) -> Tensor:
        y = self.full(ctx, q, k, v)
        if cache is not None:
            cache.write_window(layer, k, v, ctx._rotated_keys(k))
        return y


@dataclass(frozen=True)
class LambdaFlex(LambdaFull):
    """Flex with the Lambda block mask and the bias part's capped score_mod (the cap is a clamp
    of the distance)."""

    name: str

    def full(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        lm = ctx.lm_infinite
        bm = ctx._once("lambda_mask", lambda: block_mask(
            q.shape[2], k.shape[2], 0, n_global=lm.n_global, n_local=lm.n_local,
            device=q.device))
        score_mod = None
        if ctx.bias is not None:
            pos = _rows(ctx._positions(q), q.shape[0])
            score_mod = ctx._once("lambda_score_mod", lambda: ctx.bias.score_mod(
                pos, pos, lm.distance_cap))
        return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=bm)


@dataclass(frozen=True)
class LambdaBlockwise(LambdaFull):
    """The block-wise `lambda_attention`, `O(T * (n_global + n_local))`."""

    name: str = "LM-Infinite block-wise attention"

    def full(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        lm = ctx.lm_infinite
        return lambda_attention(q, k, v, n_global=lm.n_global, n_local=lm.n_local,
                                positions=ctx._positions(q), rotation=ctx.rotation,
                                bias=ctx.bias, distance_cap=lm.distance_cap)


@dataclass(frozen=True)
class LambdaWindow(Kernel):
    """LM-Infinite after cached tokens: the new queries over the kept keys and their own, then
    the new keys are written into the cache's ring buffer."""

    name: str = "LM-Infinite over the KV cache's ring buffer"

    def attend(self, ctx: AttentionContext, q: Tensor, k: Tensor, v: Tensor, *,
               dropout_p: float = 0.0, cache: Any = None, layer: int = 0) -> Tensor:
        if cache is None:
            raise ValueError(f"LM-Infinite after {ctx.past} cached tokens needs their cache "
                             "(models.KVCache.for_model)")
        lm = ctx.lm_infinite
        k_rot = ctx._rotated_keys(k)
        Tq = q.shape[2]
        q_tok = torch.arange(ctx.past, ctx.past + Tq, device=q.device)
        if Tq == 1:  # the slot it overwrites is outside this query's window: write first
            cache.write_window(layer, k, v, k_rot)
            keys, rots, values, k_tok, k_pos = cache.window_keys(layer)
        else:  # a chunk: earlier queries of it still see the keys its later tokens overwrite
            keys, rots, values, k_tok, k_pos = cache.window_keys(layer, extra=(k, k_rot, v))
            cache.write_window(layer, k, v, k_rot)
        return lambda_block(q, keys, values, q_tok=q_tok, k_tok=k_tok,
                            q_pos=ctx._positions(q), k_pos=k_pos, k_rot=rots,
                            n_global=lm.n_global, n_local=lm.n_local, rotation=ctx.rotation,
                            bias=ctx.bias, distance_cap=lm.distance_cap)


@dataclass
class AttentionContext:
    """Built once per forward pass, shared by all layers.

    cos, sin: `[B or 1, 1, Tq, D]` rotate the new queries and keys (a rotary part, without
    LM-Infinite, which rotates per pair), else None; k_cos, k_sin: `[B or 1, 1, Tk, D]` rotate
    every key, cached ones too, when the rotation turns keys apart from queries (xPos; None
    otherwise: the keys turn by cos and sin and are cached turned). q_pos, k_pos: relative index
    of the new queries `[B or 1, Tq]` and of all keys `[.., Tk]`. past: cached tokens before the
    queries. part: the relative part (`bipe.relative`), None without one; from it come
    `rotation` (a rotary part's, for this pass) or `bias` (a bias part), and `kernel`, chosen
    here once.
    """

    past: int
    length: int
    cos: Tensor | None = None
    sin: Tensor | None = None
    q_pos: Tensor | None = None
    k_pos: Tensor | None = None
    options: AttentionOptions = field(default_factory=AttentionOptions)
    part: RelativePart | None = None
    rotation: Rotation | None = field(default=None, init=False)
    k_cos: Tensor | None = field(default=None, init=False)
    k_sin: Tensor | None = field(default=None, init=False)
    bias: BiasPart | None = field(default=None, init=False)
    kernel: Kernel = field(init=False)
    _shared: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        part = self.part
        if isinstance(part, BiasPart):
            self.bias = part
        elif isinstance(part, RotaryPart):
            keys = self.q_pos if self.k_pos is None else self.k_pos
            self.rotation = part.rotation(keys)
            if self.lm_infinite is None and self.cos is None:
                self.cos, self.sin = self.rotation.cos_sin(self.q_pos)
                if self.rotation.keys_apart:
                    self.k_cos, self.k_sin = self.rotation.key_cos_sin(keys)
        pos = self.q_pos if self.q_pos is not None else self.k_pos
        self.kernel = choose_kernel(
            self.options, part, device=torch.device("cpu") if pos is None else pos.device,
            needs_grad=torch.is_grad_enabled(), length=self.length, past=self.past)

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

    def key_rotary(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The keys' cos, sin in `dtype`: `k_cos`, `k_sin` over every key where the rotation
        turns keys apart (xPos), else the queries' (`rotary`)."""
        if self.k_cos is None:
            return self.rotary(dtype)
        return self._once(("key_rot", dtype), lambda: (self.k_cos.to(dtype),
                                                       self.k_sin.to(dtype)))

    def _mask(self, s: int, e: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """SDPA mask for query rows `[s, e)` over keys `[0, past + e)`: the bias with the causal
        mask folded in as -inf, or a bool mask (True = attend), or None when none is needed."""
        rows, first = e - s, self.past + s
        causal = None
        if rows > 1:
            causal = torch.ones(rows, first + rows, dtype=torch.bool, device=device).tril(first)
        if self.bias is None:
            return causal
        bias = self.bias.bias(self.q_pos[..., s:e], self.k_pos[..., : first + rows])
        if causal is not None:
            bias = bias.masked_fill(~causal, float("-inf"))
        return bias.to(dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
        """Causal attention of `q` `[B, H, Tq, D]` over keys `k`, `v` `[B, H, Tk, D]`, rotated by
        `cos`, `sin` when those are set; the kernel chosen for this pass (`self.kernel`)."""
        return self.kernel.attend(self, q, k, v, dropout_p=dropout_p)

    def attend_lambda(self, q: Tensor, k: Tensor, v: Tensor, cache: Any = None,
                      layer: int = 0) -> Tensor:
        """LM-Infinite attention of unrotated `q`, `k`, `v`; with a cache (a windowed one), the
        kept keys and the new ones, then the new ones are written into its ring buffer."""
        return self.kernel.attend(self, q, k, v, cache=cache, layer=layer)

    def _rotated_keys(self, k: Tensor) -> Tensor | None:
        """Keys rotated by their own positions (cached once, LM-Infinite decoding); None where
        a rotation turns keys apart (xPos: the ring's keys are turned in each pass)."""
        if self.rotation is None or self.rotation.keys_apart:
            return None
        return self.rotation.rotate_key(k, self._positions(k))

    def _positions(self, q: Tensor) -> Tensor:
        if self.q_pos is not None:
            return self.q_pos
        return torch.arange(self.past, self.past + q.shape[2], device=q.device).unsqueeze(0)
