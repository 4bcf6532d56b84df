"""Resuming a run: the checkpoint must fit the model the config builds; other changes are logged."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bipe.errors import ConfigError
from evaluation.records import flatten
from models.checkpoint import CHECKPOINT_KEY

log = logging.getLogger(__name__)

# Keys that may differ between the interrupted run and its resumption without changing training.
UNTRACKED = ("ckpt_path", "init_from", "paths.", "logger.", "callbacks.", "eval.", "data.cache_dir",
             "data.pack_workers", "extras.", "tags", "compile",
             "data.num_workers", "data.pin_memory",
             "trainer.default_root_dir", "trainer.enable_progress_bar")  # where, not what


def check_resume(ckpt: Mapping[str, Any], model_config: Mapping[str, Any],
                 run_config: Mapping[str, Any], path: str) -> None:
    """Raise `ConfigError` if the checkpoint's model differs from the configured one (vocabulary
    size aside: it comes from the tokenizer); log the other settings that changed."""
    meta = ckpt[CHECKPOINT_KEY]
    old_model = flatten(meta["model_config"])
    new_model = flatten(model_config)
    for key in sorted(set(old_model) | set(new_model)):
        if key == "vocab_size":
            continue
        if old_model.get(key) != new_model.get(key):
            name = key if key.startswith("pe.") else f"model.{key}"
            raise ConfigError(
                f"ckpt_path={path} was trained with {name}={old_model.get(key)!r} but the config "
                f"gives {new_model.get(key)!r}; resume with the run's model/pe settings, or use "
                "init_from= to start a new run from its weights")
    old_run = flatten(meta.get("run_config", {}))
    new_run = flatten(run_config)
    changed = [f"{k}: {old_run.get(k)!r} -> {new_run.get(k)!r}"
               for k in sorted(set(old_run) | set(new_run))
               if not k.startswith(UNTRACKED) and old_run.get(k) != new_run.get(k)]
    if changed:
        log.warning("resuming %s with changed settings (training will not match an "
                    "uninterrupted run): %s", path, "; ".join(changed))
