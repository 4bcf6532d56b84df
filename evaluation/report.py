"""Every study table, figure and verdict of the README, generated from the records in results/.

    python -m evaluation.report            # rewrite the README's generated blocks and figures
    python -m evaluation.report --check    # exit 1 with a diff if the README disagrees

The README holds blocks between `<!-- report:NAME -->` and `<!-- /report:NAME -->`; this command
rewrites each from `results/<study>/*.json` (`evaluation.records`) and draws the figures into
`results/figures/`, each PNG carrying a hash of the numbers it shows, which `--check` compares.
Nobody types a result: a table that disagrees with its records fails the test suite.

Each study table shows, per cell, the mean and the half-width of the 95% interval over its seeds
and their number; the comparisons show the paired per-seed differences and the verdict by the
rule of `evaluation.verdicts`. Cells of the study's sweep (`conf/experiment/<study>.yaml`) without
a record are listed under the table: not yet run, failed, or deferred.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bipe.config import NAMED_ENCODINGS
from bipe.errors import BipeError, DataError
from bipe.io import atomic_write_text
from evaluation.records import Record, all_records, format_value, serving
from evaluation.rescore import RESCORES, planned
from evaluation.stats import Spread
from evaluation.tuning import choose, format_table, record_runs, study_grid
from evaluation.verdicts import (
    Paired,
    by_seed,
    seeds_to_resolve,
    seeds_to_resolve_text,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- report:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->",
                  re.S)


# ---------------------------------------------------------------------------------------------
# What each study reports
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A claim of the paper that encoding `a` beats `b`: on `metric`, within `where`."""

    a: str
    b: str
    metric: str  # a record metric, or `growth_<k>x` (perplexity at k x over that at 1x)
    where: dict[str, Any] = field(default_factory=dict)  # e.g. {"model.hidden_size": 48}
    about: str = ""  # what the metric measures, as the table says it
    b_study: str | None = None  # B's records come from this study (None: the same study)
    label: str = ""  # the "A vs B" column (default: `a vs b`)


@dataclass(frozen=True)
class StudySpec:
    """How a study's records become a table: rows, columns, the comparisons."""

    name: str
    title: str
    rows: tuple[str, ...]  # cell keys that name a row (besides optim.lr, always shown)
    columns: Callable[[Sequence[Record]], list[tuple[str, str]]]  # (header, metric)
    higher_is_better: bool
    percent: bool
    claims: tuple[Claim, ...]
    pe_order: tuple[str, ...]
    note: str = ""  # a sentence after the title (what the table can and cannot show)


def _task_columns(suffix: str) -> Callable[[Sequence[Record]], list[tuple[str, str]]]:
    def columns(records: Sequence[Record]) -> list[tuple[str, str]]:
        names: list[str] = []
        for r in records:
            for row in r.data.get("results", []):
                if row.get("setting") and row["setting"] not in names:
                    names.append(row["setting"])
        return [(n, f"test/{n}/{suffix}") for n in names]
    return columns


def _length_columns(records: Sequence[Record]) -> list[tuple[str, str]]:
    multiples = sorted({int(k.removeprefix("eval/ppl_").removesuffix("x")) for r in records
                        for k in r.metrics if re.fullmatch(r"eval/ppl_\d+x", k)})
    return [(f"{m}x", f"eval/ppl_{m}x") for m in multiples]


