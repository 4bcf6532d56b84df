"""A real multirun: separate folders and separate W&B runs per job, in one W&B group."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_folder_and_wandb_run(corpus, cache_dir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "HF_DATASETS_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "pe=rope,bipe_rope", "experiment=smoke",
         "data=text_files", f"data.glob={corpus}", f"paths.cache_dir={cache_dir}",
         "logger=wandb", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    # settings every job shares (experiment, logger, paths) stay out of the folder names
    assert [p.name for p in jobs] == ["0_data=text_files,pe=rope", "1_data=text_files,pe=bipe_rope"]
    runs = []
    for job, pe in zip(jobs, ["rope", "bipe_rope"], strict=True):
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 6 and ckpt["bipe"]["model_config"]["pe"]["name"] == pe
        assert json.loads((job / "length_eval.json").read_text())["pe"] == pe
        run = json.loads((job / "wandb_run.json").read_text())
        assert run["mode"] == "offline" and run["name"].endswith(f"pe={pe}")
        offline = list((job / "wandb").glob(f"offline-run-*-{run['id']}"))
        assert len(offline) == 1 and any(offline[0].glob("*.wandb"))  # its own run files
        runs.append(run)
    assert runs[0]["id"] != runs[1]["id"]
    assert runs[0]["group"] == runs[1]["group"] == "_".join(sweep.parts[-2:])


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_runs_the_others_and_exits_2(corpus, cache_dir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    # hidden 30 / 2 heads: an odd head size, which RoPE cannot rotate (a config error)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "model.hidden_size=30,32",
         "experiment=smoke", "data=text_files", f"data.glob={corpus}",
         f"paths.cache_dir={cache_dir}", "pe=rope", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a job of the sweep failed" in errors[0]
    assert "model.hidden_size" in errors[0] and "Traceback" not in result.stderr
    assert (sweep / "1_data=text_files,model.hidden_size=32,pe=rope" / "metrics.json").is_file()
