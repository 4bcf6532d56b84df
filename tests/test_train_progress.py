"""Progress a run whose stdout is a file can be followed by: `ProgressLog`'s step and validation
lines and the end-of-run length check, in the redirected stdout and in the run's train.log."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bipe.errors import ConfigError
from tests.conftest import ROOT, compose_train, smoke_overrides
from training.progress import ProgressLog, clock, eta_seconds

STEP = re.compile(r"step (\d+)/6 \| train/loss ([\d.]+) \| [\d,]+ tok/s \| elapsed \d+:\d\d:\d\d "
                  r"\| ETA \d+:\d\d:\d\d$")
VALIDATION = re.compile(r"step (\d+)/6 \| validation \| val/loss ([\d.]+) \| elapsed .* \| ETA ")
LENGTH = re.compile(r"length check: len +(\d+) \((\d+)x\)  ppl +([\d.]+)  \(([\d,]+) tokens, "
                    r"[\d.]+s\)$")


def matches(pattern: re.Pattern, text: str) -> list[tuple[str, ...]]:
    return [m.groups() for line in text.splitlines() if (m := pattern.search(line))]


def test_a_run_with_stdout_in_a_file_logs_steps_validations_and_the_length_check(
        corpus, cache_dir, tmp_path):
    """stdout a pipe, as under Slurm or nohup: every line reaches stdout and train.log, and each
    number is the one the run measured (the training loss: the mean of the steps since the last
    line, as the CSV logger has them; val/loss; the length check's perplexities)."""
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *smoke_overrides(corpus, cache_dir),
         "logger=csv", "extras.print_config=false", "callbacks.progress_log.every_n_steps=2",
         f"hydra.run.dir={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # stdout: a pipe
    assert result.returncode == 0, result.stderr
    log_file = (run / "train.log").read_text()
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_loss = {int(r["step"]) + 1: float(r["train/loss"]) for r in rows if r["train/loss"]}
    val_loss = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    lengths = json.loads((run / "length_eval.json").read_text())["results"]
    for text in (result.stdout, log_file):
        steps = matches(STEP, text)
        assert [int(s) for s, _ in steps] == [2, 4, 6]  # every 2 steps, the last one included
        for s, loss in steps:
            mean = (train_loss[int(s) - 1] + train_loss[int(s)]) / 2
            assert float(loss) == pytest.approx(mean, abs=1e-4)
        validations = matches(VALIDATION, text)
        assert [int(s) for s, _ in validations] == [3, 6]  # val_check_interval=3
        assert [float(v) for _, v in validations] == pytest.approx(val_loss[:2], abs=1e-4)
        checked = matches(LENGTH, text)
        assert [(int(n), int(m)) for n, m, _, _ in checked] == [(32, 1), (64, 2)]
        assert [float(p) for _, _, p, _ in checked] == pytest.approx(
            [r["ppl"] for r in lengths], abs=0.01)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def fake_trainer(step: int = 0, max_steps: int = 7, bar: object | None = None) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=max_steps, callbacks=[],
                           is_global_zero=True, progress_bar_callback=bar,
                           sanity_checking=False, callback_metrics={})


def train_steps(callback: ProgressLog, trainer: SimpleNamespace, losses: dict[int, list[float]],
                accumulate: int) -> None:
    """Lightning's calls for steps `losses` (per step, one loss per micro-batch): each
    micro-batch's loss divided by `accumulate`, the step counted after the last one."""
    for step, micro in losses.items():
        for i, loss in enumerate(micro):
            trainer.global_step = step if i == accumulate - 1 else step - 1
            callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss / accumulate)},
                                        None, 0)


def step_fields(lines: list[str]) -> list[tuple[str, str]]:
    """(step, train loss) of each step line: what does not depend on the clock."""
    return [(line.split(" | ")[0], line.split(" | ")[1]) for line in lines]


@pytest.fixture
def recorded() -> Recorder:
    logger = logging.getLogger("training.progress")
    handler, level = Recorder(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_line_every_n_optimizer_steps_with_the_mean_loss_and_the_same_after_a_resume(
        recorded):
    """With gradient accumulation (2 micro-batches per step): one line per N optimizer steps and
    at the last, each with the mean loss of its steps; a run resumed at a line's step writes the
    lines the uninterrupted run wrote after it."""
    losses = {s: [float(s), float(s) + 1.0] for s in range(1, 8)}  # step mean: s + 0.5
    whole = ProgressLog(every_n_steps=3)
    trainer = fake_trainer()
    whole.on_train_start(trainer, None)
    train_steps(whole, trainer, losses, accumulate=2)
    assert step_fields(recorded.lines) == [("step 3/7", "train/loss 2.5000"),  # mean of 1.5..3.5
                                           ("step 6/7", "train/loss 5.5000"),  # 4.5..6.5
                                           ("step 7/7", "train/loss 7.5000")]  # the last step
    uninterrupted, recorded.lines = recorded.lines, []
    resumed = ProgressLog(every_n_steps=3)
    trainer = fake_trainer(step=3)
    resumed.on_train_start(trainer, None)
    train_steps(resumed, trainer, {s: losses[s] for s in range(4, 8)}, accumulate=2)
    assert step_fields(recorded.lines) == step_fields(uninterrupted[1:])


def test_eta_counts_this_processs_steps_only():
    assert eta_seconds(10, 100, 0, 20.0) == pytest.approx(180.0)
    assert eta_seconds(60, 100, 50, 20.0) == pytest.approx(80.0)  # resumed at 50: 2 s a step
    assert eta_seconds(50, 100, 50, 5.0) is None  # no step yet: no pace to go by
    assert clock(3725.4) == "1:02:05"


def test_in_a_terminal_with_the_bar_the_lines_go_to_the_log_file_only(recorded, monkeypatch,
                                                                       tmp_path):
    root = logging.getLogger()
    console_text = io.StringIO()
    console = logging.StreamHandler(console_text)
    log_file = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(console)
    root.addHandler(log_file)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    try:
        for n, (bar, to_console) in enumerate(((SimpleNamespace(is_enabled=True), False),
                                               (None, True)), start=1):
            callback = ProgressLog(every_n_steps=1)
            trainer = fake_trainer(bar=bar)
            callback.on_train_start(trainer, None)
            train_steps(callback, trainer, {1: [2.0]}, accumulate=1)
            log_file.flush()
            assert (tmp_path / "train.log").read_text().count("step 1/7 | train/loss 2.0") == n
            assert ("step 1/7" in console_text.getvalue()) is to_console
    finally:
        root.removeHandler(console)
        root.removeHandler(log_file)
        log_file.close()


def test_every_n_steps_must_be_positive_and_the_error_names_the_key(corpus, cache_dir, tmp_path):
    from training import builders

    cfg = compose_train([*smoke_overrides(corpus, cache_dir),
                         "callbacks.progress_log.every_n_steps=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"callbacks\.progress_log: every_n_steps=0 must be"):
        builders.callbacks(cfg)


def test_the_progress_settings_do_not_name_sweep_folders():
    """Like the bar, how often a run reports is not what a sweep job is about."""
    from omegaconf import OmegaConf

    hydra_conf = OmegaConf.load(Path(ROOT) / "conf" / "hydra" / "default.yaml")
    excluded = hydra_conf.job.config.override_dirname.exclude_keys
    assert {"callbacks.progress_log", "callbacks.progress_log.every_n_steps"} <= set(excluded)
