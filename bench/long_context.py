"""Section 3: time and peak memory of a long-context forward pass (no gradients).

Three ways of running one model over `T` tokens:

* `full`: our model with query-chunked full attention, `AttentionOptions(chunk_size=...)`;
* `lm-infinite`: `AttentionOptions(lm_infinite=LMInfinite(n_global, n_local=L, cap))` with `L`
  the pretraining length;
* `naive`: a reference written here that builds the whole `T x T` score matrix of every head,
  adds the mask (and the ALiBi bias), and takes the softmax, as a plain implementation does.

Each sample runs in a fresh process (`bench.isolated`), so it yields both the wall time of the
forward pass and its exact peak memory; samples rotate over the contenders of one length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.isolated import ChildFailed, Isolated, max_rss_bytes, rss_bytes
from bench.report import SectionResult, Table, fmt, ratio
from bench.settings import Profile, Shape
from bench.timing import median, rotations
from bipe import AttentionOptions, LMInfinite, PEConfig
from bipe.rope import apply_rotary
from models import ModelConfig, Transformer

METHODS: tuple[str, ...] = ("full", "lm-infinite", "naive")
WARM_TOKENS = 64


class NaiveAttention(nn.Module):
    """Causal attention that materialises the full `[B, H, T, T]` scores, bias and softmax.

    Shares the projection weights of the `models.transformer.Attention` it replaces and reads
    the same per-forward `AttentionContext` (rotary cos/sin, ALiBi bias function)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.n_heads, self.head_dim = attn.n_heads, attn.head_dim

    def forward(self, x: Tensor, ctx: Any, cache: Any = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if ctx.cos is not None:
            cos, sin = ctx.rotary(q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))  # [B, H, T, T]
        if ctx.bias_fn is not None:
            scores += ctx.bias_fn(ctx.q_pos, ctx.k_pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores.masked_fill_(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        y = probs @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def use_naive_attention(model: Transformer) -> Transformer:
    """Swap every block's attention for `NaiveAttention` (in place); no query chunking."""
    for block in model.blocks:
        block.attn = NaiveAttention(block.attn)
    model.attention = AttentionOptions(chunk_size=None)
    return model


@dataclass(frozen=True)
class Spec:
    """One long-context measurement (picklable: sent to the child process)."""

    shape: Shape
    pe: str
    method: str
    length: int
    train_len: int
    chunk: int
    n_global: int
    segment_mean: float
    seed: int = 0

    @property
    def bilevel(self) -> bool:
        return self.pe.startswith("bipe")

    @property
    def distance_cap(self) -> int:
        """The pretraining length in the relative index's units: tokens, or for BiPE the
        segments a training block holds on average."""
        if self.bilevel:
            return max(1, math.ceil(self.train_len / self.segment_mean))
        return self.train_len


def build_model(spec: Spec) -> Transformer:
    """The small evaluation model of `spec`, set up for its attention method."""
    torch.manual_seed(spec.seed)
    s = spec.shape
    cfg = ModelConfig(vocab_size=s.vocab, n_layers=s.n_layers, hidden_size=s.hidden,
                      n_heads=s.heads, intermediate_size=s.intermediate,
                      pe=PEConfig.named(spec.pe, max_positions=spec.train_len))
    model = Transformer(cfg).eval()
    if spec.method == "naive":
        return use_naive_attention(model)
    lm = None
    if spec.method == "lm-infinite":
        lm = LMInfinite(n_global=spec.n_global, n_local=spec.train_len,
                        distance_cap=spec.distance_cap)
    elif spec.method != "full":
        raise ValueError(f"unknown method {spec.method!r}")
    model.attention = AttentionOptions(chunk_size=spec.chunk, lm_infinite=lm)
    return model


def make_inputs(spec: Spec, length: int) -> tuple[Tensor, Tensor | None]:
    """Random ids `[B, T]` and (BiPE) boundaries with mean segment `spec.segment_mean`."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, spec.shape.vocab, (spec.shape.batch, length), generator=g)
    boundary = None
    if spec.bilevel:
        boundary = torch.rand(spec.shape.batch, length, generator=g) < 1.0 / spec.segment_mean
    return ids, boundary


def measure(spec: Spec) -> dict[str, float]:
    """In the current (fresh) process: seconds and peak bytes of one forward pass over
    `spec.length` tokens. Peak = ru_maxrss after the pass minus the RSS just before it."""
    torch.set_grad_enabled(False)
    model = build_model(spec)
    ids, boundary = make_inputs(spec, spec.length)
    with torch.inference_mode():
        w = min(WARM_TOKENS, spec.length)
        model(ids[:, :w], None if boundary is None else boundary[:, :w])
        base = rss_bytes()
        t0 = time.perf_counter()
        logits = model(ids, boundary)
        seconds = time.perf_counter() - t0
    peak = max_rss_bytes()
    del logits
    return {"seconds": seconds, "peak_bytes": float(max(0, peak - base))}


def naive_bytes(shape: Shape, length: int, bias: bool) -> float:
    """The score-sized fp32 matrices the naive reference holds at once (scores and
    probabilities, plus the bias for ALiBi types)."""
    return (3 if bias else 2) * shape.batch * shape.heads * length * length * 4.0


def _growth(values: list[float | None]) -> list[float | None]:
    return [None] + [ratio(b, a) for a, b in zip(values, values[1:], strict=False)]


def run_long_context(profile: Profile) -> SectionResult:
    """Section 3."""
    shape = profile.lc_shape
    res = SectionResult("long_context", "3. Long-context forward pass (no grad): time and peak "
                                        "memory")
    lengths = list(profile.lc_lengths)
    budget = profile.lc_naive_budget_mib * 2**20
    data: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    skipped: dict[tuple[str, str, int], str] = {}
    with Isolated() as iso:
        for length in lengths:
            keys: list[str] = []
            for pe in profile.lc_encodings:
                for method in METHODS:
                    need = naive_bytes(shape, length, "alibi" in pe)
                    if method == "naive" and need > budget:
                        skipped[(pe, method, length)] = (
                            f"needs ~{need / 2**30:.1f} GiB of scores")
                        continue
                    keys.append(f"{pe}|{method}")
            reps = profile.lc_reps if length < profile.lc_long_from else profile.lc_long_reps
            for order in rotations(keys, reps):
                for key in order:
                    pe, method = key.split("|")
                    if (pe, method, length) in skipped:
                        continue
                    spec = Spec(shape, pe, method, length, profile.lc_train_len,
                                profile.lc_chunk, profile.lc_n_global, profile.segment_mean)
                    try:
                        out = iso.call(measure, spec)
                    except ChildFailed as e:
                        skipped[(pe, method, length)] = str(e)
                        continue
                    d = data.setdefault((pe, method, length), {"seconds": [], "peak_bytes": []})
                    d["seconds"].append(out["seconds"])
                    d["peak_bytes"].append(out["peak_bytes"])
    summary = Table("growth at the largest doubling measured (targets: memory ×≈2 = linear for "
                    "every encoding; LM-Infinite time ≤ 2.3×)",
                    ["encoding", "method", "lengths", "time ×", "memory ×", "memory growth"])
    for pe in profile.lc_encodings:
        cols = ["tokens"]
        for m in METHODS:
            cols += [f"{m} s", "×", f"{m} MiB", "×"]
        table = Table(f"{pe}", cols)
        per_method: dict[str, tuple[list[float | None], list[float | None]]] = {}
        for m in METHODS:
            t = [median(data[(pe, m, n)]["seconds"]) if (pe, m, n) in data else None
                 for n in lengths]
            b = [median(data[(pe, m, n)]["peak_bytes"]) / 2**20 if (pe, m, n) in data else None
                 for n in lengths]
            per_method[m] = (t, b)
            for n, tt, bb, gt, gb in zip(lengths, t, b, _growth(t), _growth(b), strict=True):
                rec: dict[str, Any] = {"encoding": pe, "method": m, "tokens": n}
                if (pe, m, n) in data:
                    d = data[(pe, m, n)]
                    rec.update({"samples_s": d["seconds"], "samples_peak_mib":
                                [x / 2**20 for x in d["peak_bytes"]], "median_s": tt,
                                "median_peak_mib": bb, "time_growth": gt, "memory_growth": gb})
                else:
                    rec["skipped"] = skipped.get((pe, m, n), "not measured")
                res.records.append(rec)
        for i, n in enumerate(lengths):
            row: list[str] = [f"{n:,}"]
            for m in METHODS:
                t, b = per_method[m]
                gt, gb = _growth(t)[i], _growth(b)[i]
                if t[i] is None:
                    row += ["skipped", "", "", ""]
                else:
                    row += [fmt(t[i], 3), fmt(gt, 3), fmt(b[i], 3), fmt(gb, 3)]
            table.rows.append(row)
        res.tables.append(table)
        for m in METHODS:
            t, b = per_method[m]
            idx = [i for i in range(1, len(lengths)) if t[i] is not None and t[i - 1] is not None]
            if not idx:
                continue
            i = idx[-1]
            gb = ratio(b[i], b[i - 1])
            verdict = "-" if gb is None else ("linear" if gb <= 2.3 else
                                              "quadratic" if gb >= 3.5 else "superlinear")
            summary.add(pe, m, f"{lengths[i - 1]:,} → {lengths[i]:,}", fmt(ratio(t[i], t[i - 1])),
                        fmt(gb), verdict)
    res.tables.insert(0, summary)
    res.notes += [
        f"model: {shape.describe()}; pretraining length L = {profile.lc_train_len}; full "
        f"attention in query chunks of {profile.lc_chunk}; LM-Infinite n_global = "
        f"{profile.lc_n_global}, n_local = L, distance cap = L tokens (BiPE: ⌈L / "
        f"{profile.segment_mean:g}⌉ segments, its relative index counts segments)",
        f"each figure: median of {profile.lc_reps} forward passes (from "
        f"{profile.lc_long_from:,} tokens on: {profile.lc_long_reps}), each in a fresh process "
        "forked from a warm server (bench/isolated.py), the contenders of one length in "
        "rotating order; time = wall seconds of `model(ids, boundary)` under inference_mode, "
        f"after a {WARM_TOKENS}-token warm-up call",
        "memory = ru_maxrss after the pass minus RSS just before it (exact page-level peak, "
        "includes the [T, vocab] fp32 logits); × = value at this length over the previous one",
        f"naive: skipped where its score-sized matrices would exceed "
        f"{profile.lc_naive_budget_mib} MiB",
        "BiPE boundaries: each token ends a segment with probability "
        f"1/{profile.segment_mean:g}",
    ]
    for (pe, m, n), why in sorted(skipped.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if m != "naive" or "GiB" not in why:
            res.notes.append(f"{pe} {m} at {n}: {why}")
    return res