HIDDEN = "model.hidden_size"
STUDIES = {
    "text_sweep": StudySpec(
        "text_sweep", "Text: test perplexity against length (Shakespeare, trained on 256 tokens)",
        rows=("pe",), columns=_length_columns, higher_is_better=False, percent=False,
        claims=(Claim("bipe_alibi", "alibi", "eval/ppl_8x", about="perplexity at 8x"),
                Claim("bipe_alibi", "alibi", "growth_16x", about="growth 16x / 1x"),
                Claim("bipe_rope", "rope", "eval/ppl_4x", about="perplexity at 4x"),
                Claim("bipe_rope", "rope", "growth_16x", about="growth 16x / 1x"),
                Claim("bipe_alibi", "bipe_alibi_x1", "eval/ppl_16x", about="perplexity at 16x"),
                Claim("bipe_alibi", "alibi_x11", "eval/ppl_16x", about="perplexity at 16x")),
        pe_order=("rope", "bipe_rope", "alibi", "bipe_alibi", "alibi_x11", "bipe_alibi_x1")),
    "arithmetic_sweep": StudySpec(
        "arithmetic_sweep", "Arithmetic (mod 11, chain of thought): test accuracy, trained on "
        "4 operators", rows=("pe", HIDDEN), columns=_task_columns("accuracy"),
        higher_is_better=True, percent=True,
        claims=tuple(Claim(a, b, "test/ops_4/accuracy", {HIDDEN: h}, "accuracy, 4 operators")
                     for h in (32, 48, 64) for a, b in (("bipe_alibi", "alibi"),
                                                        ("bipe_rope", "rope"))),
        pe_order=("rope", "bipe_rope", "alibi", "bipe_alibi")),
    "bi_nfa_sweep": StudySpec(
        "bi_nfa_sweep", "Bi-NFA: test sequence accuracy, trained on 8 segments",
        rows=("pe", HIDDEN), columns=_task_columns("sequence_accuracy"), higher_is_better=True,
        percent=True,
        claims=tuple(Claim(a, b, f"test/{s}/sequence_accuracy", {HIDDEN: h}, about)
                     for h in (16, 32, 64) for a, b, s, about in (
                         ("bipe_alibi", "alibi", "seg_8", "in distribution"),
                         ("bipe_rope", "rope", "seg_8", "in distribution"),
                         ("bipe_alibi", "bipe_alibi_x1", "seg_16", "2x segments"),
                         ("bipe_alibi", "alibi_x16", "seg_16", "2x segments"))),
        pe_order=("rope", "bipe_rope", "alibi", "bipe_alibi", "alibi_x16", "bipe_alibi_x1")),
    "text_lm_infinite": StudySpec(
        "text_lm_infinite", "Text with LM-Infinite: test perplexity against length, the text "
        "study's RoPE and BiPE-RoPE runs rescored", rows=("pe",), columns=_length_columns,
        higher_is_better=False, percent=False,
        claims=tuple(Claim(pe, pe, metric, about=about, b_study="text_sweep",
                           label=f"{pe} + LM-Infinite vs {pe}")
                     for pe in ("rope", "bipe_rope")
                     for metric, about in (("eval/ppl_16x", "perplexity at 16x"),
                                           ("growth_16x", "growth 16x / 1x")))
        + (Claim("bipe_rope", "rope", "eval/ppl_16x", about="perplexity at 16x",
                 label="bipe_rope vs rope, both + LM-Infinite"),),
        pe_order=("rope", "bipe_rope"),
        note="The same checkpoints as the text study's rows of these encodings, evaluated with "
             "LM-Infinite (`python -m evaluation.rescore text_lm_infinite`); paired with their "
             "own perplexity without it."),
    "text_yarn": StudySpec(
        "text_yarn", "Text after YaRN fine-tuning: test perplexity against length (x the "
        "fine-tuning length, 1024 tokens)", rows=("pe",), columns=_length_columns,
        higher_is_better=False, percent=False,
        claims=(Claim("bipe_rope", "rope", "eval/ppl_4x", about="perplexity at 4x"),
                Claim("bipe_rope", "rope", "growth_4x", about="growth 4x / 1x")),
        pe_order=("rope", "bipe_rope"),
        note="Each of the text study's RoPE and BiPE-RoPE runs fine-tuned with YaRN (factor 4) "
             "from its checkpoint (`python -m evaluation.rescore text_yarn`); the lr column is "
             "the source run's."),
    "encoding_tour": StudySpec(
        "encoding_tour", "Every named encoding: test perplexity against length (Shakespeare, "
        "trained on 256 tokens for 300 steps)", rows=("pe",), columns=_length_columns,
        higher_is_better=False, percent=False, claims=(), pe_order=tuple(NAMED_ENCODINGS),
        note="One seed at the default rate for each: an anecdote that every encoding runs end "
             "to end, not a comparison (the studies above compare, with tuned rates and seeds)."),
}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def tuning_table(records: Sequence[Record], study: str) -> tuple[str, set[str]] | None:
    """The study's learning-rate grid from its tuning records among `records`
    (`evaluation.tuning`) and the encodings whose chosen rate is at the grid's edge, or None
    without tuning records."""
    tuning = serving(records, "tuning")
    if not tuning:
        return None
    metric, runs = record_runs(tuning)
    chosen = choose(metric, runs, study_grid(study))
    return format_table(metric, chosen), {str(r.cell.get("pe")) for r in chosen if r.at_edge}


