"""Section 4: cached greedy decoding with `models.generate`, with and without LM-Infinite.

`generate` runs one forward pass over the context (the prefill, which also yields the first new
token) and then one single-token forward pass per further token. Hooks on the model timestamp
every forward pass, so one `generate` call gives the prefill time and the decode time (from the
end of the prefill to the return of `generate`: `N - 1` forward passes plus token selection)
separately; decode tokens/s = (N - 1) / decode time.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from bench.long_context import Spec, build_model, make_inputs
from bench.report import SectionResult, Table, fmt, ratio
from bench.settings import Profile
from bench.timing import median, rotations
from bipe import AttentionOptions, LMInfinite
from models import generate


class ForwardClock:
    """Start/end `perf_counter` stamps of every forward call of `model` while installed."""

    def __init__(self, model: nn.Module):
        self.starts: list[float] = []
        self.ends: list[float] = []
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self.starts.append(time.perf_counter())),
            model.register_forward_hook(lambda *_: self.ends.append(time.perf_counter())),
        ]

    def reset(self) -> None:
        self.starts.clear()
        self.ends.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def timed_generate(model: nn.Module, clock: ForwardClock, ids: torch.Tensor,
                   boundary: torch.Tensor | None, new_tokens: int) -> dict[str, float]:
    """One greedy `generate` call: prefill seconds and decode seconds (see module docstring)."""
    clock.reset()
    t0 = time.perf_counter()
    out = generate(model, ids, boundary, max_new_tokens=new_tokens)
    total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    prefill = clock.ends[0] - clock.starts[0]
    return {"prefill_s": prefill, "decode_s": total - (clock.ends[0] - t0),
            "forward_calls": float(len(clock.starts))}


def run_decoding(profile: Profile) -> SectionResult:
    """Section 4."""
    res = SectionResult("decoding", "4. Cached greedy decoding (models.generate)")
    n_new = profile.dec_new_tokens
    table = Table(f"{n_new} new tokens after the context; model: {profile.lc_shape.describe()}",
                  ["encoding", "context", "full: prefill s", "full: decode tok/s",
                   "LM-Inf: prefill s", "LM-Inf: decode tok/s", "LM-Inf ÷ full (decode)"])
    for pe in profile.dec_encodings:
        spec = Spec(profile.lc_shape, pe, "full", 0, profile.lc_train_len, profile.lc_chunk,
                    profile.lc_n_global, profile.segment_mean)
        model = build_model(spec)
        full = AttentionOptions(chunk_size=profile.lc_chunk)
        lm = AttentionOptions(chunk_size=profile.lc_chunk, lm_infinite=LMInfinite(
            n_global=profile.lc_n_global, n_local=profile.lc_train_len,
            distance_cap=spec.distance_cap))
        clock = ForwardClock(model)
        options = {"full": full, "lm-infinite": lm}
        for ctx_len in profile.dec_contexts:
            ids, boundary = make_inputs(spec, ctx_len)
            w = min(ctx_len, 64)
            for opts in options.values():  # warm-up: one short untimed call each
                model.attention = opts
                generate(model, ids[:, :w], None if boundary is None else boundary[:, :w],
                         max_new_tokens=2)
            samples: dict[str, list[dict[str, float]]] = {n: [] for n in options}
            for order in rotations(list(options), profile.dec_reps):
                for name in order:
                    model.attention = options[name]
                    samples[name].append(timed_generate(model, clock, ids, boundary, n_new))
            cells = []
            rates = {}
            for name in options:
                pre = [s["prefill_s"] for s in samples[name]]
                dec = [s["decode_s"] for s in samples[name]]
                rate = (n_new - 1) / median(dec) if n_new > 1 else None
                rates[name] = rate
                res.records.append({"encoding": pe, "context": ctx_len, "method": name,
                                    "new_tokens": n_new, "samples_prefill_s": pre,
                                    "samples_decode_s": dec, "median_prefill_s": median(pre),
                                    "median_decode_s": median(dec),
                                    "median_decode_tokens_per_s": rate})
                cells += [fmt(median(pre), 3), fmt(rate, 3)]
            table.add(pe, f"{ctx_len:,}", *cells,
                      fmt(ratio(rates["lm-infinite"], rates["full"]), 3) + "×")
        clock.remove()
    res.tables.append(table)
    res.notes += [
        f"median of {profile.dec_reps} `generate` calls per cell (full and LM-Infinite "
        "alternating, one short untimed call each first); decode tok/s = (N - 1) / time from "
        "the end of the prefill forward pass to the return of generate",
        f"LM-Infinite: n_global = {profile.lc_n_global}, n_local = {profile.lc_train_len}, "
        "windowed KV cache (keys kept: the first n_global and the last n_local); full: query-"
        f"chunked prefill (chunks of {profile.lc_chunk}), KV cache of every token",
        "batch 1, greedy (temperature 0), random weights and context",
    ]
    return res
