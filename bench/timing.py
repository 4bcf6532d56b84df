"""Side-by-side timing: contenders run round-robin (A B C, B C A, ...) and each gets the median.

On a shared machine the load changes from second to second; measuring the contenders of one
comparison in alternation exposes them all to the same conditions, and the median discards the
samples that a burst of foreign load spoiled.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def median(samples: Sequence[float]) -> float:
    """Median of the samples (NaN for none)."""
    return float(statistics.median(samples)) if samples else float("nan")


def spread(samples: Sequence[float]) -> float | None:
    """(max - min) / median of a figure's samples (None for fewer than two)."""
    if len(samples) < 2:
        return None
    m = median(samples)
    return (max(samples) - min(samples)) / m if m > 0 else None


def rotations(names: Sequence[str], reps: int) -> list[list[str]]:
    """`reps` rounds over `names`, each starting one further along (A B C, B C A, C A B, ...),
    so no contender always runs first (after a pause) or last."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(reps)] if n else []


def time_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(contenders: Mapping[str, Callable[[], object]], *, warmup: int,
               reps: int) -> dict[str, list[float]]:
    """Seconds per call of every contender: `warmup` untimed calls each, then `reps` timed
    rounds in rotating order. Returns the raw samples per contender."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in rotations(names, reps):
        for name in order:
            gc.collect()
            samples[name].append(time_call(contenders[name]))
    return samples
