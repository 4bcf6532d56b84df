"""The machine: its description (report header) and section 6, its measured matmul ceiling and
the model FLOPs utilisation (MFU) of section 1's training runs against it."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

from bench.report import SectionResult, Table, fmt
from bench.settings import Profile
from bench.timing import interleave, median


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> str:
    """The SIMD features that decide fp32/bf16 matmul speed."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(w for w in wanted if w in have) or "none of " + ", ".join(
                        wanted)
    except OSError:
        pass
    return "unknown"


def _mem_total_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _versions() -> str:
    out = [f"torch {torch.__version__}"]
    for dist in ("transformers", "x-transformers", "tokenizers"):
        try:
            from importlib.metadata import version
            out.append(f"{dist} {version(dist)}")
        except Exception:  # noqa: BLE001 - absent optional package
            out.append(f"{dist} absent")
    return ", ".join(out)


def describe(precisions: tuple[str, ...]) -> dict[str, Any]:
    """What the report header says about the machine."""
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu features": _cpu_flags(),
        "cores (os.cpu_count)": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "memory": _mem_total_gib(),
        "python": platform.python_version(),
        "versions": _versions(),
        "precision": ("fp32 and bf16 autocast (torch.autocast('cpu', torch.bfloat16))"
                      if "bf16" in precisions else "fp32"),
        "load average at start (1/5/15 min)": load,
    }


def matmul_peak(n: int, reps: int) -> dict[str, dict[str, Any]]:
    """GFLOP/s of an `n x n @ n x n` matmul in fp32 and bf16 (2 n^3 FLOPs a call), interleaved."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    ab, bb = a.bfloat16(), b.bfloat16()
    fns = {"fp32": lambda: torch.mm(a, b), "bf16": lambda: torch.mm(ab, bb)}
    samples = interleave(fns, warmup=2, reps=reps)
    flops = 2.0 * n ** 3
    return {p: {"samples_s": s, "median_s": median(s), "median_gflops": flops / median(s) / 1e9,
                "best_gflops": flops / min(s) / 1e9} for p, s in samples.items()}


def run_ceiling(profile: Profile, training: SectionResult | None) -> SectionResult:
    """Section 7: matmul peak, and the MFU of section 1 (when it ran) against it."""
    res = SectionResult("ceiling", "7. Machine ceiling and model FLOPs utilisation")
    n = profile.matmul_n
    peak = matmul_peak(n, profile.matmul_reps)
    table = Table(f"{n}×{n} @ {n}×{n} matmul (torch.mm)",
                  ["dtype", "median GFLOP/s", "best GFLOP/s", "samples"])
    for p, d in peak.items():
        table.add(p, fmt(d["median_gflops"], 3), fmt(d["best_gflops"], 3), len(d["samples_s"]))
        res.records.append({"what": f"matmul {n}", "dtype": p, **d})
    res.tables.append(table)
    if training is None or not training.records:
        res.notes.append("MFU: section 1 (training) did not run in this invocation")
    else:
        mfu = Table("MFU = (6 × N + 12 × n_layers × hidden × T) × tokens/s ÷ matmul peak of "
                    "the same dtype measured in the same interleaved rounds as the training "
                    "steps; N = parameters in matmuls (all but the input embedding; the LM head "
                    "counts)",
                    ["shape", "contender", "seq", "precision", "N", "GFLOP/s achieved",
                     "peak GFLOP/s alongside", "MFU", "MFU vs table above"])
        for r in training.records:
            rate = r.get("median_tokens_per_s")
            if not rate:
                continue
            achieved = r["flops_per_token"] * rate / 1e9
            alongside = r.get("median_matmul_gflops") or peak[r["precision"]]["median_gflops"]
            m = achieved / alongside
            m_here = achieved / peak[r["precision"]]["median_gflops"]
            res.records.append({"what": "mfu", "shape": r["shape"], "contender": r["contender"],
                                "seq": r["seq"], "precision": r["precision"],
                                "matmul_params": r["matmul_params"],
                                "median_achieved_gflops": achieved,
                                "median_peak_gflops_alongside": alongside, "median_mfu": m,
                                "median_mfu_vs_section_peak": m_here})
            mfu.add(r["shape"], r["contender"], r["seq"], r["precision"],
                    f"{r['matmul_params']:,}", fmt(achieved, 3), fmt(alongside, 3), f"{m:.1%}",
                    f"{m_here:.1%}")
        res.tables.append(mfu)
        res.notes += [
            "target (issue 7): MFU of the small training shape ≥ 40% of the measured matmul "
            "peak",
            "the peak alongside (3 matmuls of the size above per sample, interleaved with the "
            "training steps of section 1) shares the steps' machine load, so their ratio holds "
            "on a busy machine; the last column divides by this section's own peak instead",
        ]
    res.notes.append(f"matmul: median of {profile.matmul_reps} calls per dtype after 2 warm-up "
                     "calls, fp32 and bf16 interleaved; 2 n³ FLOPs per call")
    return res
