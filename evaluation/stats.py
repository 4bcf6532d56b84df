"""Mean, spread and a 95% confidence interval over the seeds of one cell of a study.

A result from one run is an anecdote; every summary this project prints groups the runs that
differ only in their seed and reports `mean +- half-width of the 95% interval (n seeds)`. The
interval is Student's t interval for the mean, `t(0.975, n - 1) * std / sqrt(n)`, with the
sample standard deviation (ddof = 1); with one seed it is undefined (NaN), and is shown so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t, t(0.975, df), for df = 1..30 (standard tables).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table for df <= 30, beyond it the Cornish-Fisher expansion around the
    normal quantile (error below 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Spread:
    """`n` values summarised: mean, sample std, 95% interval half-width, min and max."""

    mean: float
    std: float
    ci95: float
    n: int
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of `values` (at least one; NaN std and interval for a single value)."""
        if not values:
            raise ValueError("no values to summarise")
        xs = [float(v) for v in values]
        n = len(xs)
        mean = statistics.fmean(xs)
        if n == 1:
            return cls(mean, math.nan, math.nan, 1, xs[0], xs[0])
        std = statistics.stdev(xs)
        return cls(mean, std, t_quantile_975(n - 1) * std / math.sqrt(n), n, min(xs), max(xs))

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    def format(self, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        """`mean +- ci95` (or the mean alone for one value), e.g. `97.3 +- 1.2%`."""
        mean = f"{scale * self.mean:.{digits}f}"
        if self.n < 2:
            return f"{mean}{unit}"
        return f"{mean} +- {scale * self.ci95:.{digits}f}{unit}"

    def to_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}mean": self.mean, f"{prefix}std": self.std,
                f"{prefix}ci95": self.ci95, f"{prefix}n": self.n,
                f"{prefix}min": self.min, f"{prefix}max": self.max}
