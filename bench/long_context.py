"""Section 4: time and peak memory of a long-context forward pass (no gradients).

Contenders over `T` tokens, one model shape (`profile.lc_shape`), the same weights where they
share them:

* `hf-llama-sdpa`: Hugging Face `LlamaForCausalLM` with its SDPA attention (the reference);
* every named encoding (`profile.lc_encodings`) with the default attention options, the
  kernel chosen by `bipe.attention.choose_kernel` (each contender's is in the record): one
  causal SDPA call for rotary parts and absolute encodings, `FarFieldSDPA` for a bias with a
  far field (ALiBi, T5 and their BiPE versions), compiled flex attention with the bias as a
  score_mod for the other bias parts (KERPLE, FIRE and their BiPE versions).

Targets (issue "one attention contract"): `rope` at least 1.1x Hugging Face Llama with SDPA, a
linear bias at least 0.9x `rope`, the other bias parts at least 0.8x `rope`.

One fresh process per length (spawned with `MALLOC_MMAP_THRESHOLD_` fixed, so freed buffers
leave the resident set) builds every contender, runs each once untimed at that length (flex
compiles its kernel there), then `reps` rounds of one timed forward pass each, the contenders in
rotating order. Peak memory of a call = the resident set sampled every 2 ms during it, minus the
resident set just before it (a lower bound by at most one sampling gap).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import bipe.attention as attention
from bench.contenders import hf_llama, ours
from bench.report import SectionResult, Table, fmt, ratio
from bench.settings import Profile, Shape
from bench.timing import median, rotations, spread
from bipe.config import PEConfig
from bipe.encoding import RELATIVE_PARTS
from bipe.errors import ConfigError
from bipe.relative import BiasPart, LinearBias
from evaluation.memory import track_peak_memory

HF = "hf-llama-sdpa"


def timed_peak(fn: Any) -> tuple[float, float]:
    """(seconds, peak resident-set growth in bytes) of one call, RSS sampled every 2 ms
    (`evaluation.memory.track_peak_memory`)."""
    with track_peak_memory("cpu") as memory:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    return seconds, float(memory.peak_bytes)


@dataclass(frozen=True)
class LengthJob:
    """Everything one length's process needs."""

    shape: Shape
    encodings: tuple[str, ...]
    length: int
    train_len: int
    segment_mean: float
    reps: int
    seed: int = 0


