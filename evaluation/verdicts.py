"""Paired comparisons between encodings, and the rule that turns one into a verdict.

Runs of one study that share a seed share their data order and initialisation stream, so two
encodings are compared by their per-seed differences `d_s = A_s - B_s` over the seeds both have:
the mean difference and its 95% interval (Student's t, `evaluation.stats.Spread`). The verdict
on a claim of the paper that A beats B:

* **reproduced**: the interval excludes zero in the paper's direction;
* **reversed**: the interval excludes zero in the other direction;
* **not shown**: the interval contains zero, or there is one seed (no interval). Then the number
  of seeds at which an interval of the observed spread would exclude a difference of the observed
  size is given (`seeds_to_resolve`): roughly a coin flip's chance at that many, more for
  confidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evaluation.records import Record
from evaluation.stats import Spread, t_quantile_975

REPRODUCED, REVERSED, NOT_SHOWN = "reproduced", "reversed", "not shown"


def matches(record: Record, selector: Mapping[str, Any]) -> bool:
    """Whether every key of `selector` has that value in the record's cell (numbers compared as
    numbers: `48 == 48.0`)."""
    for key, want in selector.items():
        have = record.cell.get(key)
        if isinstance(want, int | float) and isinstance(have, int | float):
            if not math.isclose(float(have), float(want)):
                return False
        elif have != want:
            return False
    return True


def by_seed(records: Iterable[Record], selector: Mapping[str, Any],
            value: Callable[[Record], float]) -> dict[int, float]:
    """`{seed: value}` of the records that match `selector` (finite values only)."""
    out: dict[int, float] = {}
    for r in records:
        if matches(r, selector):
            v = value(r)
            if math.isfinite(v):
                out[r.seed] = v
    return out


@dataclass(frozen=True)
class Paired:
    """A against B over their common seeds: each side's spread and that of the differences."""

    a: Spread | None
    b: Spread | None
    diff: Spread | None
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
        seeds = tuple(sorted(set(a) & set(b)))
        if not seeds:
            return cls(Spread.of(list(a.values())) if a else None,
                       Spread.of(list(b.values())) if b else None, None, ())
        return cls(Spread.of([a[s] for s in seeds]), Spread.of([b[s] for s in seeds]),
                   Spread.of([a[s] - b[s] for s in seeds]), seeds)


def verdict(diff: Spread | None, higher_is_better: bool) -> str:
    """The rule of this module's docstring, on the spread of A - B."""
    if diff is None or diff.n < 2 or not math.isfinite(diff.ci95):
        return NOT_SHOWN
    if diff.low > 0:
        return REPRODUCED if higher_is_better else REVERSED
    if diff.high < 0:
        return REVERSED if higher_is_better else REPRODUCED
    return NOT_SHOWN


def seeds_to_resolve(diff: Spread | None, limit: int = 1000) -> int | None:
    """The smallest number of seeds at which the 95% interval of a mean difference with the
    observed mean and standard deviation would exclude zero; None when it cannot be said (fewer
    than two seeds, no difference, or no spread) or lies beyond `limit`."""
    if diff is None or diff.n < 2 or diff.mean == 0 or not diff.std > 0:
        return None
    for n in range(2, limit + 1):
        if t_quantile_975(n - 1) * diff.std / math.sqrt(n) < abs(diff.mean):
            return n
    return None


def seeds_to_resolve_text(diff: Spread | None, limit: int = 1000) -> str | None:
    """`seeds_to_resolve` in words for a table: "~7 seeds", or "over 1,000 seeds" for a difference
    so small against its spread that no count up to `limit` resolves it; None when it cannot be
    said (fewer than two seeds, no difference, or no spread)."""
    need = seeds_to_resolve(diff, limit)
    if need is not None:
        return f"~{need} seeds"
    if diff is None or diff.n < 2 or diff.mean == 0 or not diff.std > 0:
        return None
    return f"over {limit:,} seeds"
