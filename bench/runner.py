"""Run the selected sections of a profile and write the report."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench import machine
from bench.report import SectionResult, write
from bench.settings import SECTIONS, Profile
from bench.timing import median


def _section_fns() -> dict[str, Callable[[Profile], SectionResult]]:
    # lazy: a section's modules load only when some section is run.
    from bench.data_pipeline import run_data
    from bench.decoding import run_decoding
    from bench.long_context import run_long_context
    from bench.training import run_compiled, run_encodings, run_training

    return {"training": run_training, "encodings": run_encodings,
            "compiled": run_compiled,
            "long_context": run_long_context, "decoding": run_decoding, "data": run_data}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def noise(res: SectionResult) -> str:
    """A note on how far the time samples of one figure spread: (max - min) / median."""
    spreads = []
    for r in res.records:
        for k, s in r.items():
            if (k.startswith("samples_") and "mib" not in k and isinstance(s, list)
                    and len(s) > 1):
                m = median(s)
                if m > 0:
                    spreads.append((max(s) - min(s)) / m)
    if not spreads:
        return ""
    return (f"noise: (max − min) / median of one figure's samples is {median(spreads):.0%} "
            f"typically, {max(spreads):.0%} at most, over {len(spreads)} figures")


def run(profile: Profile, out: Path, sections: Sequence[str] = SECTIONS,
        command: str = "python -m bench", echo: Callable[[str], None] | None = None,
        ) -> tuple[Path, Path, str]:
    """Run `sections` (in the canonical order) and write `bench_results.{md,json}` to `out`.
    Returns the two paths and the Markdown."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    torch.manual_seed(0)
    info = machine.describe(profile.precisions)
    fns = _section_fns()
    results: list[SectionResult] = []
    by_key: dict[str, SectionResult] = {}
    for key in SECTIONS:
        if key not in sections:
            continue
        t0, load0 = time.perf_counter(), _load()
        if echo:
            echo(f"[bench] {key} ...")
        if key == "ceiling":
            res = machine.run_ceiling(profile, by_key.get("training"))
        else:
            res = fns[key](profile)
        res.seconds = time.perf_counter() - t0
        spread = noise(res)
        if spread:
            res.notes.append(spread)
        res.notes.append(f"load average (1 min) at the start / end of this section: "
                         f"{load0:.2f} / {_load():.2f} on {os.cpu_count()} cores (other "
                         "processes' CPU use slows every contender alike, but adds noise)")
        if echo:
            echo(f"[bench] {key} done in {res.seconds:.0f} s")
        results.append(res)
        by_key[key] = res
        # Rewrite after every section: a long run that is stopped keeps what it measured.
        write(out, info, profile.to_dict(), results, command)
    return write(out, info, profile.to_dict(), results, command)
