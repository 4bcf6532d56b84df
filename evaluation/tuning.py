"""Read a tuning sweep and choose each encoding's learning rate on the validation metric.

    python train.py -m experiment=arithmetic_sweep hparams_search=arithmetic_lr
    python -m evaluation.tuning results/arithmetic_sweep
    python -m evaluation.tuning results/arithmetic_sweep --write conf/tuned/arithmetic_sweep
    python -m evaluation.tuning multirun/<day>/<time>       # a plain sweep folder works too

A study's tuning grid leaves one record per finished run in `results/<study>/`
(`evaluation.records`; those the `hparams_search` config made are marked with the stage
`tuning`); the metric is the study's `optimized_metric` (`conf/experiment/<study>.yaml`: a
validation metric, never a test one). A plain sweep folder has `metrics.json` in each finished
job and the metric in `.hydra/config.yaml`. This command prints, per encoding, the metric at
each learning rate (mean over seeds when the grid has several) and the best one: lowest for a
loss or perplexity, highest otherwise. A best value on the edge of the grid is flagged: the
optimum may lie outside it. A job that failed or has not finished is named, and a grid with a
hole is reported as incomplete: `--write` refuses it, since the missing point might be the
best. `--write DIR` stores each best as `DIR/<pe>.yaml`, which `conf/train.yaml` loads for
`experiment=<DIR's name>`. `--pe NAME ...` keeps only those encodings: after widening the grid
for the ones whose best sat on its edge, their files can be rewritten before the others' new
points are run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bipe.errors import BipeError, DataError
from bipe.io import atomic_write_text
from evaluation.records import Record, format_value, load_records, serving
from evaluation.stats import Spread
from evaluation.sweeps import (
    Cell,
    check_distinct_seeds,
    read_overrides,
    varying_keys,
    warn_unfinished,
)

LR_KEY = "optim.lr"
CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class TuningResult:
    """One encoding (or other cell) of a tuning sweep: the metric at each learning rate."""

    cell: Cell
    by_lr: dict[float, Spread]
    best_lr: float
    at_edge: bool
    missing: list[float]  # learning rates of the grid this cell has no finished run at


def minimise(metric: str) -> bool:
    """Whether lower is better for `metric` (losses and perplexities)."""
    name = metric.rsplit("/", 1)[-1]
    return name.startswith("loss") or name.startswith("ppl") or name.endswith("loss")


def load_runs(sweep_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """`(optimized_metric, runs)`: each finished run's overrides, seed and final metrics, from a
    study's records (`results/<study>`) or a sweep folder's jobs."""
    if not sweep_dir.is_dir():
        raise DataError(f"sweep folder {sweep_dir} does not exist; pass results/<study> or the "
                        "folder of a `python train.py -m ... hparams_search=...` sweep")
    if any(sweep_dir.glob("*.json")):
        return load_record_runs(sweep_dir)
    runs, metrics_named = [], set()
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        job = path.parent
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) \
            if (job / ".hydra" / "config.yaml").is_file() else {}
        name = config.get("optimized_metric")
        if not name:
            raise DataError(f"{job} does not name an optimized_metric; tune with an "
                            "hparams_search config (conf/hparams_search/*.yaml)")
        metrics_named.add(name)
        data = json.loads(path.read_text())
        overrides = read_overrides(job)
        if LR_KEY not in overrides:
            raise DataError(f"{job} was not given {LR_KEY}; this sweep does not tune it")
        runs.append({"job": str(job), "overrides": overrides, "seed": data.get("seed"),
                     "metrics": data["metrics"]})
    if not runs:
        raise DataError(f"no */metrics.json under {sweep_dir}: its jobs have not finished")
    for job in warn_unfinished(sweep_dir, "metrics.json"):  # a hole in the grid, not a gap
        overrides = read_overrides(job)
        if LR_KEY in overrides:
            runs.append({"job": str(job), "overrides": overrides, "seed": None, "metrics": None})
    if len(metrics_named) > 1:
        raise DataError(f"{sweep_dir} mixes optimized metrics {sorted(metrics_named)}")
    return metrics_named.pop(), runs


def study_metric(study: str) -> str:
    """The `optimized_metric` of `conf/experiment/<study>.yaml`."""
    path = CONF / "experiment" / f"{study}.yaml"
    name = (yaml.safe_load(path.read_text()) or {}).get("optimized_metric") \
        if path.is_file() else None
    if not name:
        raise DataError(f"{path} names no optimized_metric; pass --metric")
    return name


def load_record_runs(folder: Path, metric: str | None = None
                     ) -> tuple[str, list[dict[str, Any]]]:
    """`(metric, runs)` from the tuning records of a study (`stages` holds `tuning`)."""
    records = serving(load_records(folder), "tuning")
    if not records:
        raise DataError(f"no tuning records in {folder}: run the study's tuning grid first "
                        f"(python train.py -m experiment={folder.name} hparams_search=...)")
    return record_runs(records, metric)


def record_runs(records: Sequence[Record], metric: str | None = None
                ) -> tuple[str, list[dict[str, Any]]]:
    """`(metric, runs)` from tuning records already read (at least one)."""
    metric = metric or study_metric(records[0].study)
    runs = []
    for r in records:
        if LR_KEY not in r.cell:
            raise DataError(f"{r.path} does not name {LR_KEY} in its cell; add it to study.cell")
        runs.append({"job": str(r.path), "metrics_file": str(r.path), "seed": r.seed,
                     "overrides": {k: format_value(v) for k, v in r.cell.items()},
                     "metrics": {k: (float("nan") if v is None else v)
                                 for k, v in r.metrics.items()}})
    return metric, runs


def study_grid(study: str) -> list[float]:
    """The learning rates of a study's tuning grid, `conf/hparams_search/<name>_lr.yaml` for
    study `<name>_sweep` ([] when it has none)."""
    path = CONF / "hparams_search" / f"{study.removesuffix('_sweep')}_lr.yaml"
    if not path.is_file():
        return []
    params = (((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper")
              or {}).get("params") or {}
    return [float(v) for v in str(params.get(LR_KEY, "")).split(",") if v.strip()]


def choose(metric: str, runs: Sequence[dict[str, Any]],
           grid: Sequence[float] = ()) -> list[TuningResult]:
    """Per cell (the overrides but the learning rate and seed), the best learning rate. `grid`
    and runs without metrics (jobs that failed) name learning rates the grid should have."""
    values: dict[Cell, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    members: dict[Cell, list[tuple[int | None, str]]] = defaultdict(list)
    grid = {*grid, *(float(run["overrides"][LR_KEY]) for run in runs)}
    for run in runs:
        if run["metrics"] is None:
            continue
        if metric not in run["metrics"]:
            where = run.get("metrics_file", f"{run['job']}/metrics.json")
            raise DataError(f"{where} has no {metric}; it has "
                            f"{', '.join(sorted(run['metrics']))}")
        cell = Cell.of(run["overrides"], drop=[LR_KEY])
        lr = float(run["overrides"][LR_KEY])
        values[cell][lr].append(float(run["metrics"][metric]))
        members[Cell.of(run["overrides"])].append((run["seed"], run["job"]))
    check_distinct_seeds(members)
    lower = minimise(metric)
    grid = sorted(grid)
    results = []
    for cell, by_lr in values.items():
        spreads = {lr: Spread.of(v) for lr, v in sorted(by_lr.items())}
        finite = {lr: s.mean for lr, s in spreads.items() if math.isfinite(s.mean)}
        if not finite:
            raise DataError(f"every run of {cell.label()} diverged ({metric} is not finite)")
        best = (min if lower else max)(finite, key=finite.get)
        edge = len(grid) > 1 and best in (grid[0], grid[-1])
        results.append(TuningResult(cell, spreads, best, edge,
                                    [lr for lr in grid if lr not in by_lr]))
    return sorted(results, key=lambda r: r.cell.items)


def format_table(metric: str, results: Sequence[TuningResult]) -> str:
    """Cells x learning rates; the best per row marked with `*`."""
    lrs = sorted({lr for r in results for lr in r.by_lr})
    keys = varying_keys(r.cell for r in results) or ["pe"]
    labels = [r.cell.label(keys) for r in results]
    width = max(12, *(len(label) + 2 for label in labels))
    goal = "lower" if minimise(metric) else "higher"
    lines = [f"{metric} by learning rate ({goal} is better; * = chosen, mean over seeds)",
             "".ljust(width) + "".join(f"{lr:>12g}" for lr in lrs) + f"{'best lr':>12}"]
    for r, label in zip(results, labels, strict=True):
        cells = []
        for lr in lrs:
            s = r.by_lr.get(lr)
            text = "-" if s is None else f"{s.mean:.4g}" + ("*" if lr == r.best_lr else " ")
            cells.append(f"{text:>12}")
        edge = "  (grid edge)" if r.at_edge else ""
        if r.missing:
            edge += f"  (incomplete: no run at {', '.join(f'{lr:g}' for lr in r.missing)})"
        lines.append(label.ljust(width) + "".join(cells) + f"{r.best_lr:>12g}{edge}")
    return "\n".join(lines)


def write_tuned(out: Path, sweep_dir: Path, metric: str,
                results: Sequence[TuningResult]) -> list[Path]:
    """`out/<pe>.yaml` setting `optim.lr` for each tuned encoding (a sweep over pe only)."""
    holes = [f"{r.cell.label()} at lr {', '.join(f'{lr:g}' for lr in r.missing)}"
             for r in results if r.missing]
    if holes:
        raise DataError(f"the grid is incomplete ({'; '.join(holes)}): finish those runs "
                        "before choosing, the missing point might be the best")
    others = [k for k in varying_keys(r.cell for r in results) if k != "pe"]
    if others or any(r.cell.get("pe") is None for r in results):
        raise DataError(f"--write stores one learning rate per encoding, but this sweep also "
                        f"varies {', '.join(others) or 'no pe'}; write the files by hand")
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        pe = r.cell.get("pe")
        grid = ", ".join(f"{lr:g}: {s.mean:.4g}" for lr, s in r.by_lr.items())
        seeds = sorted({s.n for s in r.by_lr.values()})
        path = atomic_write_text(out / f"{pe}.yaml",
            "# @package _global_\n"
            f"# Tuned by `python -m evaluation.tuning {sweep_dir}`:\n"
            f"# {metric} ({'lower' if minimise(metric) else 'higher'} is better) at each lr, "
            f"{'/'.join(map(str, seeds))} seed(s):\n# {grid}\n"
            + ("# The best is on the edge of the grid.\n" if r.at_edge else "")
            + f"optim:\n  lr: {r.best_lr:g}\n")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.tuning",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path,
                        help="a study's records (results/<study>) or a sweep folder")
    parser.add_argument("--metric", default=None,
                        help="the metric to choose on; default: the study's optimized_metric")
    parser.add_argument("--write", type=Path, default=None, metavar="DIR",
                        help="write DIR/<pe>.yaml with each encoding's best lr "
                             "(e.g. conf/tuned/arithmetic_sweep)")
    parser.add_argument("--pe", nargs="+", default=None, metavar="NAME",
                        help="only these encodings, e.g. the ones whose grid was widened (the "
                             "others' grids may then be incomplete)")
    args = parser.parse_args(argv)
    try:
        grid: list[float] = []
        if any(args.sweep_dir.glob("*.json")):  # a study's records: its grid is in conf/
            metric, runs = load_record_runs(args.sweep_dir, args.metric)
            grid = study_grid(args.sweep_dir.name)
        else:
            metric, runs = load_runs(args.sweep_dir)
        results = choose(metric, runs, grid)
        if args.pe is not None:
            unknown = sorted(set(args.pe) - {str(r.cell.get("pe")) for r in results})
            if unknown:
                raise DataError(f"--pe {' '.join(unknown)}: no tuning runs of that encoding in "
                                f"{args.sweep_dir}")
            results = [r for r in results if r.cell.get("pe") in args.pe]
        print(format_table(metric, results))
        print(f"{len(runs)} runs in {args.sweep_dir}")
        if args.write is not None:
            for path in write_tuned(args.write, args.sweep_dir, metric, results):
                print(f"wrote {path}")
    except BipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
