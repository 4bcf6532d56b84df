"""A run of a study: skipped when its record exists, resumed from its folder's checkpoint, held
back past the invocation's limits, and recorded when it finishes (`evaluation.records`).

An experiment becomes a study by naming it (`study.name`) and the keys that make a cell
(`study.cell`); `conf/experiment/*_sweep.yaml` do. Each run of the study then lives in a folder
of its own that does not depend on when the sweep started, `studies/<study>/<cell>,seed=<k>/`
(the `bipe.study_run` resolver names it), so running the study's command again finds it:

* a run whose record `results/<study>/<cell>,seed=<k>.json` exists with the same definition
  (`evaluation.records.fingerprint`) is skipped, and its recorded metrics are returned;
* a run whose folder holds a checkpoint of the same definition resumes from it (exactly, as
  `ckpt_path=` does); a checkpoint of another definition is moved aside, not resumed;
* `study.max_runs` / `study.max_minutes` bound one invocation of the command (one `-m` sweep,
  whatever the launcher): runs past the limit are deferred, and the next invocation picks them
  up. A study run in slices therefore ends with the same records as one uninterrupted sweep.

The invocation is the `train.py` process that launched the jobs: it sets `BIPE_INVOCATION`
(its start time and process id), which launched jobs inherit (joblib's workers, Slurm jobs
through submitit); the runs it started are counted in `studies/<study>/.invocations/`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig

from bipe.config import build
from bipe.errors import BipeError, ConfigError, DataError
from evaluation.records import (
    NOT_RECORDED,
    RECORD_VERSION,
    cell_values,
    definition,
    fingerprint,
    git_commit,
    machine,
    read_record,
    record_name,
    study_fingerprint,
    write_record,
)

log = logging.getLogger(__name__)

INVOCATION_ENV = "BIPE_INVOCATION"
STAGES = ("study", "tuning")
CODE_ROOT = Path(__file__).resolve().parents[1]  # the commit recorded is that of the code run


@dataclass
class StudyConfig:
    """`study.*`: what makes an experiment a study (this module's docstring). Never part of a
    run's definition: limits and stages do not change what a run computes."""

    name: str | None = None  # results/<name>/; null: not a study (no record, no skipping)
    cell: list[str] = field(default_factory=lambda: ["pe"])  # keys naming a cell (seed aside)
    stage: str = "study"  # study | tuning (hparams_search configs set it): whom the run serves
    results_dir: str = "${paths.root}/results"
    max_runs: int | None = None  # start at most this many runs in one invocation
    max_minutes: float | None = None  # start no run this long after the invocation began

    def __post_init__(self) -> None:
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"study.name={self.name!r} must be a plain folder name "
                              "(results/<name>/), or null")
        if not self.cell:
            raise ConfigError("study.cell must name at least one key (e.g. [pe])")
        if self.stage not in STAGES:
            raise ConfigError(f"study.stage={self.stage!r} must be one of {', '.join(STAGES)}")
        if self.max_runs is not None and self.max_runs < 0:
            raise ConfigError(f"study.max_runs={self.max_runs} must be >= 0 or null")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ConfigError(f"study.max_minutes={self.max_minutes} must be >= 0 or null")


def check_sweep_mode() -> None:
    """ConfigError for a tuning grid (`hparams_search=...`) run without `-m`: Hydra would run one
    job at the default rate and call it done."""
    from hydra.core.hydra_config import HydraConfig  # lazy: only under a Hydra entry point
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    choice = hydra.runtime.choices.get("hparams_search")
    if choice and hydra.mode == RunMode.RUN:
        raise ConfigError(f"hparams_search={choice} is a sweep over a grid: run it with -m "
                          f"(python train.py -m ... hparams_search={choice})")


def mark_invocation() -> None:
    """Call in the process that composes the sweep: the jobs it launches inherit the mark."""
    os.environ.setdefault(INVOCATION_ENV, f"{time.time():.3f}-{os.getpid()}")


def run_folder_name(*, _root_: DictConfig) -> str:
    """The `bipe.study_run` resolver: `<cell>,seed=<k>` of the composed config."""
    cell = cell_values(_root_, list(_root_.study.cell))
    return record_name(cell, int(_root_.seed))


