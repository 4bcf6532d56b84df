"""Pretrain a decoder with a chosen positional encoding, then measure length extrapolation.

    python train.py                                   # tiny BiPE-RoPE on Shakespeare, CPU, minutes
    python train.py pe=bipe_alibi data=python_code model=small trainer=gpu
    python train.py -m pe=rope,alibi,bipe_rope,bipe_alibi     # a sweep: one folder + W&B run each
    python train.py ckpt_path=outputs/<day>/<run>             # resume that run exactly
    python train.py init_from=<ckpt> optim.lr=2e-5            # a new run starting from its weights
    python train.py experiment=yarn_finetune init_from=<ckpt> # extend a RoPE model's context
    python train.py task=arithmetic pe=bipe_rope              # a synthetic task instead of text

compose (Hydra, conf/train.yaml) -> [checkpoint: resume, init or fine-tune] -> validate -> data
-> model -> fit -> perplexity at 1x..8x the training length, or the task's test accuracy. A bad
config, data or checkpoint ends the run before any long work with one `error: ...` line on
stderr and exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("BIPE_ROOT", str(ROOT))  # conf/paths/default.yaml: paths.root

log = logging.getLogger("train")


def short_dirname(name: str, limit: int = 120) -> str:
    """A sweep job's folder name (`conf/hydra/default.yaml`: `<num>_${bipe.dirname:<overrides>}`).

    File systems cap a name at 255 bytes and a job with a dozen overrides passes that, which
    would crash the job when Hydra makes its folder: names longer than `limit` characters become
    their first characters + `~` + a hash of the whole string, so they stay unique.
    """
    if len(name) <= limit:
        return name
    return f"{name[: limit - 11]}~{hashlib.sha1(name.encode()).hexdigest()[:10]}"


if not OmegaConf.has_resolver("bipe.dirname"):  # defined here: train.py must not import torch
    OmegaConf.register_new_resolver("bipe.dirname", short_dirname)


def train(cfg: DictConfig) -> dict[str, Any]:
    """One run from a composed config; returns the final metrics."""
    # Imports come as late as they can: Hydra's own errors (an unknown `pe=` choice, a misspelled
    # override) answer before torch loads, and config errors before Lightning does.
    from models.checkpoint import CHECKPOINT_KEY, load_checkpoint, load_weights
    from training import builders
    from training.finetune import apply_finetune
    from training.resume import check_resume
    from training.schema import validate_config

    # 1. Everything that can be checked without data: checkpoints, config keys, model shapes.
    output_dir = Path(cfg.paths.output_dir)
    start = cfg.ckpt_path or cfg.init_from
    start_ckpt = None
    if start:
        start_ckpt = load_checkpoint(start, key="ckpt_path" if cfg.ckpt_path else "init_from")
        # Fine-tuning takes the model from the checkpoint (the YaRN stage); no-op otherwise.
        apply_finetune(cfg, start_ckpt[CHECKPOINT_KEY], resume=bool(cfg.ckpt_path))
    settings = validate_config(cfg)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if start_ckpt is not None and cfg.ckpt_path:
        check_resume(start_ckpt, builders.model_config(cfg).to_dict(), run_config, cfg.ckpt_path)

    import lightning as L

    from tasks.synthetic.tasks import MAIN_METRIC
    from training.job import tidy_lightning_output
    from training.module import LanguageModel
    from training.task_module import TaskModel
    from training.throughput import TokenThroughput
    from training.wandb_logger import record_run

    tidy_lightning_output()

    # 2. The run's objects. The trainer comes before the data so its config errors come first.
    L.seed_everything(cfg.seed, workers=True)
    logger = builders.logger(cfg)
    callbacks = builders.callbacks(cfg, with_logger=bool(logger))
    trainer = builders.trainer(cfg, callbacks, logger)
    dm = builders.datamodule(cfg, start_ckpt[CHECKPOINT_KEY] if start_ckpt else None, output_dir)
    model_cfg = builders.model_config(cfg, vocab_size=dm.tokenizer.get_vocab_size())
    metadata = {"tokenizer": dm.tokenizer.to_str(), "data_stats": dm.stats,
                "run_config": run_config}
    module_args = (model_cfg, settings.optim)
    module_kwargs = {"max_steps": settings.max_steps, "seed": cfg.seed, "metadata": metadata}
    if cfg.task.name == "lm":
        module = LanguageModel(*module_args, **module_kwargs)
    else:
        module = TaskModel(*module_args, **module_kwargs, val_names=dm.val_names, score=dm.score,
                           main_metric=MAIN_METRIC[dm.task_name])
    if cfg.init_from:
        load_weights(module.model, start_ckpt, cfg.init_from)
        log.info("initialised weights from %s (step %s of that run); optimizer and schedule "
                 "start fresh", cfg.init_from, start_ckpt.get("global_step"))
    del start_ckpt  # Lightning reads the resume checkpoint itself; don't hold two copies

    n_params = module.model.num_parameters()
    log.info("model: %s parameters (%s without the embedding), pe=%s", f"{n_params:,}",
             f"{module.model.num_parameters(non_embedding=True):,}", cfg.pe.name)
    for lg in trainer.loggers:
        lg.log_hyperparams({**run_config, "n_parameters": n_params})
        if hasattr(lg, "wandb_mode") and trainer.is_global_zero:  # other ranks have no W&B run
            record_run(lg, output_dir / "wandb_run.json")

    # 3. Train. Resuming restores weights, optimizer, schedule and loop state; the module's
    # on_load_checkpoint moves the data stream to the checkpoint's batch.
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and module.last_saved_step != trainer.global_step:
        trainer.save_checkpoint(Path(ckpt_cb.dirpath) / "last.ckpt")  # steps after the last val
    if not trainer.is_global_zero:  # multi-process training: the first process measures
        return {}

    # 4. The final measurement, with the final weights: perplexity at multiples of the training
    # length, or the task's metrics on its test sets.
    device = trainer.strategy.root_device
    module.to(device)
    if cfg.task.name == "lm":
        metrics, table = _length_eval(cfg, settings, module, dm, trainer, device)
    else:
        metrics, table = _task_eval(cfg, module, dm, trainer, device)
    # The last validation's metrics (what tuning selects on; never the test sets).
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith("val/")})
    for lg in trainer.loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if v is not None},
                       step=trainer.global_step)
        lg.save()

    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    print()
    print(table)
    if throughput is not None and throughput.total_tokens:
        metrics["train/tokens_per_sec"] = throughput.tokens_per_sec
        print(f"trained on {throughput.total_tokens:,} tokens in {throughput.train_seconds:.0f} s "
              f"({throughput.tokens_per_sec:,.0f} tokens/s)")
    _write_json(output_dir / "metrics.json", {"global_step": trainer.global_step,
                                               "seed": cfg.seed, "metrics": metrics})
    print(f"run folder: {output_dir}")
    return metrics


def _write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, written to a temp file first (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """The final value of `optimized_metric` (None when unset); ConfigError if the run did not
    produce that metric."""
    name = cfg.get("optimized_metric")
    if not name or not metrics:  # unset, or a process other than the first of several
        return None
    if name not in metrics:
        from bipe.errors import ConfigError

        raise ConfigError(f"optimized_metric={name} is not a metric of this run; choose one of "
                          f"{', '.join(sorted(metrics))}")
    return float(metrics[name])


def _length_eval(cfg: DictConfig, settings: Any, module: Any, dm: Any, trainer: Any,
                 device: Any) -> tuple[dict[str, Any], str]:
    """Perplexity at `eval.lengths` x the training length -> (metrics, printed table);
    writes `length_eval.json`."""
    from training.length_eval import evaluate_lengths, format_table

    results = evaluate_lengths(
        module.model, dm, settings.block_size, settings.eval.lengths, split=settings.eval.split,
        tokens_per_batch=cfg.data.batch_size * settings.block_size,
        batch_size=settings.eval.batch_size, max_blocks=settings.eval.max_blocks, device=device,
        precision=cfg.trainer.precision)
    _write_json(Path(cfg.paths.output_dir) / "length_eval.json",
                {"pe": cfg.pe.name, "block_size": settings.block_size, "seed": cfg.seed,
                 "split": settings.eval.split, "global_step": trainer.global_step,
                 "results": [r.to_dict() for r in results]})
    table = format_table(results, f"{settings.eval.split} perplexity vs length: pe={cfg.pe.name}, "
                                  f"trained on {settings.block_size}-token blocks, "
                                  f"step {trainer.global_step}")
    return {f"eval/ppl_{r.multiple}x": r.ppl for r in results}, table


def _task_eval(cfg: DictConfig, module: Any, dm: Any, trainer: Any,
               device: Any) -> tuple[dict[str, Any], str]:
    """The task's metrics on its test sets -> (metrics, printed table); writes `task_eval.json`
    (what `python -m evaluation.task_summary` gathers from a sweep)."""
    from training.task_module import evaluate_task, format_task_table

    rows = evaluate_task(module.model, dm.test_dataloader(), dm.val_names, dm.score, device)
    _write_json(Path(cfg.paths.output_dir) / "task_eval.json",
                {"task": dm.task_name, "pe": cfg.pe.name, "model": module.model_config.to_dict(),
                 "n_parameters": module.model.num_parameters(), "seed": cfg.seed,
                 "global_step": trainer.global_step, "task_config": dict(dm.cfg),
                 "split": getattr(dm, "test_split", "test"), "results": rows})
    metrics = {f"test/{r['setting']}/{k}": r[k] for r in rows
               for k in ("loss", "accuracy", "exact", "token_accuracy", "sequence_accuracy",
                         "score")
               if k in r}
    table = format_task_table(rows, f"test {dm.task_name}: pe={cfg.pe.name}, "
                                    f"hidden {module.model_config.hidden_size}, "
                                    f"step {trainer.global_step}")
    return metrics, table


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final value of `optimized_metric` (for sweepers)."""
    from training.job import run_job  # imports torch (see `train`)

    return run_job(lambda c: optimized_value(c, train(c)), cfg)


if __name__ == "__main__":
    main()
