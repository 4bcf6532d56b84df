"""Gather a synthetic-task sweep into a table and a figure: accuracy against hidden size.

    python -m evaluation.task_summary multirun/<day>/<time>
    python -m evaluation.task_summary multirun/<day>/<time> --metric exact
    python -m evaluation.task_summary multirun/<day>/<time>    # a SCROLLS sweep: + average

Every job of `python train.py -m experiment=arithmetic_sweep` (or `bi_nfa_sweep`) ends by writing
`task_eval.json` (test-set metrics per setting, with its encoding, model shape and seed). This
command reads them all and groups the jobs that differ only in their seed (`.hydra/overrides.yaml`
of each job folder, `seed` left out; `evaluation.sweeps`). Each cell is reported as its mean
and the half-width of its 95% interval over seeds (Student's t), with the number of seeds. Written
into the sweep folder:

* `summary.csv`: one row per (encoding, hidden size, other swept settings, setting) with mean,
  std, ci95, min, max and the number of seeds;
* `summary.md`: the table printed to the terminal (rows: encoding and hidden size; columns:
  settings, e.g. `ops_4 ops_5 ...` or `seg_8 seg_16 seg_32`; the first is in-distribution);
* `accuracy_vs_hidden.png`: one panel per setting, one line per encoding, error bars = 95%
  interval.

The same table and figure go to W&B as a `summary` run in the sweep's group, beside its jobs'
runs (mode as for training: `WANDB_MODE`, else online if logged in, else offline).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bipe.errors import BipeError, DataError
from bipe.io import atomic_write_text
from evaluation.plots import plot_accuracy_vs_hidden
from evaluation.stats import Spread
from evaluation.sweeps import (
    Cell,
    check_distinct_seeds,
    read_overrides,
    varying_keys,
    warn_unfinished,
)
from evaluation.wandb_runs import resolve_mode, sweep_group
from tasks import main_metric

# What the rows of a summary are named by; every other swept setting becomes a `variant`.
ROW_KEYS = ("pe", "model.hidden_size")

log = logging.getLogger(__name__)


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every `task_eval.json` under `sweep_dir`, with its path; DataError if there is none or
    the jobs mix tasks. Jobs without one (failed, stopped, running) are named on stderr."""
    if not sweep_dir.is_dir():
        raise DataError(f"sweep folder {sweep_dir} does not exist; pass the folder of a "
                        "`python train.py -m task=...` sweep (multirun/<day>/<time>)")
    jobs = []
    for path in sorted(sweep_dir.rglob("task_eval.json")):
        try:
            job = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not readable JSON ({exc}); rerun that job or delete "
                            "its folder") from None
        jobs.append({**job, "path": str(path), "overrides": read_overrides(path.parent)})
    warn_unfinished(sweep_dir, "task_eval.json")
    if not jobs:
        raise DataError(f"no task_eval.json under {sweep_dir}: its jobs have not finished, or "
                        "they trained a language model (task=lm; use eval.py for those)")
    tasks = sorted({j["task"] for j in jobs})
    if len(tasks) > 1:
        raise DataError(f"{sweep_dir} mixes tasks {tasks}; summarise one task's sweep at a time")
    return jobs


def summarise(jobs: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows `(pe, hidden_size, variant, setting)` with `metric` over the seeds of each cell:
    mean, std, ci95 (half-width of the 95% interval), min, max and `seeds` (their number).

    A cell is the job's overrides without `seed`; `variant` names the swept settings other than
    the encoding and hidden size (e.g. `lr=0.01`), empty when there are none.
    """
    cells = {job["path"]: Cell.of(job["overrides"], drop=ROW_KEYS) for job in jobs}
    other = varying_keys(cells.values())
    groups: dict[tuple[str, int, str, str], list[float]] = defaultdict(list)
    members: dict[Cell, list[tuple[int | None, str]]] = defaultdict(list)
    params: dict[tuple[str, int], int] = {}
    settings: list[str] = []
    for job in jobs:
        hidden = int(job["model"]["hidden_size"])
        variant = cells[job["path"]].label(other)
        params[job["pe"], hidden] = int(job["n_parameters"])
        for row in job["results"]:
            # A repeated seed matters only within one setting (SCROLLS runs a set per job).
            members[Cell.of({**job["overrides"], "pe": job["pe"], "model.hidden_size": str(hidden),
                             "setting": row["setting"]})].append((job.get("seed"), job["path"]))
            if metric not in row:
                raise DataError(f"{job['path']} has no metric {metric!r}; choose one of "
                                f"{sorted(k for k in row if isinstance(row[k], float))}")
            groups[job["pe"], hidden, variant, row["setting"]].append(float(row[metric]))
            if row["setting"] not in settings:
                settings.append(row["setting"])
    check_distinct_seeds(members)
    order = {s: i for i, s in enumerate(settings)}
    rows = []
    for (pe, hidden, variant, setting), values in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], order[kv[0][3]])):
        spread = Spread.of(values)
        rows.append({"pe": pe, "hidden_size": hidden, "variant": variant,
                     "n_parameters": params[pe, hidden], "setting": setting, "metric": metric,
                     "mean": spread.mean, "std": spread.std, "ci95": spread.ci95,
                     "min": spread.min, "max": spread.max, "seeds": spread.n})
    return rows


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    spread = Spread(row["mean"], row["std"], row["ci95"], row["seeds"], row["min"], row["max"])
    return spread.format(scale=100, unit="%").replace(" +- ", " ± ")


def format_summary(rows: Sequence[dict[str, Any]], title: str, average: bool = False) -> str:
    """Rows: encoding x hidden size (x variant); columns: settings (+ their average); cells:
    `mean ± half-width of the 95% interval` over seeds, in %. A markdown table."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    cell = {(r["pe"], r["hidden_size"], r.get("variant", ""), r["setting"]): r for r in rows}
    keys = list(dict.fromkeys((r["pe"], r["hidden_size"], r.get("variant", "")) for r in rows))
    seeds = sorted({r["seeds"] for r in rows})
    note = (f" (mean ± 95% interval over {seeds[0]} seeds)" if seeds == [seeds[0]] and seeds[0] > 1
            else " (one seed per cell: anecdotes, no interval)" if seeds == [1]
            else f" (mean ± 95% interval; {seeds[0]} to {seeds[-1]} seeds per cell)")
    columns = [*settings, "average"] if average else settings
    header = ["pe", "hidden", "params"] + (["variant"] if any(k[2] for k in keys) else []) \
        + (["seeds"] if len(seeds) > 1 else []) + columns
    table = []
    for pe, hidden, variant in keys:
        mine = [cell.get((pe, hidden, variant, s)) for s in settings]
        line = [pe, str(hidden), f"{_params(rows, pe, hidden):,}"]
        if "variant" in header:
            line.append(variant)
        if "seeds" in header:
            line.append(str(max(r["seeds"] for r in mine if r is not None)))
        line += [_cell(r) for r in mine]
        if average:  # over the settings this row has (SCROLLS: the paper's average), per seed
            means = [r["mean"] for r in mine if r is not None]
            line.append(f"{100 * sum(means) / len(means):.1f}%" if means else "-")
        table.append(line)
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    left = {"pe", "variant"}

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in
                                 zip(cells, widths, header, strict=True)) + " |"

    lines = [title + note, "", fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(t) for t in table]
    return "\n".join(lines)


