"""Weights & Biases runs: which mode, which group, and closing the run of a job.

Mode, highest priority first: the `WANDB_MODE` environment variable (CI and tests set
`disabled`), then the configured mode, then `online` if an API key is configured (`WANDB_API_KEY`,
or a `~/.netrc` entry for the W&B host, which `wandb login` writes) and `offline` otherwise.
Offline runs can be uploaded later with `wandb sync <run folder>/wandb/offline-run-*`.

A Hydra multirun's jobs are grouped by the sweep folder's name (`sweep_group`); an evaluation or
a summary of a sweep joins the same group, and an evaluation of checkpoints the group their
training runs were logged in (`eval_group`). `finish_wandb` closes the current run, so the next
job of a sweep in the same process starts a fresh one.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from bipe.errors import ConfigError, first_line

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
RUN_RECORD = "wandb_run.json"  # a training run's W&B identity, in its run folder (record_run)


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


def recorded_group(checkpoint: Path) -> tuple[bool, str | None]:
    """(whether a record exists, the W&B group in it) for the training run of `checkpoint`: the
    `RUN_RECORD` of its run folder (`<run>/checkpoints/<name>.ckpt`; a folder is its own)."""
    run = checkpoint if checkpoint.is_dir() else (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent)
    path = run / RUN_RECORD
    if not path.is_file():
        return False, None
    try:
        record = json.loads(path.read_text())
        group = record.get("group")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a W&B run record ({first_line(exc)}); delete it or "
                          "set logger.group=NAME") from None
    if group is not None and not isinstance(group, str):
        raise ConfigError(f"{path}: group={group!r} must be a string or null; fix it or set "
                          "logger.group=NAME")
    return True, group or None


def eval_group(configured: str | None, sweep_dir: str | Path | None,
               checkpoints: Sequence[Path]) -> str | None:
    """The W&B group of an evaluation, so it sits beside the runs it measured: `logger.group`
    when set; the sweep's group for `sweep_dir`; else the group the checkpoints' training runs
    were logged in (`recorded_group`), when they all share one."""
    if configured:
        return configured
    if sweep_dir:
        return sweep_group(sweep_dir)
    records = {path: recorded_group(path) for path in dict.fromkeys(checkpoints)}
    groups = {group for found, group in records.values() if found}
    unrecorded = [str(path) for path, (found, _) in records.items() if not found]
    if unrecorded or len(groups) != 1 or None in groups:
        names = ", ".join(sorted(map(str, groups)))
        why = (f"{unrecorded[0]} has no {RUN_RECORD} (trained without W&B)" if unrecorded else
               "the training runs were in no W&B group" if groups == {None} else
               f"the training runs were in different W&B groups ({names})")
        log.info("the evaluation's W&B run joins no group: %s; set logger.group=NAME to choose",
                 why)
        return None
    return groups.pop()


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


def finish_wandb(failed: bool = False) -> None:
    """Close the current W&B run, if one is open (a no-op when wandb was never imported)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
