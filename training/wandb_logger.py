"""The W&B logger of a training run: offline unless you are logged in, one run per (multirun)
job (grouped by sweep, named by the job's overrides, e.g. `pe=rope,seed=1`), always finished.
The mode and group rules are `evaluation.wandb_runs`'s, shared with evaluations and summaries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bipe.io import atomic_write_json
from evaluation.wandb_runs import hydra_run_names, resolve_mode

log = logging.getLogger(__name__)


def wandb_logger(project: str = "bipe", entity: str | None = None, mode: str | None = None,
                 group: str | None = None, name: str | None = None,
                 tags: list[str] | None = None, job_type: str = "train",
                 save_dir: str = ".", cache_dir: str | None = None,
                 log_model: bool = False) -> Any:
    """A Lightning `WandbLogger` (the `_target_` of `conf/logger/wandb.yaml`).

    `group`/`name` default to the Hydra sweep and job (see `hydra_run_names`); `save_dir` is
    the run folder (W&B writes `save_dir/wandb/`); `cache_dir` becomes `WANDB_CACHE_DIR` and
    `WANDB_DATA_DIR` unless they are set.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_mode(mode)
    if cache_dir is not None:
        os.environ.setdefault("WANDB_CACHE_DIR", str(Path(cache_dir) / "wandb"))
        os.environ.setdefault("WANDB_DATA_DIR", str(Path(cache_dir) / "wandb-data"))
    auto_group, auto_name = hydra_run_names()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode != "online" and log_model:
        log_model = False  # nothing to upload to; checkpoints stay in the run folder
    logger = WandbLogger(project=project, entity=entity, mode=mode, group=group or auto_group,
                         name=name or auto_name, tags=list(tags or []), job_type=job_type,
                         save_dir=save_dir, log_model=log_model)
    logger.wandb_mode = mode
    return logger


def record_run(logger: Any, path: Path) -> dict[str, Any]:
    """Start the W&B run (if not yet) and write its identity to `path` (JSON); return it."""
    run = logger.experiment
    info = {"project": getattr(run, "project", None), "id": getattr(run, "id", None),
            "name": getattr(run, "name", None), "group": getattr(run, "group", None),
            "mode": getattr(logger, "wandb_mode", None), "dir": getattr(run, "dir", None)}
    atomic_write_json(path, info)
    return info


