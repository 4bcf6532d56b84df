"""Studies as data (training/study.py, evaluation/records.py): a study run in slices ends with the
same records as one uninterrupted sweep; a record of another definition is not reused; what
defines a run and what does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.records import definition, fingerprint, read_record, record_name, study_fingerprint
from tests.conftest import ROOT, compose_train, smoke_overrides
from training.config import plain
from training.study import plan

# What differs between two runs of the same cell on purpose: when and where, and how fast.
VOLATILE = {"wall_seconds", "finished", "machine", "commit", "dirty", "resumed_from_step"}


def study_command(corpus: str, cache_dir: str, root: Path, *extra: str) -> list[str]:
    """A two-cell study of seconds-long runs (rope and alibi at seed 0), its folders under root."""
    return [sys.executable, str(ROOT / "train.py"), "-m", "pe=rope,alibi", "seed=0",
            *smoke_overrides(corpus, cache_dir), "hydra=study", "study.name=tiny",
            "study.cell=[pe,optim.lr]", f"paths.root={root}", "extras.print_config=false",
            *extra]


def run(command: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("BIPE_INVOCATION", None)
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stable(folder: Path) -> dict[str, dict]:
    """Each record of a folder without its volatile fields (and throughput, a timing)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        data = {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}
        data["metrics"].pop("train/tokens_per_sec", None)
        out[path.name] = data
    return out


@pytest.mark.slow
def test_a_study_run_in_slices_ends_with_the_records_of_one_sweep(corpus, cache_dir, tmp_path):
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    whole.mkdir(), sliced.mkdir()
    run(study_command(corpus, cache_dir, whole), whole)

    first = run(study_command(corpus, cache_dir, sliced, "study.max_runs=1",
                              "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), sliced)
    assert "deferred: study.max_runs=1" in first.stderr + first.stdout
    assert len(list((sliced / "results" / "tiny").glob("*.json"))) == 1
    second = run(study_command(corpus, cache_dir, sliced), sliced)
    assert "skipped" in second.stdout  # the recorded cell is not trained again

    names = ["pe=alibi,lr=0.003,seed=0.json", "pe=rope,lr=0.003,seed=0.json"]
    assert sorted(stable(whole / "results" / "tiny")) == names
    assert stable(sliced / "results" / "tiny") == stable(whole / "results" / "tiny")
    record = read_record(whole / "results" / "tiny" / names[1])
    assert record.cell == {"pe": "rope", "optim.lr": 0.003} and record.data["steps"] == 6
    assert set(record.metrics) >= {"eval/ppl_1x", "eval/ppl_2x", "val/loss"}
    assert record.data["machine"]["cpu"] and record.data["commit"]


@pytest.mark.slow
def test_the_limit_holds_across_the_jobs_of_the_submitit_launcher(corpus, cache_dir, tmp_path):
    # submitit's local executor runs each job in a process of its own, as Slurm would
    run(study_command(corpus, cache_dir, tmp_path, "study.max_runs=1",
                      "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"), tmp_path)
    assert len(list((tmp_path / "results" / "tiny").glob("*.json"))) == 1
    run(study_command(corpus, cache_dir, tmp_path, "hydra/launcher=submitit_local"), tmp_path)
    assert len(list((tmp_path / "results" / "tiny").glob("*.json"))) == 2


def compose(corpus: str, cache_dir: str, tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_train([*smoke_overrides(corpus, cache_dir), "study.name=tiny",
                         f"study.results_dir={tmp_path / 'results'}", *overrides],
                        tmp_path / "run")
    return plain(cfg)


def test_what_defines_a_run(corpus, cache_dir, tmp_path):
    base = compose(corpus, cache_dir, tmp_path)
    same = [compose(corpus, cache_dir, tmp_path, o) for o in
            ("logger=csv", "paths.cache_dir=/elsewhere", "study.max_runs=3",
             "optimized_metric=val/loss", "extras.print_config=false")]
    other = [compose(corpus, cache_dir, tmp_path, o) for o in
             ("trainer.max_steps=7", "optim.lr=0.01", "seed=1", "pe=alibi", "eval.lengths=[1]")]
    fp = fingerprint(definition(base))
    assert all(fingerprint(definition(r)) == fp for r in same)
    assert len({fp, *(fingerprint(definition(r)) for r in other)}) == 1 + len(other)
    # a new optional setting left at null keeps old records valid
    assert fingerprint(definition({**base, "new_option": None})) == fp
    # what the cells share: the seed and the cell's keys (a whole group for pe) left out
    alibi = compose(corpus, cache_dir, tmp_path, "pe=alibi", "seed=1")
    assert study_fingerprint(definition(alibi), ["pe"]) == study_fingerprint(definition(base),
                                                                             ["pe"])


def test_a_record_of_another_definition_is_not_reused(corpus, cache_dir, tmp_path, caplog):
    study = plan(compose(corpus, cache_dir, tmp_path))
    assert study.record_path == tmp_path / "results" / "tiny" / "pe=bipe_rope,seed=0.json"
    assert study.recorded_metrics() is None  # nothing recorded yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(
        {"global_step": 6, "seed": 0, "metrics": {"val/loss": 1.5}}))
    study.write()
    assert plan(compose(corpus, cache_dir, tmp_path)).recorded_metrics() == {"val/loss": 1.5}

    longer = plan(compose(corpus, cache_dir, tmp_path, "trainer.max_steps=7"))
    assert longer.record_path == study.record_path  # the same cell and seed...
    assert longer.recorded_metrics() is None  # ...but not the same run: it runs again
    assert "trainer.max_steps: 6 -> 7" in caplog.text


def test_a_tuning_run_that_serves_the_study_is_marked_for_both(corpus, cache_dir, tmp_path):
    tuning = plan(compose(corpus, cache_dir, tmp_path, "study.stage=tuning"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(
        {"global_step": 6, "seed": 0, "metrics": {"val/loss": 1.5}}))
    tuning.write()
    assert read_record(tuning.record_path).data["stages"] == ["tuning"]
    assert plan(compose(corpus, cache_dir, tmp_path)).recorded_metrics() is not None
    assert read_record(tuning.record_path).data["stages"] == ["tuning", "study"]


def test_record_names_are_stable_and_safe():
    assert record_name({"pe": "rope", "model.hidden_size": 48, "optim.lr": 0.005}, 2) == \
        "pe=rope,hidden_size=48,lr=0.005,seed=2"
    assert "/" not in record_name({"data.glob": "../x/*.txt"}, 0)


def test_a_tuning_grid_without_multirun_is_refused(tmp_path):
    from tests.test_train_errors import error_lines, train_cli

    result = train_cli("experiment=text_sweep", "hparams_search=text_lr",
                       f"hydra.run.dir={tmp_path / 'run'}", f"paths.root={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == ["error: hparams_search=text_lr is a sweep over a grid: run it "
                                   "with -m (python train.py -m ... hparams_search=text_lr)"]
    assert not (tmp_path / "results").exists()