def make_inputs(shape: Shape, length: int, segment_mean: float, seed: int
                ) -> tuple[Tensor, Tensor]:
    """Random ids `[B, T]` and boundaries with mean segment `segment_mean` (read by BiPE)."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, shape.vocab, (shape.batch, length), generator=g)
    return ids, torch.rand(shape.batch, length, generator=g) < 1.0 / segment_mean


def measure_length(job: LengthJob) -> dict[str, Any]:
    """In a fresh process: `{contender: {"seconds": [...], "peak_bytes": [...]}}` or
    `{contender: {"skipped": why}}`."""
    torch.set_grad_enabled(False)
    ids, boundary = make_inputs(job.shape, job.length, job.segment_mean, job.seed)
    calls: dict[str, Any] = {}
    out: dict[str, Any] = {}
    hf = hf_llama(job.shape, "sdpa", max_len=job.train_len, seed=job.seed)
    if hasattr(hf, "model"):
        hf.model.eval()
        calls[HF] = lambda: hf.forward(ids, boundary)
    else:
        out[HF] = {"skipped": hf.reason}
    kernels: dict[str, str] = {}
    for pe in job.encodings:
        c = ours(job.shape, pe, max_len=job.train_len, seed=job.seed)
        c.model.eval()
        calls[pe] = (lambda c=c: c.forward(ids, boundary))
    with torch.inference_mode():
        for name, fn in list(calls.items()):  # untimed: caches, the flex kernel's compilation
            try:
                with _kernel_names() as seen:
                    fn()
            except ConfigError as e:  # a learned token table has no rows this far
                out[name] = {"skipped": str(e).split(";")[0]}
                del calls[name]
                continue
            kernels[name] = "; ".join(seen)
        samples = {name: {"seconds": [], "peak_bytes": []} for name in calls}
        for order in rotations(list(calls), job.reps):
            for name in order:
                s, p = timed_peak(calls[name])
                samples[name]["seconds"].append(s)
                samples[name]["peak_bytes"].append(p)
    for name, kernel in kernels.items():
        samples[name]["kernel"] = kernel
    return {**out, **samples}


@contextlib.contextmanager
def _kernel_names() -> Iterator[list[str]]:
    """The attention kernels chosen during the block (`bipe.attention`'s once-per-kind log
    lines, re-armed here so each contender's are seen)."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage().removeprefix(  # type: ignore
        "attention kernel: "))
    attention.log_kernels_again()
    logger = logging.getLogger("bipe.attention")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_job(job: LengthJob) -> dict[str, Any]:
    """`measure_length` in a fresh spawned process (fixed mmap threshold: honest RSS)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    try:
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return pool.submit(measure_length, job).result()
    except cf.process.BrokenProcessPool:
        return {"_failed": "the process died (killed for memory?)"}
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)


def target(pe: str) -> str:
    """The issue's target for an encoding against `rope`: 0.9x for ALiBi's linear bias (and
    BiPE-ALiBi's), 0.8x for the other bias parts, none for the rest."""
    part = RELATIVE_PARTS.get(PEConfig.named(pe, max_positions=64).relative.type)
    if part is None or not issubclass(part, BiasPart):
        return "-"
    return "≥ 0.9×" if issubclass(part, LinearBias) else "≥ 0.8×"


def run_long_context(profile: Profile) -> SectionResult:
    """Section 4."""
    shape = profile.lc_shape
    res = SectionResult("long_context", "4. Long-context forward pass (no grad): time and peak "
                                        "memory, against Hugging Face Llama with SDPA")
    lengths = list(profile.lc_lengths)
    names = [HF, *profile.lc_encodings]
    data: dict[int, dict[str, Any]] = {}
    for length in lengths:
        reps = profile.lc_reps if length < profile.lc_long_from else profile.lc_long_reps
        data[length] = run_job(LengthJob(shape, tuple(profile.lc_encodings), length,
                                         profile.lc_train_len, profile.segment_mean, reps))

    def med(length: int, name: str, key: str) -> float | None:
        d = data[length].get(name) or {}
        return median(d[key]) if d.get(key) else None

    cols = ["contender", *[f"{n:,} tok/s" for n in lengths], *[f"{n:,} MiB" for n in lengths],
            "memory × per doubling"]
    table = Table(f"tokens per second and peak memory; {shape.describe()}", cols)
    for name in names:
        rates = [None if med(n, name, "seconds") is None else
                 shape.batch * n / med(n, name, "seconds") for n in lengths]
        mem = [None if med(n, name, "peak_bytes") is None else med(n, name, "peak_bytes") / 2**20
               for n in lengths]
        growth = [ratio(b, a) ** (1 / math.log2(m / n)) if a and b else None
                  for (n, a), (m, b) in zip(zip(lengths, mem, strict=False),
                                            zip(lengths[1:], mem[1:], strict=False),
                                            strict=False)]
        table.add(name, *[fmt(r, 3) for r in rates], *[fmt(m, 3) for m in mem],
                  " ".join(fmt(g, 3) for g in growth))
        for n, r, m in zip(lengths, rates, mem, strict=True):
            d = data[n].get(name) or {}
            res.records.append({"contender": name, "tokens": n, "median_tokens_per_s": r,
                                "median_peak_mib": m, "samples_s": d.get("seconds", []),
                                "samples_peak_mib": [x / 2**20 for x in d.get("peak_bytes", [])],
                                "spread_s": spread(d.get("seconds", [])),
                                "kernel": d.get("kernel"),
                                "skipped": d.get("skipped") or data[n].get("_failed")})
    res.tables.append(table)
    targets = Table("targets (ratios of median times measured side by side in one process)",
                    ["ratio", *[f"{n:,}" for n in lengths], "target"])
    hf_t = {n: med(n, HF, "seconds") for n in lengths}
    rope_t = {n: med(n, "rope", "seconds") for n in lengths}
    if "rope" in profile.lc_encodings:
        targets.add("rope vs hf-llama-sdpa",
                    *[fmt(ratio(hf_t[n], rope_t[n]), 3) + "×" if hf_t[n] else "-"
                      for n in lengths], "≥ 1.1×")
        for pe in profile.lc_encodings:
            if pe != "rope":
                targets.add(f"{pe} vs rope", *[fmt(ratio(rope_t[n], med(n, pe, "seconds")), 3)
                                               + "×" for n in lengths], target(pe))
    res.tables.insert(0, targets)
    res.notes += [
        f"model: {shape.describe()}; ours with the default attention, each contender's "
        "kernel in the list below (bipe.attention.choose_kernel); "
        f"BiPE boundaries: each token ends a segment with probability "
        f"1/{profile.segment_mean:g}",
        f"each length in its own fresh process: every contender once untimed, then "
        f"{profile.lc_reps} rounds (from {profile.lc_long_from:,} tokens on: "
        f"{profile.lc_long_reps}) of one timed forward pass each in rotating order; a figure is "
        "the median; ratio = its median time over the other's (> 1: the first is faster)",
        "memory: resident-set growth during the call sampled every 2 ms (MALLOC_MMAP_THRESHOLD_"
        "=65536 so freed buffers are returned), includes the [T, vocab] fp32 logits every "
        "contender computes; × per doubling: the growth factor per doubling of the length "
        "(≈ 2 = linear, ≈ 4 = quadratic)",
    ]
    for n in lengths:
        res.notes.append(f"kernels at {n:,} tokens: " + "; ".join(
            f"{name}: {d['kernel']}" for name, d in data[n].items()
            if isinstance(d, dict) and d.get("kernel")))
        for name, d in data[n].items():
            if isinstance(d, dict) and d.get("skipped"):
                res.notes.append(f"{name} at {n}: skipped, {d['skipped']}")
        if data[n].get("_failed"):
            res.notes.append(f"{n} tokens: {data[n]['_failed']}")
    return res