def _params(rows: Sequence[dict[str, Any]], pe: str, hidden: int) -> int:
    return next(r["n_parameters"] for r in rows if (r["pe"], r["hidden_size"]) == (pe, hidden))


def write_outputs(rows: Sequence[dict[str, Any]], out: Path, task: str, metric: str
                  ) -> dict[str, Path]:
    """summary.csv, summary.md, accuracy_vs_hidden.png in `out` (each written atomically; for a
    metric other than the task's headline one the names end in `_<metric>`)."""
    suffix = "" if metric == main_metric(task) else f"_{metric}"
    names = {"csv": f"summary{suffix}.csv", "md": f"summary{suffix}.md",
             "png": f"accuracy_vs_hidden{suffix}.png"}
    files = {name: out / name for name in names.values()}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(files[names["csv"]], text.getvalue())
    table = format_summary(rows, f"{task}: test {metric} by encoding and hidden size",
                           average=task == "scrolls")
    atomic_write_text(files[names["md"]], table + "\n")
    panels: dict[str, dict[str, list[tuple[int, Spread]]]] = {}
    for r in rows:
        label = r["pe"] + (f" {r['variant']}" if r.get("variant") else "")
        panels.setdefault(r["setting"], {}).setdefault(label, []).append(
            (r["hidden_size"], Spread(r["mean"], r["std"], r["ci95"], r["seeds"], r["min"],
                                      r["max"])))
    plot_accuracy_vs_hidden(panels, files[names["png"]], metric=metric,
                            title=f"{task}: test {metric} against hidden size")
    return files


def log_to_wandb(rows: Sequence[dict[str, Any]], files: dict[str, Path], sweep_dir: Path,
                 task: str, metric: str, project: str = "bipe", mode: str | None = None) -> None:
    """A `summary` run in the sweep's W&B group: the table, one line plot per setting, the PNG."""
    mode = mode or resolve_mode(None)  # an explicit --wandb-mode beats WANDB_MODE
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=project, mode=mode, job_type="summary", group=sweep_group(sweep_dir),
                     name=f"summary_{task}", dir=str(sweep_dir),
                     config={"task": task, "metric": metric, "sweep_dir": str(sweep_dir)})
    try:
        cols = list(rows[0])
        run.log({"summary": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
        for setting in dict.fromkeys(r["setting"] for r in rows):
            pes = list(dict.fromkeys(r["pe"] for r in rows))
            xs = sorted({r["hidden_size"] for r in rows})
            ys = [[next((r["mean"] for r in rows if r["setting"] == setting and r["pe"] == pe
                         and r["hidden_size"] == x), float("nan")) for x in xs] for pe in pes]
            run.log({f"{metric}_vs_hidden/{setting}": wandb.plot.line_series(
                xs=xs, ys=ys, keys=pes, title=f"{task} {setting}: {metric}",
                xname="hidden size")})
        png = next(p for p in files.values() if p.suffix == ".png")
        run.log({f"figures/{png.stem}": wandb.Image(str(png))})
    finally:
        wandb.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.task_summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (multirun/<day>/<time>)")
    parser.add_argument("--metric", default=None,
                        help="accuracy | exact (arithmetic), sequence_accuracy | token_accuracy "
                             "(Bi-NFA); default: the task's headline metric")
    parser.add_argument("--project", default="bipe", help="W&B project")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"],
                        help="wins over WANDB_MODE; default: WANDB_MODE, else online if logged "
                             "in, else offline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        jobs = load_jobs(args.sweep_dir)
        task = jobs[0]["task"]
        metric = args.metric or main_metric(task)
        rows = summarise(jobs, metric)
        files = write_outputs(rows, args.sweep_dir, task, metric)
        print(next(p for p in files.values() if p.suffix == ".md").read_text(), end="")
        print(f"{len(jobs)} jobs; wrote {', '.join(str(p) for p in files.values())}")
        log_to_wandb(rows, files, args.sweep_dir, task, metric, args.project, args.wandb_mode)
    except BipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
