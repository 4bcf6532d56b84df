"""Evaluate checkpoints: perplexity against length (with and without LM-Infinite), passkey
retrieval and generation quality; tables in the terminal, files in the run folder.

    python eval.py ckpt_path=outputs/<day>/<run>
    python eval.py sweep_dir=multirun/<day>/<time> eval.lm_infinite.enabled=both
    python eval.py ckpt_path=... eval.length_unit=tokens eval.lengths=[1024,4096]
    python eval.py ckpt_path=... eval.passkey.enabled=true eval.generation.enabled=true

Outputs: results.json, ppl_vs_length.csv, ppl_vs_length.png, nll_by_position.png (and passkey
heat maps), plus the same tables and figures in W&B (in the sweep's group for a sweep). The runs
of a sweep that differ only in their seed are reported as mean and 95% interval.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from evaluation.config import register_eval_configs
from training.job import cli, run_job, tidy_lightning_output

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BIPE_ROOT", str(ROOT))
register_eval_configs()


def evaluate(cfg: DictConfig) -> dict:
    """Run every enabled evaluation; returns the rows written to results.json."""
    from evaluation import runner  # lazy: imports torch after Hydra composed the config

    tidy_lightning_output()
    return runner.evaluate(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_job(evaluate, cfg)


if __name__ == "__main__":
    cli(main)
