"""One training run, in the four steps `train.py` reads as: check, instantiate, fit, test.

* `check`: the checkpoint to resume or start from, the config (every key and value, the task and
  its data node, the model shape), and for a resume that the checkpoint fits the config; nothing
  slow has happened yet when an error stops the run.
* `instantiate`: logger, callbacks, trainer, the task's data module, the Lightning module the
  task trains with (`Task.trains`), the starting weights.
* `fit`: Lightning's loop (resuming restores weights, optimizer, schedule and the data position),
  then a last checkpoint if steps ran after the last validation.
* `test`: the module's end-of-run report with the final weights (perplexity against length, or
  the task's test sets), logged, printed and written to the run folder with `metrics.json`.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import rich
import rich.syntax
import rich.tree
import yaml
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from bipe.errors import ConfigError
from bipe.io import atomic_write_json, remove_stale_temps
from models.checkpoint import (
    CHECKPOINT_KEY,
    load_checkpoint,
    load_weights,
    resolve_checkpoint_path,
)
from training import builders
from training.config import RunSettings, model_config, plain, validate_config
from training.finetune import apply_finetune
from training.interrupted import InterruptedCheckpoint, TrainingStopped
from training.job import tidy_lightning_output
from training.module import LanguageModel
from training.resume import check_resume
from training.task_module import TaskModel
from training.throughput import TokenThroughput
from training.wandb_logger import record_run

log = logging.getLogger(__name__)

# What `Task.trains` names: the Lightning module that trains the task.
MODULES: dict[str, type[LanguageModel]] = {"language_model": LanguageModel, "sequence": TaskModel}


@dataclass
class Checked:
    """The outcome of `check`: the typed settings, the resolved config, the start checkpoint."""

    settings: RunSettings
    run: dict[str, Any]
    start: dict[str, Any] | None
    output_dir: Path


@dataclass
class Parts:
    """The run's objects (`instantiate`)."""

    trainer: L.Trainer
    module: LanguageModel
    datamodule: Any
    callbacks: list[Any]


def check(cfg: DictConfig) -> Checked:
    """Everything that can be checked without data (module docstring)."""
    start = None
    if cfg.ckpt_path or cfg.init_from:
        key = "ckpt_path" if cfg.ckpt_path else "init_from"
        if not isinstance(cfg[key], str):
            raise ConfigError(f"{key}={cfg[key]!r} must be a path to a checkpoint or run folder")
        start = load_checkpoint(cfg[key], key=key)
        # Fine-tuning takes the model from the checkpoint (the YaRN stage); no-op otherwise.
        apply_finetune(cfg, start[CHECKPOINT_KEY], resume=bool(cfg.ckpt_path))
    settings = validate_config(cfg)
    run = plain(cfg)
    if run["extras"]["print_config"] and os.environ.get("RANK", "0") == "0":
        print_config_tree(run)
    if start is not None and cfg.ckpt_path:
        check_resume(start, model_config(run).to_dict(), run, cfg.ckpt_path)
    return Checked(settings, run, start, Path(cfg.paths.output_dir))


def print_config_tree(run: dict[str, Any]) -> None:
    """The composed config as a tree, one branch per top-level section (as the
    lightning-hydra-template's `extras.print_config`)."""
    tree = rich.tree.Tree("config", guide_style="dim")
    first = ["task", "pe", "model", "data", "optim", "trainer"]
    for key in first + [k for k in run if k not in first]:
        value = run[key]
        text = yaml.safe_dump(value, sort_keys=False).strip() if isinstance(value, dict | list) \
            else str(value)
        tree.add(f"[bold]{key}[/bold]").add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)


def instantiate(cfg: DictConfig, checked: Checked) -> Parts:
    """The run's objects; the trainer comes before the data so its config errors come first."""
    tidy_lightning_output()
    L.seed_everything(cfg.seed, workers=True)
    logger = builders.logger(cfg)
    callbacks = builders.callbacks(cfg, with_logger=bool(logger))
    trainer = builders.trainer(cfg, callbacks, logger)
    task, run = checked.settings.task, checked.run
    meta = checked.start[CHECKPOINT_KEY] if checked.start else None
    dm = task.datamodule(run, meta, checked.output_dir)
    metadata = {"tokenizer": dm.tokenizer.to_str(), "data_stats": dm.stats, "run_config": run}
    module_cls = MODULES[task.trains]
    kwargs: dict[str, Any] = {"max_steps": checked.settings.max_steps, "seed": cfg.seed,
                              "metadata": metadata}
    if module_cls is TaskModel:
        kwargs.update(val_names=dm.val_names, score=dm.score, main_metric=task.main_metric)
    model_cfg = model_config(run, vocab_size=dm.tokenizer.get_vocab_size())
    module = module_cls(model_cfg, checked.settings.optim, **kwargs)
    if compile_model(run, trainer):
        module.model.compile()  # in place: parameter names, and so checkpoints, stay plain
        log.info("model compiled with torch.compile (compile=%s)", run["compile"])
    if cfg.init_from:
        load_weights(module.model, checked.start, cfg.init_from)
        log.info("initialised weights from %s (step %s of that run); optimizer and schedule "
                 "start fresh", cfg.init_from, checked.start.get("global_step"))
    checked.start = None  # Lightning reads the resume checkpoint itself; don't hold two copies

    n_params = module.model.num_parameters()
    log.info("model: %s parameters (%s without the embedding), pe=%s", f"{n_params:,}",
             f"{module.model.num_parameters(non_embedding=True):,}", run["pe"]["name"])
    for lg in trainer.loggers:
        lg.log_hyperparams({**run, "n_parameters": n_params})
        if hasattr(lg, "wandb_mode") and trainer.is_global_zero:  # other ranks have no W&B run
            record_run(lg, checked.output_dir / "wandb_run.json")
    return Parts(trainer, module, dm, callbacks)


