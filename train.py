"""Pretrain a decoder with a chosen positional encoding, then measure length extrapolation.

    python train.py                                   # tiny BiPE-RoPE on Shakespeare, CPU, minutes
    python train.py pe=bipe_alibi data=python_code model=small trainer=gpu
    python train.py -m pe=rope,alibi,bipe_rope,bipe_alibi     # a sweep: one folder + W&B run each
    python train.py ckpt_path=outputs/<day>/<run>             # resume that run exactly
    python train.py init_from=<ckpt> optim.lr=2e-5            # a new run starting from its weights
    python train.py experiment=yarn_finetune init_from=<ckpt> # extend a RoPE model's context
    python train.py task=arithmetic pe=bipe_rope              # a synthetic task instead of text
    python train.py --help                                    # groups, options and examples

compose (Hydra, conf/train.yaml and the schemas of training/config.py) -> check -> instantiate ->
fit -> test: perplexity at 1x..8x the training length, or the task's test metrics. A bad config,
data or checkpoint ends the run before any long work with one `error: ...` line on stderr and
exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from training.config import plain, register_configs
from training.job import cli, run_job
from training.study import check_sweep_mode, mark_invocation, plan

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BIPE_ROOT", str(ROOT))  # conf/paths/default.yaml: paths.root
# Jobs a launcher starts in fresh processes (submitit, Slurm) unpickle this module's functions:
# let them import the project whatever their working folder.
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
register_configs()
mark_invocation()  # the jobs this process launches share its study limits (training/study.py)


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run from a composed config; returns the final metrics. A run of a study
    (`study.name`) whose record exists returns the recorded metrics, one past the invocation's
    limits returns none, and one whose folder holds a checkpoint resumes from it."""
    check_sweep_mode()
    study = plan(plain(cfg))
    if study is not None:
        recorded = study.recorded_metrics()
        if recorded is not None:
            print(f"{study.label}: recorded in {study.record_path}; skipped")
            return recorded
        if not study.claim():
            return {}
        if not cfg.ckpt_path:
            cfg.ckpt_path = study.resume_point()

    from training import run  # lazy: imports torch and Lightning, after Hydra composed the config

    checked = run.check(cfg)
    parts = run.instantiate(cfg, checked)
    run.fit(parts, cfg.ckpt_path)
    metrics = run.test(checked, parts)
    if study is not None and metrics:  # the first process of several writes the record
        study.write()
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final value of `optimized_metric` (for sweepers)."""
    from training.run import optimized_value  # lazy: see train()

    return run_job(lambda c: optimized_value(c, train(c)), cfg)


if __name__ == "__main__":
    cli(main)
