"""The W&B logger: offline unless you are logged in, one run per (multirun) job, always finished.

Mode, highest priority first: the `WANDB_MODE` environment variable (CI and tests set
`disabled`), then `logger.mode`, then `online` if an API key is configured (`WANDB_API_KEY`, or a
`~/.netrc` entry for the W&B host, which `wandb login` writes) and `offline` otherwise. Offline
runs can be uploaded later with `wandb sync <run folder>/wandb/offline-run-*`.

In a Hydra multirun every job is its own W&B run: grouped by the sweep folder's name, named by
the job's overrides (`pe=rope,seed=1`). `finish_wandb` closes the run of the current job, so the
next job of a sweep in the same process starts a fresh one.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bipe.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")


def api_key_configured() -> bool:
    """True if wandb would find an API key: `WANDB_API_KEY` or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(str(path)).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str | None) -> str:
    """The W&B mode this run uses (see the module docstring for the order)."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)  # wandb's legacy aliases
    if mode is not None:
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode!r} is unknown; choose one of {MODES} or null")
        return mode
    return "online" if api_key_configured() else "offline"


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep folder's runs: its last two parts (`<day>_<time>`)."""
    return "_".join(Path(sweep_dir).resolve().parts[-2:])  # e.g. 2024-05-01_12-30-00-123456


def hydra_run_names() -> tuple[str | None, str]:
    """(group, name) for this job: the sweep and the job's overrides in a multirun, else no group
    and the run folder's name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, "run"
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return sweep_group(hc.sweep.dir), hc.job.override_dirname or f"job{hc.job.num}"
    return None, Path(hc.runtime.output_dir).name


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
    path.write_text(json.dumps(info, indent=2, default=str))
    return info


def finish_wandb(failed: bool = False) -> None:
    """Close the current W&B run, if one is open (a no-op when wandb was never imported)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
