"""Several processes: each takes a disjoint share of the same global batch; DDP on 2 CPU processes
(gloo) follows the one-process loss curve."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from bipe.errors import ConfigError
from tests.conftest import ROOT, smoke_overrides
from tests.helpers import synthetic_dm
from tests.test_data_pipeline import make_cfg, ready


@pytest.mark.parametrize(("world", "accumulate"), [(2, 1), (2, 2), (1, 4)])
def test_shares_of_a_global_batch_are_disjoint_and_cover_it(tmp_path, world, accumulate):
    dm = ready(make_cfg(tmp_path, batch_size=8))
    whole = dm.train_dataset()
    streams = [dm.train_dataset().shard(world, rank, accumulate) for rank in range(world)]
    for k in (0, 3):  # global batches (optimizer steps)
        parts = {}
        for rank, stream in enumerate(streams):
            for a in range(accumulate):
                part = stream.micro_batch(k * accumulate + a)
                assert part["input_ids"].shape[0] == 8 // (world * accumulate)
                parts[a * world + rank] = part
        joined = torch.cat([parts[i]["input_ids"] for i in range(world * accumulate)])
        assert torch.equal(joined, whole.batch(k)["input_ids"])  # the same rows, each once


def test_a_global_batch_that_does_not_split_is_refused(tmp_path):
    dm = ready(make_cfg(tmp_path, batch_size=6))
    with pytest.raises(ConfigError, match=r"data.batch_size=6 .* multiple of 4"):
        dm.train_dataset().shard(2, 0, 2)
    synthetic = synthetic_dm({"name": "arithmetic", "batch_size": 6})
    synthetic.setup()
    with pytest.raises(ConfigError, match="task.batch_size=6"):
        synthetic.train_dataloader().dataset.shard(4, 0, 1)


def losses(run_dir) -> dict[int, float]:
    rows = list(csv.DictReader(next(run_dir.rglob("metrics.csv")).open()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.slow
def test_two_process_ddp_follows_the_one_process_loss_curve(corpus, cache_dir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    common = [*smoke_overrides(corpus, cache_dir), "logger=csv", "trainer.max_steps=6",
              "data.batch_size=4"]
    runs = {}
    for name, extra in (("one", []), ("ddp", ["trainer=ddp"])):
        runs[name] = tmp_path / name
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *common, *extra,
             f"hydra.run.dir={runs[name]}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        if name == "ddp":  # really two processes
            log = (runs[name] / "train.log").read_text() + result.stdout + result.stderr
            assert "MEMBER: 2/2" in log, log[-2000:]
    one, ddp = losses(runs["one"]), losses(runs["ddp"])
    assert len(one) == 6 and one.keys() == ddp.keys()
    for step in one:  # same global batch, gradients averaged over two halves: float noise only
        assert ddp[step] == pytest.approx(one[step], rel=1e-4), step
    assert one[0] != pytest.approx(one[5], rel=1e-3)  # the curve moves, so the match has teeth

    # Its checkpoint loads and evaluates in one process, like the one-process run's.
    a = torch.load(runs["one"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(runs["ddp"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    report = json.loads((runs["ddp"] / "length_eval.json").read_text())
    assert all(r["ppl"] is not None for r in report["results"])