def has(record: Record, metric: str) -> bool:
    """Whether `value(record, metric)` exists."""
    growth = re.fullmatch(r"growth_(\d+)x", metric)
    needs = [f"eval/ppl_{growth.group(1)}x", "eval/ppl_1x"] if growth else [metric]
    return all(n in record.metrics for n in needs)


def value(record: Record, metric: str) -> float:
    """A metric of a record; `growth_<k>x` is perplexity at k x over that at 1x."""
    growth = re.fullmatch(r"growth_(\d+)x", metric)
    if growth:
        return record.metric(f"eval/ppl_{growth.group(1)}x") / record.metric("eval/ppl_1x")
    return record.metric(metric)


def study_command(study: str) -> str:
    """The command that makes a study's records."""
    if study in RESCORES:
        return f"python -m evaluation.rescore {study}"
    return f"python train.py -m experiment={study}"


def expected_cells(study: str, conf: Path) -> list[dict[str, str]]:
    """The cells and seeds of a study's sweep (`hydra.sweeper.params` of its experiment), as
    `{key: value}` strings, e.g. `{"pe": "rope", "model.hidden_size": "48", "seed": "0"}`."""
    path = conf / "experiment" / f"{study}.yaml"
    if not path.is_file():
        return []
    params = (((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper")
              or {}).get("params") or {}
    keys = list(params)
    grids = [str(params[k]).split(",") for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grids)]


def missing_cells(records: Sequence[Record], expected: Sequence[dict[str, str]]) -> list[str]:
    """The expected cells and seeds that no record covers, as `pe=rope,hidden_size=48,seed=2`."""
    have = set()
    for r in records:
        cell = {**{k: format_value(v) for k, v in r.cell.items()}, "seed": str(r.seed)}
        have.add(tuple(sorted(cell.items())))
    out = []
    for want in expected:
        if not any(all(dict(h).get(k) == v for k, v in want.items()) for h in have):
            out.append(",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in want.items()))
    return out


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def fmt(spread: Spread | None, percent: bool, signed: bool = False) -> str:
    """`mean ± half-width` (in % points for rates), the mean alone for one seed, `-` for none."""
    if spread is None:
        return "-"
    scale, digits = (100.0, 1) if percent else (1.0, 2)
    half = scale * spread.ci95
    if spread.n >= 2 and 0 < half < 0.5 * 10 ** -digits:  # shown as 0.00: two significant
        digits = 1 - math.floor(math.log10(half))          # digits of the interval instead
    sign = "+" if signed else ""
    mean = f"{scale * spread.mean:{sign}.{digits}f}"
    if spread.n < 2:
        return mean
    return f"{mean} ± {half:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i < left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if i < left else ("-" * (w + 1) + ":")
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _row_key(spec: StudySpec, r: Record) -> tuple[Any, ...]:
    """A table row: the spec's row keys and the learning rate (swept, or else the one the run's
    definition fixed)."""
    lr = r.cell.get("optim.lr", (r.data.get("definition") or {}).get("optim.lr"))
    return tuple(r.cell.get(k) for k in spec.rows) + (lr,)


def _order(spec: StudySpec, key: tuple[Any, ...]) -> tuple[Any, ...]:
    pe = key[0]
    rank = spec.pe_order.index(pe) if pe in spec.pe_order else len(spec.pe_order)
    return (*key[1:-1], rank, str(pe), key[-1] or 0)


def study_table(spec: StudySpec, records: Sequence[Record]) -> tuple[str, dict[str, Any]]:
    """The study's markdown table and the numbers it shows (for the figure and its hash)."""
    columns = spec.columns(records)
    groups: dict[tuple[Any, ...], list[Record]] = {}
    for r in records:
        groups.setdefault(_row_key(spec, r), []).append(r)
    header = [*(k.rsplit(".", 1)[-1] for k in spec.rows), "lr", "seeds",
              *(h for h, _ in columns)]
    growth = not spec.percent and any(h == "1x" for h, _ in columns) and len(columns) > 1
    if growth:
        last = columns[-1][0]
        header.append(f"growth {last}/1x")
    rows, data = [], {}
    for key in sorted(groups, key=lambda k: _order(spec, k)):
        members = groups[key]
        line = [format_value(v) for v in key[:-1]] + [format_value(key[-1] or "-"),
                                                      str(len(members))]
        numbers = {}
        for h, metric in columns:
            vals = [v for v in (value(r, metric) for r in members if has(r, metric))
                    if math.isfinite(v)]
            spread = Spread.of(vals) if vals else None
            line.append(fmt(spread, spec.percent))
            numbers[h] = None if spread is None else [spread.mean, spread.ci95, spread.n]
        if growth:
            vals = [value(r, f"growth_{last}") for r in members if has(r, f"growth_{last}")]
            line.append(fmt(Spread.of(vals), False) + "x" if vals else "-")
        rows.append(line)
        data[",".join(line[:len(spec.rows) + 1])] = numbers
    return markdown(header, rows, left=len(spec.rows)), data


def comparisons(spec: StudySpec, records: Sequence[Record],
                others: dict[str, Sequence[Record]] | None = None
                ) -> tuple[str, list[dict[str, Any]]]:
    """The paired comparisons of the study's claims: a markdown table and one dict per claim.
    `others` holds the study records of the studies claims take B from (`Claim.b_study`)."""
    rows, out = [], []
    for c in spec.claims:
        def val(r: Record, metric: str = c.metric) -> float:
            return value(r, metric) if has(r, metric) else math.nan
        b_records = records if c.b_study is None else (others or {}).get(c.b_study, [])
        pair = Paired.of(by_seed(records, {"pe": c.a, **c.where}, val),
                         by_seed(b_records, {"pe": c.b, **c.where}, val))
        higher = spec.higher_is_better and not c.metric.startswith("growth_")
        result = verdict(pair.diff, higher) if pair.seeds else "no records"
        need = seeds_to_resolve(pair.diff) if result == "not shown" else None
        need_text = seeds_to_resolve_text(pair.diff) if result == "not shown" else None
        where = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}" for k, v in c.where.items())
        percent = spec.percent and not c.metric.startswith("growth_")
        note = f"; {need_text} would resolve it" if need_text else ""
        rows.append([c.label or f"{c.a} vs {c.b}", where or "-", c.about, str(len(pair.seeds)),
                     fmt(pair.a, percent), fmt(pair.b, percent),
                     fmt(pair.diff, percent, signed=True), result + note])
        out.append({"claim": c, "pair": pair, "verdict": result, "seeds_needed": need,
                    "seeds_needed_text": need_text})
    header = ["A vs B", "where", "measure", "seeds", "A", "B", "A - B (paired)", "verdict"]
    return markdown(header, rows, left=3), out


def compute_line(records: Sequence[Record], missing: int = 0) -> str | None:
    """What a study's records (all of them, tuning included) took: runs (tuning runs among
    them), core-hours (each run's wall time times its torch threads, summed), the range of
    minutes per run and the CPUs or GPUs; None without records. A run resumed from a checkpoint
    recorded only its last process's time, so the total is then a lower bound, and the line
    says so. With `missing` runs still to make, it estimates their core-hours at the median run
    so far."""
    timed = [r for r in records if r.data.get("wall_seconds") is not None]
    if not timed:
        return None
    machines: dict[str, int] = {}
    for r in timed:
        m = r.data.get("machine") or {}
        name = m.get("gpu") or m.get("cpu") or "an unrecorded machine"
        machines[name] = machines.get(name, 0) + 1
    threads = [int((r.data.get("machine") or {}).get("torch_threads") or 1) for r in timed]
    core_seconds = sorted(float(r.data["wall_seconds"]) * t
                          for r, t in zip(timed, threads, strict=True))
    minutes = sorted(float(r.data["wall_seconds"]) / 60 for r in timed)
    tuning = sum("tuning" in r.data.get("stages", ["study"]) for r in records)
    resumed = sum(r.data.get("resumed_from_step") is not None for r in timed)
    untimed = len(records) - len(timed)
    thread_text = (f"{threads[0]} thread{'s' if threads[0] > 1 else ''} each"
                   if len(set(threads)) == 1 else f"{min(threads)} to {max(threads)} threads")
    lower_bound = " at least" if resumed or untimed else ""
    fast, slow = f"{minutes[0]:.0f}", f"{minutes[-1]:.0f}"
    span = fast if fast == slow else f"{fast} to {slow}"
    parts = [f"**Compute.** {len(records)} runs" + (f" ({tuning} of them tuning)" if tuning
                                                     else ""),
             f"{sum(core_seconds) / 3600:.1f} core-hours{lower_bound}",
             f"{span} min per run ({thread_text})",
             "on " + ", ".join(f"{name} ({n})" if len(machines) > 1 else name
                               for name, n in sorted(machines.items()))]
    notes = []
    if resumed:
        notes.append(f"{resumed} resumed from a checkpoint recorded only the last part")
    if untimed:
        notes.append(f"{untimed} without a wall time")
    line = ", ".join(parts) + (f" ({'; '.join(notes)})" if notes else "") + "."
    if missing:
        median = core_seconds[len(core_seconds) // 2]
        line += (f" The {missing} runs not yet recorded need about "
                 f"{missing * median / 3600:.1f} core-hours more at the median run so far.")
    return line


def study_block(spec: StudySpec, results: Path, conf: Path, figures: Path, base: Path,
                draw: bool = True) -> tuple[str, dict[str, Any]]:
    """The README block of one study: table, missing cells, comparisons, figure link (relative
    to `base`, the README's folder); the figure is drawn when `draw`."""
    everything = all_records(results, spec.name)
    records = serving(everything, "study")
    tuning = tuning_table(everything, spec.name)
    grid, at_edge = tuning if tuning is not None else (None, set())
    grid_lines = [] if grid is None else [
        "Learning rates: the tuning grid's validation metric at each rate (seed 0; the study "
        f"runs each encoding at its chosen rate, `conf/tuned/{spec.name}/`):", "", "```", grid,
        "```", ""]
    if not records:
        if draw:  # a figure of records since removed would mislead
            (figures / f"{spec.name}.png").unlink(missing_ok=True)
        return "\n".join([f"No study records in `results/{spec.name}/` yet: run "
                          f"`{study_command(spec.name)}`.", "", *grid_lines]), {}
    table, numbers = study_table(spec, records)
    seeds = sorted({len([r for r in records if _row_key(spec, r) == _row_key(spec, x)])
                    for x in records})
    count = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]}"
    spread = ("One seed per row: its values, with no interval. " if seeds == [1] else
              "Mean ± half-width of the 95% interval over the seeds of each row "
              f"({count}; Student's t; a row of one seed shows its value alone). ")
    lines = [f"**{spec.title}.** {spread}{len(records)} records in `results/{spec.name}/`."
             + (f" {spec.note}" if spec.note else ""), "", table, ""]
    rescore = RESCORES.get(spec.name)
    if rescore is None:
        missing = missing_cells(records, expected_cells(spec.name, conf))
        why = ("the sweep's runs: not run, deferred or failed; "
               f"`studies/{spec.name}/<run>/train.log` says which")
    else:  # one run per study record of the source study, named alike
        have = {r.path.name for r in records}
        missing = [r.path.stem for r in planned(rescore, results) if r.path.name not in have]
        why = (f"the {rescore.source} runs it rescores: `{study_command(spec.name)}` "
               "rescores them or says why it cannot")
    if missing:
        lines += [f"Not yet recorded ({len(missing)} of {why}): "
                  + ", ".join(f"`{m}`" for m in missing), ""]
    lines += grid_lines
    compute = compute_line(everything, len(missing))
    if compute:
        lines += [compute, ""]
    others = {c.b_study: serving(all_records(results, c.b_study), "study")
              for c in spec.claims if c.b_study}
    comp, verdicts = comparisons(spec, records, others)
    if spec.claims:
        lines += ["Paired by seed (A - B per seed; the verdict rule is in the text above):", "",
                  comp, ""]
    figure = draw_figure(spec, records, numbers, figures, draw)
    if figure is not None:
        link = Path(os.path.relpath(figure, base)).as_posix()
        lines += [f"![{spec.name}]({link})", ""]
    return "\n".join(lines), {"numbers": numbers, "verdicts": verdicts, "records": records,
                              "at_edge": at_edge}


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def data_hash(numbers: Any) -> str:
    return hashlib.sha256(json.dumps(numbers, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def draw_figure(spec: StudySpec, records: Sequence[Record], numbers: dict[str, Any],
                folder: Path, draw: bool = True) -> Path | None:
    """`results/figures/<study>.png` (perplexity against length, or accuracy against hidden
    size), tagged with the hash of the numbers it shows; drawn only when `draw`."""
    path = folder / f"{spec.name}.png"
    if not draw or not numbers:
        return path if numbers else None
    from evaluation.plots import plot_accuracy_vs_hidden, plot_ppl_vs_length  # lazy: matplotlib

    tag = {"Description": f"bipe-report {data_hash(numbers)}"}
    if spec.percent:
        panels: dict[str, dict[str, list[tuple[int, Spread]]]] = {}
        for label, cols in numbers.items():
            pe, hidden = label.split(",")[:2]
            for setting, v in cols.items():
                if v is not None:
                    panels.setdefault(setting, {}).setdefault(pe, []).append(
                        (int(hidden), _spread(v)))
        plot_accuracy_vs_hidden(panels, path, title=spec.title, metadata=tag)
    else:
        block = training_length(records[0])
        curves = {label.split(",")[0]: [(int(float(h.removesuffix("x")) * (block or 1)),
                                         _spread(v)) for h, v in cols.items() if v is not None]
                  for label, cols in numbers.items()}
        plot_ppl_vs_length(curves, block, path, title=spec.title, metadata=tag)
    return path


def training_length(record: Record) -> int | None:
    """The length a record's 1x stands for: from its report rows (length over multiple), else
    its definition's block size; None when neither says."""
    for row in record.data.get("results", []):
        if row.get("length") and row.get("multiple"):
            return round(row["length"] / row["multiple"])
    return int(record.data.get("definition", {}).get("data.block_size", 0)) or None


def _spread(v: Sequence[float]) -> Spread:
    mean, ci95, n = v
    return Spread(mean, math.nan, ci95, int(n), mean, mean)


def figure_hash(path: Path) -> str | None:
    """The data hash a figure was drawn with (None for a missing or untagged PNG)."""
    if not path.is_file():
        return None
    from PIL import Image  # lazy: only --check reads figures

    with Image.open(path) as image:
        text = image.info.get("Description", "")
    return text.removeprefix("bipe-report ") if text.startswith("bipe-report ") else None


# ---------------------------------------------------------------------------------------------
# The paper's claims
# ---------------------------------------------------------------------------------------------

PAPER_ROWS = (
    ("Arithmetic capacity, hidden 48: BiPE-ALiBi beats ALiBi", "97% vs below 70%",
     "arithmetic_sweep", 2),
    ("Arithmetic capacity, hidden 48: BiPE-RoPE beats RoPE", "95% vs below 70%",
     "arithmetic_sweep", 3),
    ("Bi-NFA capacity, hidden 16: BiPE-ALiBi beats ALiBi", "smaller hidden size suffices "
     "(theory)", "bi_nfa_sweep", 0),
    ("Bi-NFA capacity, hidden 16: BiPE-RoPE beats RoPE", "smaller hidden size suffices "
     "(theory)", "bi_nfa_sweep", 1),
    ("Text past the training length: BiPE-ALiBi beats ALiBi (level)",
     "PG-19 ppl at 8x: 25.24 vs 28.59", "text_sweep", 0),
    ("Text past the training length: BiPE-RoPE beats RoPE (level)",
     "PG-19 ppl at 4x: 19.67 vs 158", "text_sweep", 2),
    ("YaRN fine-tuning: BiPE-RoPE + YaRN beats RoPE + YaRN past the fine-tuning length "
     "(level)", "flat to 20k vs degrading at 11k-16k", "text_yarn", 0),
    ("LM-Infinite keeps RoPE fluent past the training length (ppl at 16x, with vs without)",
     "fluent to 32k+ (LM-Infinite paper)", "text_lm_infinite", 0),
    ("LM-Infinite keeps BiPE-RoPE fluent past the training length (ppl at 16x, with vs "
     "without)", "fluent to 32k+ (LM-Infinite paper)", "text_lm_infinite", 2),
)
NOT_STUDIED = (
    ("SCROLLS: BiPE-RoPE beats RoPE after fine-tuning", "average 22.36 vs 18.38",
     "not runnable offline: needs the SCROLLS data from the Hugging Face hub"),
)


def paper_block(done: dict[str, dict[str, Any]]) -> str:
    """One row per claim: the paper's figure, ours, the verdict, the evidence where it differs."""
    rows = []
    for claim, paper, study, index in PAPER_ROWS:
        info = done.get(study, {}).get("verdicts")
        if not info or info[index]["verdict"] == "no records":
            rows.append([claim, paper, f"no records of both in results/{study}/ yet", "not run",
                         ""])
            continue
        v = info[index]
        pair, c = v["pair"], v["claim"]
        percent = STUDIES[study].percent
        ours = (f"{fmt(pair.a, percent)} vs {fmt(pair.b, percent)}; A - B "
                f"{fmt(pair.diff, percent, signed=True)} ({len(pair.seeds)} seeds)")
        evidence = ""
        if v["verdict"] != "reproduced":
            need = v["seeds_needed_text"]
            evidence = (f"the interval contains zero; {need} would resolve a difference of this "
                        "size" if need else "see the study's table")
            growth = next((g for g in info if g["claim"].a == c.a and g["claim"].b == c.b
                           and g["claim"].metric.startswith("growth_")), None)
            if growth is not None and growth["pair"].diff is not None:
                evidence += (f"; growth {growth['claim'].metric.removeprefix('growth_')}/1x: "
                             f"{growth['verdict']} ({fmt(growth['pair'].diff, False, True)})")
        edge = sorted({c.a, c.b} & done[study].get("at_edge", set()))
        if edge:
            evidence += ("; " if evidence else "") + (
                f"tuned rate of {' and '.join(edge)} at the edge of its grid: widen the grid "
                "before citing")
        rows.append([claim, paper, ours, v["verdict"], evidence])
    for claim, paper, why in NOT_STUDIED:
        rows.append([claim, paper, "-", "not run", why])
    return markdown(["claim", "paper", "this project (mean ± 95% interval)", "verdict",
                     "evidence"], rows, left=5) + "\n"


# ---------------------------------------------------------------------------------------------
# The README
# ---------------------------------------------------------------------------------------------

def blocks(results: Path, conf: Path, figures: Path, base: Path, draw: bool = True
           ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Every generated block's text by marker name, and each study's numbers and verdicts."""
    out, done = {}, {}
    for name, spec in STUDIES.items():
        out[name], done[name] = study_block(spec, results, conf, figures, base, draw)
    out["paper"] = paper_block(done)
    return out, done


def render(readme: str, generated: dict[str, str]) -> str:
    """`readme` with each marked block replaced; DataError for a marker with no generator."""
    def replace(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in generated:
            raise DataError(f"README.md has a block <!-- report:{name} --> that nothing "
                            f"generates; known blocks: {', '.join(generated)}")
        return f"<!-- report:{name} -->\n{generated[name]}<!-- /report:{name} -->"
    return MARK.sub(replace, readme)


def check(readme_path: Path, results: Path, conf: Path, figures: Path) -> list[str]:
    """The differences between the README (and its figures) and what the records give; the
    figures are compared by the hash of the numbers they were drawn from, not redrawn."""
    current = readme_path.read_text()
    generated, done = blocks(results, conf, figures, readme_path.parent, draw=False)
    problems = [f"README.md has no block <!-- report:{n} -->" for n in generated
                if f"<!-- report:{n} -->" not in current]
    for name, info in done.items():
        if info.get("numbers"):
            want, have = data_hash(info["numbers"]), figure_hash(figures / f"{name}.png")
            if have != want:
                problems.append(f"{figures / name}.png was not drawn from the current records "
                                f"(its hash {have}, the records' {want})")
    expected = render(current, generated)
    if expected != current:
        diff = difflib.unified_diff(current.splitlines(), expected.splitlines(),
                                    "README.md", "README.md (from results/)", lineterm="", n=1)
        problems.append("\n".join(diff))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 with a diff when the README disagrees")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    conf, figures = ROOT / "conf", args.results / "figures"
    if not args.readme.is_file():
        print(f"error: --readme {args.readme} does not exist; name the README.md whose "
              "<!-- report:... --> blocks to fill", file=sys.stderr)
        return 2
    try:
        if args.check:
            problems = check(args.readme, args.results, conf, figures)
            for p in problems:
                print(p)
            if problems:
                print("error: README.md disagrees with results/; run python -m evaluation.report",
                      file=sys.stderr)
                return 1
            print(f"{args.readme} agrees with {args.results}")
            return 0
        generated, _ = blocks(args.results, conf, figures, args.readme.parent)
        text = render(args.readme.read_text(), generated)
        atomic_write_text(args.readme, text)
        print(f"wrote {args.readme} and the figures in {figures}")
    except BipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
