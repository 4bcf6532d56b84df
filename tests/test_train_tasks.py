"""Synthetic tasks through train.py: configs, per-setting validation and test metrics, sweeps."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from bipe.errors import ConfigError
from models import Transformer
from tests.conftest import ROOT, compose_train
from tests.helpers import synthetic_dm
from training.task_module import TaskScores, evaluate_task, format_task_table

TINY = ["logger=none", "model.n_layers=1", "model.hidden_size=16", "model.n_heads=2",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false", "optim.warmup_steps=1", "task.n_val=8",
        "task.batch_size=8", "task.eval_batch_size=4"]
ARITHMETIC = ["task=arithmetic", "task.operators=2", "task.test_offsets=[1]"]
BI_NFA = ["task=bi_nfa", "task.segments=[1,3]", "task.test_multipliers=[1,2]"]


def run(tmp_path, *overrides):
    from train import train

    cfg = compose_train([*TINY, *overrides], tmp_path)
    return train(cfg), tmp_path


def test_a_task_selects_its_data_and_model_and_the_command_line_still_wins():
    cfg = compose_train(["task=arithmetic"])
    assert (cfg.data.name, cfg.task.name, cfg.model.hidden_size) == ("arithmetic", "arithmetic", 64)
    cfg = compose_train(["experiment=bi_nfa_sweep", "model=tiny"])
    assert (cfg.data.name, cfg.model.hidden_size) == ("bi_nfa", 128)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["task=arithmetic", "data=shakespeare"], "drop the data= override"),
    (["task=arithmetic", "+task.operator=3"], "task.operator"),
    (["task=bi_nfa", "task.segments=[4,2]"], "task.segments"),
    (["task=lm", "data=synthetic"], "data=synthetic only serves"),
])
def test_bad_task_configs_name_the_key(overrides, needle, tmp_path):
    from training.config import validate_config

    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("+", r"\+")):
        validate_config(compose_train(overrides, tmp_path))


def test_a_token_table_too_short_for_the_test_sequences_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.block_size>="):
        run(tmp_path, *ARITHMETIC, "pe=learned", "data.block_size=8")


@pytest.mark.parametrize(("task", "metric"), [(ARITHMETIC, "accuracy"),
                                              (BI_NFA, "sequence_accuracy")])
def test_a_task_run_validates_per_setting_and_reports_what_its_checkpoint_scores(
        task, metric, tmp_path):
    metrics, run_dir = run(tmp_path, *task, "pe=bipe_rope")
    report = json.loads((run_dir / "task_eval.json").read_text())
    names = ["ops_2", "ops_3"] if task is ARITHMETIC else ["seg_3", "seg_6"]
    assert [r["setting"] for r in report["results"]] == names
    assert report["global_step"] == 4 and report["pe"] == "bipe_rope"
    for row in report["results"]:
        assert metrics[f"test/{row['setting']}/{metric}"] == row[metric]
        assert 0.0 <= row[metric] <= 1.0
    assert "val/loss" in metrics  # the in-distribution setting's validation loss

    # The reported numbers are those of the saved final weights on the test sets.
    model = Transformer.from_pretrained(run_dir / "checkpoints" / "last.ckpt")
    tokenizer, meta = model.tokenizer, model.meta
    assert meta["data_stats"]["max_segments_per_block"] >= 2
    dm = synthetic_dm(report["task_config"], seed=0)
    assert tokenizer.to_str() == dm.tokenizer.to_str()
    again = evaluate_task(model, dm.test_dataloader(), dm.val_names, dm.score)
    assert [r[metric] for r in again] == [r[metric] for r in report["results"]]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in report["results"]],
                                                       rel=1e-5)
    assert all(r.get("count", r.get("sequences")) == 8 for r in again)  # task.n_val each


def test_task_scores_add_over_batches_like_one_batch():
    """Sums over batches of different sizes give the rate of the whole set, per setting."""
    scores = TaskScores(["a", "b"])
    scores.add(0, 6.0, 3, {"correct": 1.0, "count": 2.0, "accuracy": 0.5})
    scores.add(0, 2.0, 1, {"correct": 2.0, "count": 2.0, "accuracy": 1.0})
    scores.add(1, 1.0, 2, {"correct": 0.0, "count": 1.0, "accuracy": 0.0})
    summary = scores.summary()
    assert summary["a"]["accuracy"] == 0.75  # 3 of 4, not the mean of 0.5 and 1.0
    assert summary["a"]["loss"] == 2.0 and summary["b"]["loss"] == 0.5
    scores.reduce(lambda t: 2 * t)  # e.g. two processes with equal sums
    assert scores.summary()["a"]["count"] == 8.0 and scores.summary()["a"]["accuracy"] == 0.75
    table = format_task_table([{"setting": n, **v} for n, v in summary.items()], "t")
    assert "75.0%" in table and "0.0%" in table


@pytest.mark.slow
def test_a_two_job_sweep_and_its_summary(tmp_path):
    """Two jobs in parallel (Hydra's joblib launcher), then the summary command."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "HF_DATASETS_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "experiment=arithmetic_sweep",
         "pe=rope,bipe_rope", "model.hidden_size=16", "seed=0",
         *TINY[:1], *TINY[2:], *ARITHMETIC[1:],
         f"hydra.sweep.dir={sweep}", f"study.results_dir={tmp_path / 'results'}",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(sweep.glob("*/task_eval.json"))
    assert len(reports) == 2
    # Each run of the study left its record, in the results folder it was given.
    records = sorted((tmp_path / "results" / "arithmetic_sweep").glob("*.json"))
    assert [p.name.split(",")[0] for p in records] == ["pe=bipe_rope", "pe=rope"]

    summary = subprocess.run(
        [sys.executable, "-m", "evaluation.task_summary", str(sweep)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "| rope " in summary.stdout and "| bipe_rope " in summary.stdout
    for name in ("summary.csv", "summary.md", "accuracy_vs_hidden.png"):
        assert (sweep / name).stat().st_size > 0
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # 2 encodings x (ops_2, ops_3)
    for report in map(json.loads, (p.read_text() for p in reports)):
        for r in report["results"]:
            row = next(x for x in rows if x["pe"] == report["pe"] and x["setting"] == r["setting"])
            assert float(row["mean"]) == pytest.approx(r["accuracy"])
    # The summary is a W&B run in the sweep's group, offline here.
    assert list(sweep.glob("wandb/offline-run-*"))


def test_the_summary_command_names_a_folder_without_results(tmp_path):
    result = subprocess.run([sys.executable, "-m", "evaluation.task_summary", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no task_eval.json under")


def _write_job(root, name, *, pe="rope", hidden=32, seed=0, acc=0.5, overrides=None):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    overrides = overrides if overrides is not None else [f"pe={pe}",
                                                         f"model.hidden_size={hidden}",
                                                         f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "task_eval.json").write_text(json.dumps({
        "task": "arithmetic", "pe": pe, "model": {"hidden_size": hidden}, "seed": seed,
        "n_parameters": 1000, "results": [{"setting": "ops_4", "accuracy": acc},
                                          {"setting": "ops_5", "accuracy": acc / 2}]}))


def test_the_summary_groups_seeds_with_their_mean_and_interval(tmp_path):
    """Jobs that differ only in their seed form one cell: mean, sample std, Student's t 95%
    interval and the number of seeds, in the CSV and in the printed table."""
    from evaluation.task_summary import format_summary, load_jobs, summarise

    for seed, acc in ((0, 0.9), (1, 1.0), (2, 0.8)):
        _write_job(tmp_path, f"{seed}_rope_s{seed}", seed=seed, acc=acc)
    _write_job(tmp_path, "9_alibi", pe="alibi", seed=0, acc=0.25)
    rows = summarise(load_jobs(tmp_path), "accuracy")
    rope = next(r for r in rows if r["pe"] == "rope" and r["setting"] == "ops_4")
    assert rope["mean"] == pytest.approx(0.9) and rope["std"] == pytest.approx(0.1)
    assert rope["ci95"] == pytest.approx(4.3027 * 0.1 / 3 ** 0.5, rel=1e-4)
    assert (rope["seeds"], rope["min"], rope["max"]) == (3, 0.8, 1.0)
    alibi = next(r for r in rows if r["pe"] == "alibi" and r["setting"] == "ops_4")
    assert alibi["seeds"] == 1 and math.isnan(alibi["ci95"])
    lines = format_summary(rows, "t").splitlines()
    table = lines[2:]  # header, rule, rows: one width
    assert len({len(line) for line in table}) == 1 and set(table[1]) == {"|", "-"}
    assert "seeds" in table[0]  # the cells have different seed counts
    assert "90.0 ± 24.8%" in next(line for line in table if "| rope" in line)
    assert "25.0%" in next(line for line in table if "| alibi" in line)


def test_other_swept_settings_stay_apart_and_a_repeated_seed_is_refused(tmp_path):
    from bipe.errors import DataError
    from evaluation.task_summary import format_summary, load_jobs, summarise

    for n, lr in enumerate(("0.01", "0.02")):
        _write_job(tmp_path, f"{n}_lr", acc=0.5 + n / 4,
                   overrides=["pe=rope", "model.hidden_size=32", f"optim.lr={lr}", "seed=0"])
    rows = summarise(load_jobs(tmp_path), "accuracy")
    assert sorted(r["variant"] for r in rows if r["setting"] == "ops_4") == ["lr=0.01", "lr=0.02"]
    assert "| variant" in format_summary(rows, "t").splitlines()[2]
    _write_job(tmp_path, "2_again", acc=0.1,
               overrides=["pe=rope", "model.hidden_size=32", "optim.lr=0.01", "seed=0"])
    with pytest.raises(DataError, match="same seed 0"):
        summarise(load_jobs(tmp_path), "accuracy")


def test_summary_files_are_named_by_metric(tmp_path):
    from evaluation.task_summary import load_jobs, summarise

    for seed, acc in ((0, 0.5), (1, 1.0)):
        _write_job(tmp_path, f"{seed}_seed={seed}", seed=seed, acc=acc)
    rows = summarise(load_jobs(tmp_path), "accuracy")
    from evaluation.task_summary import write_outputs

    files = write_outputs(rows, tmp_path, "arithmetic", "accuracy")
    other = write_outputs(summarise(load_jobs(tmp_path), "accuracy"), tmp_path, "arithmetic",
                          "exact_of_chain")  # another metric never overwrites the headline one
    assert {p.name for p in files.values()} == {"summary.csv", "summary.md",
                                                "accuracy_vs_hidden.png"}
    assert {p.name for p in other.values()} == {"summary_exact_of_chain.csv",
                                                "summary_exact_of_chain.md",
                                                "accuracy_vs_hidden_exact_of_chain.png"}


def test_the_summary_names_a_job_that_failed(tmp_path, capsys):
    from evaluation.task_summary import load_jobs

    _write_job(tmp_path, "0_rope", acc=0.9)
    _write_job(tmp_path, "1_alibi", pe="alibi", acc=0.5)
    (tmp_path / "1_alibi" / "task_eval.json").unlink()  # it failed before its test
    assert len(load_jobs(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"unfinished: {tmp_path / '1_alibi'} has no task_eval.json" in err