def compile_model(run: dict[str, Any], trainer: L.Trainer) -> bool:
    """`compile`, or for null (auto) whether the run trains on a GPU."""
    if run["compile"] is not None:
        return run["compile"]
    return trainer.strategy.root_device.type == "cuda"


def fit(parts: Parts, ckpt_path: str | None) -> None:
    """Train (or resume); save `last.ckpt` when steps ran after the last validation. A run a
    signal stopped (Ctrl-C, SIGTERM) raises `TrainingStopped` once its checkpoint is saved."""
    trainer, module = parts.trainer, parts.module
    stopper = next((c for c in trainer.callbacks if isinstance(c, InterruptedCheckpoint)), None)
    ckpt_cb = trainer.checkpoint_callback
    # A killed run's partial checkpoints: in this run's folder and in the one it resumes.
    folders = {Path(ckpt_cb.dirpath)} if ckpt_cb is not None and ckpt_cb.dirpath else set()
    if ckpt_path:
        folders.add(resolve_checkpoint_path(ckpt_path, "ckpt_path").parent)
    for folder in sorted(f for f in folders if f.is_dir()):
        for stale in remove_stale_temps(folder):
            log.warning("removed %s, a partial checkpoint left by a killed run", stale)
    try:
        trainer.fit(module, datamodule=parts.datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as exc:  # Lightning's own SIGTERM stop (callbacks.interrupted=null)
        raise TrainingStopped(signal.SIGTERM, trainer.global_step, None) from exc
    except SystemExit as exc:  # Lightning exits 1 after a KeyboardInterrupt (a second Ctrl-C)
        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        path = stopper.path if stopper and stopper.path.is_file() else None
        raise TrainingStopped(signal.SIGINT, trainer.global_step, path) from exc
    if ckpt_cb is not None and module.last_saved_step != trainer.global_step:
        trainer.save_checkpoint(Path(ckpt_cb.dirpath) / "last.ckpt")
    if stopper is not None and stopper.requested is not None:  # asked during the last step:
        raise TrainingStopped(stopper.requested, trainer.global_step, None)  # skip the report


def test(checked: Checked, parts: Parts) -> dict[str, Any]:
    """The end-of-run report with the final weights; returns the run's final metrics (also in
    `metrics.json`): the report's, the last validation's (what tuning selects on, never the test
    sets) and the training throughput."""
    trainer, module = parts.trainer, parts.module
    if not trainer.is_global_zero:  # multi-process training: the first process measures
        return {}
    device = trainer.strategy.root_device
    module.to(device)
    report = module.final_report(parts.datamodule, checked.settings, checked.run, device)
    out = checked.output_dir
    atomic_write_json(out / report.file, report.payload)
    metrics = dict(report.metrics)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith("val/")})
    for lg in trainer.loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if v is not None},
                       step=trainer.global_step)
        lg.save()
    print()
    print(report.table)
    throughput = next((c for c in parts.callbacks if isinstance(c, TokenThroughput)), None)
    if throughput is not None and throughput.total_tokens:
        metrics["train/tokens_per_sec"] = throughput.tokens_per_sec
        print(f"trained on {throughput.total_tokens:,} tokens in {throughput.train_seconds:.0f} s "
              f"({throughput.tokens_per_sec:,.0f} tokens/s)")
    atomic_write_json(out / "metrics.json", {"global_step": trainer.global_step,
                                             "seed": checked.run["seed"], "metrics": metrics})
    print(f"run folder: {out}")
    return metrics


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """The final value of `optimized_metric` (None when unset); ConfigError if the run did not
    produce that metric."""
    name = cfg.get("optimized_metric")
    if not name or not metrics:  # unset, or a process other than the first of several
        return None
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name} is not a metric of this run; choose one of "
                          f"{', '.join(sorted(metrics))}")
    return float(metrics[name])