@dataclass
class StudyRun:
    """One run of a study, planned before any work (see `plan`)."""

    name: str
    cell: dict[str, Any]
    seed: int
    stage: str
    definition: dict[str, Any]
    fingerprint: str
    record_path: Path
    output_dir: Path
    settings: StudyConfig
    started: float = field(default_factory=time.time)
    resumed_from_step: int | None = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.record_path.stem}"

    def recorded_metrics(self) -> dict[str, Any] | None:
        """The metrics of this run's record when it exists with this definition, else None
        (a record of another definition is logged and will be replaced)."""
        if not self.record_path.is_file():
            return None
        try:
            record = read_record(self.record_path)
        except DataError as exc:
            log.warning("%s; the run replaces it", exc)
            return None
        if record.data["fingerprint"] != self.fingerprint:
            log.warning("%s was made under another study definition (%s); this run replaces it",
                        self.record_path, describe_change(record.data.get("definition", {}),
                                                          self.definition))
            return None
        stages = record.data.get("stages", ["study"])
        if self.stage not in stages:  # the same run serves the tuning grid and the study
            write_record(self.record_path, {**record.data, "stages": [*stages, self.stage]})
        return record.metrics

    def claim(self) -> bool:
        """Whether this invocation's limits let the run start; counts it if so."""
        limits = self.settings
        if limits.max_runs is None and limits.max_minutes is None:
            return True
        mark = os.environ.get(INVOCATION_ENV)
        if mark is None:  # launched by hand, not through train.py: count from now
            mark = f"{self.started:.3f}-{os.getpid()}"
        started = float(mark.split("-", 1)[0])
        if limits.max_minutes is not None and time.time() - started > 60 * limits.max_minutes:
            log.info("%s deferred: study.max_minutes=%g have passed since this invocation "
                     "started; run the command again to continue", self.label,
                     limits.max_minutes)
            return False
        if limits.max_runs is None:
            return True
        folder = self.output_dir.parent / ".invocations" / mark
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            claimed = {p.name for p in folder.iterdir()}
            if self.record_path.stem not in claimed and len(claimed) >= limits.max_runs:
                log.info("%s deferred: study.max_runs=%d runs started in this invocation; run "
                         "the command again to continue", self.label, limits.max_runs)
                return False
            (folder / self.record_path.stem).touch()
        return True

    def resume_point(self) -> str | None:
        """The run folder, when it holds a checkpoint of this definition to resume from; a
        checkpoint of another definition is moved aside (`checkpoints.<its fingerprint>`)."""
        folder = self.output_dir / "checkpoints"
        if not any((folder / n).is_file() for n in ("last.ckpt", "interrupted.ckpt")):
            return None
        from models.checkpoint import CHECKPOINT_KEY, load_checkpoint  # lazy: imports torch

        try:
            ckpt = load_checkpoint(self.output_dir, key="ckpt_path")
        except BipeError as exc:
            old = f"unreadable ({exc})"
        else:
            meta = ckpt[CHECKPOINT_KEY]
            old = fingerprint(definition(meta.get("run_config", {})))
            if old == self.fingerprint:
                self.resumed_from_step = int(ckpt.get("global_step", 0))
                return str(self.output_dir)
        aside = folder.with_name(f"checkpoints.{old[:16] if len(old) == 16 else 'unreadable'}")
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
        log.warning("%s: the checkpoint in %s is of another definition (%s); moved it to %s and "
                    "starting afresh", self.label, folder, old, aside)
        return None

    def write(self) -> Path:
        """The record of the finished run, from what it wrote into its folder: `metrics.json`
        (final metrics and step) and the report's rows (`length_eval.json` / `task_eval.json`)."""
        final = json.loads((self.output_dir / "metrics.json").read_text())
        results = []
        for name in ("length_eval.json", "task_eval.json"):
            path = self.output_dir / name
            if path.is_file():
                rows = json.loads(path.read_text()).get("results", [])
                results = [{k: v for k, v in r.items() if k not in NOT_RECORDED} for r in rows]
                break
        commit, dirty = git_commit(CODE_ROOT)
        data = {
            "version": RECORD_VERSION, "study": self.name, "cell": self.cell, "seed": self.seed,
            "stages": [self.stage], "fingerprint": self.fingerprint,
            "study_fingerprint": study_fingerprint(self.definition, self.cell),
            "commit": commit, "dirty": dirty,
            "metrics": {k: v for k, v in final["metrics"].items() if v is not None},
            "results": results, "steps": final["global_step"],
            "wall_seconds": round(time.time() - self.started, 1),
            "resumed_from_step": self.resumed_from_step, "machine": machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "definition": self.definition,
        }
        path = write_record(self.record_path, data)
        log.info("record written: %s", path)
        return path


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """The first keys whose values differ between two definitions, as `key: old -> new`."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not keys:
        return "no recorded setting differs"
    text = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def plan(run: Mapping[str, Any]) -> StudyRun | None:
    """The study run the resolved config `run` describes, or None outside a study."""
    settings = build(StudyConfig, run["study"] or {}, "study")
    if settings.name is None:
        return None
    cell = cell_values(run, settings.cell)
    defn = definition(run)
    name = record_name(cell, int(run["seed"]))
    return StudyRun(name=settings.name, cell=cell, seed=int(run["seed"]), stage=settings.stage,
                    definition=defn, fingerprint=fingerprint(defn),
                    record_path=Path(settings.results_dir) / settings.name / f"{name}.json",
                    output_dir=Path(run["paths"]["output_dir"]), settings=settings)
