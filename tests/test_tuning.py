"""`python -m evaluation.tuning`: each encoding's learning rate chosen on a constructed sweep
whose best values are known, then loaded back by `experiment=<study>`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bipe.errors import DataError
from evaluation.tuning import choose, load_runs, main, minimise, write_tuned
from tests.conftest import ROOT

# pe -> lr -> validation losses of seeds 0 and 1
GRID = {"rope": {0.001: [2.0, 2.2], 0.003: [1.5, 1.7], 0.01: [1.9, 2.1]},
        "bipe_rope": {0.001: [1.4, 1.4], 0.003: [1.6, 1.6], 0.01: [3.0, 3.0]}}


def make_sweep(root: Path, grid=GRID, metric="val/ops_4/loss") -> Path:
    n = 0
    for pe, by_lr in grid.items():
        for lr, values in by_lr.items():
            for seed, value in enumerate(values):
                job = root / f"{n}_pe={pe},optim.lr={lr},seed={seed}"
                (job / ".hydra").mkdir(parents=True)
                overrides = ["experiment=arithmetic_sweep", "hparams_search=arithmetic_lr",
                             f"pe={pe}", "model.hidden_size=48", f"optim.lr={lr}", f"seed={seed}"]
                (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
                (job / ".hydra" / "config.yaml").write_text(
                    yaml.safe_dump({"optimized_metric": metric, "seed": seed}))
                (job / "metrics.json").write_text(json.dumps(
                    {"seed": seed, "global_step": 10,
                     "metrics": {metric: value, "test/ops_4/accuracy": 1.0 - value}}))
                n += 1
    return root


def test_each_encoding_gets_the_lr_with_the_best_mean_over_seeds(tmp_path):
    metric, runs = load_runs(make_sweep(tmp_path))
    assert metric == "val/ops_4/loss" and minimise(metric) and len(runs) == 12
    results = {r.cell.get("pe"): r for r in choose(metric, runs)}
    assert results["rope"].best_lr == 0.003 and not results["rope"].at_edge
    assert results["rope"].by_lr[0.003].mean == pytest.approx(1.6)
    assert results["rope"].by_lr[0.003].n == 2
    assert results["bipe_rope"].best_lr == 0.001 and results["bipe_rope"].at_edge


def test_a_higher_is_better_metric_is_maximised(tmp_path):
    grid = {"rope": {0.001: [0.2], 0.003: [0.9], 0.01: [0.5]}}
    metric, runs = load_runs(make_sweep(tmp_path, grid, metric="val/ops_4/accuracy"))
    assert not minimise(metric)
    assert choose(metric, runs)[0].best_lr == 0.003


def test_written_files_set_the_lr_of_the_study(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    metric, runs = load_runs(sweep)
    out = tmp_path / "tuned" / "arithmetic_sweep"
    written = write_tuned(out, sweep, metric, choose(metric, runs))
    assert sorted(p.name for p in written) == ["bipe_rope.yaml", "rope.yaml"]
    rope = yaml.safe_load((out / "rope.yaml").read_text())
    assert rope == {"optim": {"lr": 0.003}}
    assert "grid" in (out / "bipe_rope.yaml").read_text()  # the edge is flagged in the file


def test_the_same_seed_twice_in_one_cell_is_refused(tmp_path):
    make_sweep(tmp_path / "a", {"rope": {0.001: [1.0]}})
    make_sweep(tmp_path / "b", {"rope": {0.001: [2.0]}})
    runs = load_runs(tmp_path / "a")[1] + load_runs(tmp_path / "b")[1]
    with pytest.raises(DataError, match="same seed 0"):
        choose("val/ops_4/loss", runs)


def test_the_command_prints_the_table_and_fails_in_one_line(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    ok = subprocess.run([sys.executable, "-m", "evaluation.tuning", str(sweep)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("val/ops_4/loss by learning rate (lower is better")
    rope = next(line for line in lines if line.startswith("rope "))
    assert "1.6*" in rope and rope.split()[-1] == "0.003"
    bad = subprocess.run([sys.executable, "-m", "evaluation.tuning", str(tmp_path / "no")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: sweep folder")


def test_a_failed_grid_point_is_named_and_the_grid_is_incomplete(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep", {"rope": {0.001: [2.0], 0.003: [1.5], 0.01: [1.0]}})
    failed = next(sweep.glob("*optim.lr=0.01*"))
    (failed / "metrics.json").unlink()  # the job that would have won failed
    metric, runs = load_runs(sweep)
    assert f"unfinished: {failed} has no metrics.json" in capsys.readouterr().err
    (rope,) = choose(metric, runs)
    assert rope.best_lr == 0.003 and rope.missing == [0.01]
    assert not rope.at_edge  # 0.003 is inside the grid the sweep was given, not its edge
    with pytest.raises(DataError, match="incomplete .*rope.* at lr 0.01"):
        write_tuned(tmp_path / "tuned", sweep, metric, [rope])


def test_a_grid_widened_for_some_encodings_writes_those_alone(tmp_path, capsys):
    # bipe_rope's best sat at the low edge, so its grid got 3e-4; rope's did not
    grid = {"rope": GRID["rope"], "bipe_rope": {0.0003: [1.5, 1.5], **GRID["bipe_rope"]}}
    sweep = make_sweep(tmp_path / "sweep", grid)
    out = tmp_path / "tuned"
    assert main([str(sweep), "--write", str(out)]) == 2  # rope has no run at 3e-4
    assert "incomplete" in capsys.readouterr().err and not out.exists()
    assert main([str(sweep), "--write", str(out), "--pe", "bipe_rope"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bipe_rope.yaml"]
    written = (out / "bipe_rope.yaml").read_text()
    assert "lr: 0.001" in written and "edge" not in written  # 1e-3 is inside the widened grid
    assert main([str(sweep), "--pe", "xpos"]) == 2
    assert capsys.readouterr().err.startswith("error: --pe xpos: no tuning runs")
