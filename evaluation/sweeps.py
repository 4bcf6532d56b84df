"""The jobs of a Hydra multirun, grouped into cells that differ only in their seed.

Each job folder of `python train.py -m ...` holds `.hydra/overrides.yaml`, the command-line
overrides that made it (`pe=rope`, `model.hidden_size=48`, `seed=1`). Two jobs belong to the same
cell when their overrides are equal once `seed` is left out; summaries report a cell's mean and
interval over its seeds (`evaluation.stats.Spread`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from bipe.errors import DataError

SEED_KEYS = ("seed",)


def unfinished_jobs(sweep_dir: Path, marker: str) -> list[Path]:
    """The job folders under `sweep_dir` (those with `.hydra/`) without `marker`, the file a job
    writes when it ends well (`metrics.json`, `task_eval.json`): failed, stopped or running."""
    return [job for job in sorted(p.parent for p in sweep_dir.rglob(".hydra"))
            if job != sweep_dir and not (job / marker).is_file()]


def warn_unfinished(sweep_dir: Path, marker: str) -> list[Path]:
    """Name each unfinished job (`unfinished_jobs`) on stderr, one line each; returns them."""
    import sys

    jobs = unfinished_jobs(sweep_dir, marker)
    for job in jobs:
        print(f"unfinished: {job} has no {marker}: it failed, was stopped or is still running "
              "(its train.log says which); it is left out", file=sys.stderr)
    return jobs


def read_overrides(job_dir: Path) -> dict[str, str]:
    """`{key: value}` from `job_dir/.hydra/overrides.yaml` (`{}` for a folder without it)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as exc:
        raise DataError(f"{path} is not readable YAML ({exc}); rerun that job") from None
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


@dataclass(frozen=True)
class Cell:
    """The overrides that define one cell of a sweep (everything but the seed), sorted."""

    items: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, overrides: Mapping[str, str], drop: Iterable[str] = ()) -> Cell:
        skip = set(SEED_KEYS) | set(drop)
        return cls(tuple(sorted((k, v) for k, v in overrides.items() if k not in skip)))

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.items).get(key, default)

    def label(self, keys: Iterable[str] | None = None) -> str:
        """`k=v,k=v` over `keys` (default: all) with the last part of each key (`hidden_size=48`);
        `pe=` is shown as the bare encoding name."""
        wanted = None if keys is None else set(keys)
        parts = []
        for k, v in self.items:
            if wanted is not None and k not in wanted:
                continue
            parts.append(v if k == "pe" else f"{k.rsplit('.', 1)[-1]}={v}")
        return ",".join(parts)


def varying_keys(cells: Iterable[Cell]) -> list[str]:
    """The override keys whose values differ between `cells` (in first-seen order)."""
    values: dict[str, set[str | None]] = {}
    cells = list(cells)
    for cell in cells:
        for k, _ in cell.items:
            values.setdefault(k, set())
    for k in values:
        values[k] = {c.get(k) for c in cells}
    return [k for k, vs in values.items() if len(vs) > 1]


def check_distinct_seeds(members: Mapping[Cell, list[tuple[int | None, str]]]) -> None:
    """DataError when one cell holds two runs of the same seed (two sweeps mixed together)."""
    for cell, runs in members.items():
        seen: dict[int | None, str] = {}
        for seed, where in runs:
            if seed in seen:
                raise DataError(f"{seen[seed]} and {where} are the same cell "
                                f"({cell.label() or 'no overrides'}) with the same seed {seed}; "
                                "summarise one sweep at a time or remove one of them")
            seen[seed] = where
