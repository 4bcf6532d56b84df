"""Section 5: cached greedy decoding with `models.generate`, with and without LM-Infinite.

`generate` runs one forward pass over the context (the prefill, which also yields the first new
token) and then one single-token forward pass per further token. Hooks on the model timestamp
every forward pass, so one `generate` call gives the prefill time and the decode time (from the
end of the prefill to the return of `generate`: `N - 1` forward passes plus token selection)
separately; decode tokens/s = (N - 1) / decode time. The KV cache's size after the call shows
that LM-Infinite's ring buffer stays constant while the full cache grows with the context.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from bench.contenders import ours
from bench.long_context import make_inputs
from bench.report import SectionResult, Table, fmt, ratio
from bench.settings import Profile
from bench.timing import median, rotations, spread
from bipe import AttentionOptions, LMInfinite
from models import KVCache, generate


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


def cache_bytes(cache: KVCache) -> int:
    """Bytes of every key and value tensor the cache holds."""
    return sum(t.numel() * t.element_size() for store in (cache.k, cache.v, cache.k_rot)
               for t in store if t is not None)


def timed_generate(model: nn.Module, clock: ForwardClock, ids: torch.Tensor,
                   boundary: torch.Tensor | None, new_tokens: int) -> dict[str, float]:
    """One greedy `generate` call: prefill seconds and decode seconds (see module docstring)."""
    clock.reset()
    caches: list[KVCache] = []
    original = KVCache.for_model

    def keep(m: nn.Module) -> KVCache:  # the cache generate makes, to read its size after
        caches.append(original(m))
        return caches[-1]

    KVCache.for_model = staticmethod(keep)
    try:
        t0 = time.perf_counter()
        out = generate(model, ids, boundary, max_new_tokens=new_tokens)
        total = time.perf_counter() - t0
    finally:
        KVCache.for_model = original
    assert out.shape[1] == ids.shape[1] + new_tokens
    prefill = clock.ends[0] - clock.starts[0]
    return {"prefill_s": prefill, "decode_s": total - (clock.ends[0] - t0),
            "cache_mib": cache_bytes(caches[0]) / 2**20}


def run_decoding(profile: Profile) -> SectionResult:
    """Section 5."""
    res = SectionResult("decoding", "5. Cached greedy decoding (models.generate)")
    n_new = profile.dec_new_tokens
    shape = profile.lc_shape
    table = Table(f"{n_new} new tokens after the context; model: {shape.describe()}",
                  ["encoding", "context", "full: decode tok/s", "full: cache MiB",
                   "LM-Inf: decode tok/s", "LM-Inf: cache MiB", "LM-Inf ÷ full (decode)"])
    for pe in profile.dec_encodings:
        model = ours(shape, pe, max_len=profile.lc_train_len).model.eval()
        bilevel = model.config.pe.uses_bilevel
        cap = math.ceil(profile.lc_train_len / profile.segment_mean) if bilevel \
            else profile.lc_train_len
        options = {"full": AttentionOptions(),
                   "lm-infinite": AttentionOptions(lm_infinite=LMInfinite(
                       n_global=profile.lc_n_global, n_local=profile.lc_train_len,
                       distance_cap=cap))}
        clock = ForwardClock(model)
        for ctx_len in profile.dec_contexts:
            ids, boundary = make_inputs(shape, ctx_len, profile.segment_mean, seed=0)
            boundary = boundary if bilevel else None
            for opts in options.values():  # warm-up: one untimed call each
                model.attention = opts
                generate(model, ids, boundary, max_new_tokens=2)
            samples: dict[str, list[dict[str, float]]] = {n: [] for n in options}
            for order in rotations(list(options), profile.dec_reps):
                for name in order:
                    model.attention = options[name]
                    samples[name].append(timed_generate(model, clock, ids, boundary, n_new))
            cells, rates = [], {}
            for name in options:
                pre = [s["prefill_s"] for s in samples[name]]
                dec = [s["decode_s"] for s in samples[name]]
                rate = (n_new - 1) / median(dec) if n_new > 1 else None
                rates[name] = rate
                mib = samples[name][0]["cache_mib"]
                res.records.append({"encoding": pe, "context": ctx_len, "method": name,
                                    "new_tokens": n_new, "samples_prefill_s": pre,
                                    "samples_decode_s": dec, "median_prefill_s": median(pre),
                                    "median_decode_s": median(dec), "spread_decode": spread(dec),
                                    "median_decode_tokens_per_s": rate, "cache_mib": mib})
                cells += [fmt(rate, 3), fmt(mib, 3)]
            table.add(pe, f"{ctx_len:,}", *cells,
                      fmt(ratio(rates["lm-infinite"], rates["full"]), 3) + "×")
        clock.remove()
        model.attention = AttentionOptions()
    res.tables.append(table)
    res.notes += [
        f"median of {profile.dec_reps} `generate` calls per cell (full and LM-Infinite "
        "alternating, one untimed call each first); decode tok/s = (N - 1) / time from the "
        "end of the prefill forward pass to the return of generate; target: LM-Infinite ≥ 0.9× "
        "full at 4k context, its cache constant",
        f"LM-Infinite: n_global = {profile.lc_n_global}, n_local = {profile.lc_train_len}, "
        "ring-buffer KV cache of n_global + n_local slots, keys rotated once (kept rotated and "
        "as computed, for the capped pairs); full: a KV cache of every token",
        "batch 1, greedy (temperature 0), random weights and context",
    ]
    return res
