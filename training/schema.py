"""Validate the composed run config before any work: a wrong key or value is one line naming it.

Hydra already rejects an unknown group choice (`pe=foo`) and an override of a key that does not
exist (`optim.lrr=1`). What reaches `validate_config` can still be wrong: a `+key=` addition, a typo
in an experiment file, a value of the wrong type or range. The keys the training code reads are
checked here; the model, PE and data groups by their own config classes (`ModelConfig`,
`PEConfig`, `DataConfig`), called from here so that every check runs before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bipe.errors import ConfigError
from data import DataConfig
from data.config import TokenizerConfig
from training.builders import model_config
from training.messages import first_line
from training.schedule import SCHEDULES

TOP_LEVEL_KEYS = ("seed", "optimized_metric", "ckpt_path", "init_from", "finetune", "optim",
                  "eval", "pe", "model", "data", "task", "trainer", "logger", "callbacks", "paths")
TASKS = ("lm", "arithmetic", "bi_nfa", "scrolls")  # lm: conf/data corpora; others their own
SYNTHETIC_DATA_KEYS = ["name", "block_size"]  # conf/data/synthetic.yaml, chosen by the task


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown config key {key}; {hint}valid keys here: {', '.join(valid)}")


def check_keys(node: Mapping[str, Any], valid: list[str], prefix: str) -> None:
    """Raise `ConfigError` naming the first key of `node` that is not in `valid`."""
    for key in node:
        if key not in valid:
            raise _unknown_key_error(f"{prefix}.{key}" if prefix else str(key), list(valid))


def _number(value: Any, key: str, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r} must be {kind}")
    return value


def _from_mapping(cls: type, node: Mapping[str, Any], prefix: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(node, names, prefix)
    return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in node.items()})


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`optim.*`)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    power: float = 2.0  # exponent of the `polynomial` schedule
    pe_weight_decay: float | None = None  # the positional tables' own decay; None: as the rest

    def __post_init__(self) -> None:
        if _number(self.lr, "optim.lr") <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if _number(self.weight_decay, "optim.weight_decay") < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if (not isinstance(self.betas, list) or len(self.betas) != 2
                or not all(0 <= _number(b, "optim.betas") < 1 for b in self.betas)):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if _number(self.eps, "optim.eps") <= 0:
            raise ConfigError(f"optim.eps={self.eps} must be positive")
        if _number(self.warmup_steps, "optim.warmup_steps", integer=True) < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} is unknown; choose one of "
                              f"{', '.join(SCHEDULES)}")
        if not 0 <= _number(self.min_lr_ratio, "optim.min_lr_ratio") <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if _number(self.power, "optim.power") <= 0:
            raise ConfigError(f"optim.power={self.power} must be positive")
        if self.pe_weight_decay is not None and _number(
                self.pe_weight_decay, "optim.pe_weight_decay") < 0:
            raise ConfigError(f"optim.pe_weight_decay={self.pe_weight_decay} must be >= 0 or "
                              "null")


@dataclass
class EvalConfig:
    """End-of-run perplexity at multiples of the training length (`eval.*`)."""

    lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # x data.block_size
    split: str = "validation"
    batch_size: int | None = None  # blocks per batch; None = the training batch's token count
    max_blocks: int | None = None  # per length; None = every block of the split

    def __post_init__(self) -> None:
        if not isinstance(self.lengths, list) or not all(
                _number(m, "eval.lengths", integer=True) >= 1 for m in self.lengths):
            raise ConfigError(f"eval.lengths={self.lengths} must be a list of positive integers "
                              "(multiples of data.block_size)")
        for key in ("batch_size", "max_blocks"):
            value = getattr(self, key)
            if value is not None and _number(value, f"eval.{key}", integer=True) < 1:
                raise ConfigError(f"eval.{key}={value} must be a positive integer or null")


def check_target_kwargs(node: Mapping[str, Any], prefix: str) -> None:
    """Check a `_target_` config's keys against the target's signature (before instantiating it)."""
    target = node.get("_target_")
    if not isinstance(target, str):
        raise ConfigError(f"{prefix}._target_ is missing: name the class or function to build")
    try:
        from hydra.utils import get_object

        obj: Callable[..., Any] = get_object(target)
    except Exception as exc:  # hydra wraps import errors in several types
        raise ConfigError(f"{prefix}._target_={target!r} cannot be imported: "
                          f"{first_line(exc)}") from None
    params = inspect.signature(obj).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
    check_keys({k: v for k, v in node.items() if not k.startswith("_")}, valid, prefix)


def _check_task_and_data(task: Mapping[str, Any], data: Mapping[str, Any]) -> int:
    """Check `task` and the `data` it reads; return the block size (position-table rows)."""
    name = task.get("name")
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r} is unknown; choose one of {', '.join(TASKS)}")
    if name == "lm":
        check_keys(task, ["name"], "task")
        if data.get("name") in TASKS:  # conf/data/synthetic.yaml names the task
            raise ConfigError("data=synthetic only serves task=arithmetic, bi_nfa or scrolls; "
                              "choose a corpus (data=shakespeare, python_code, ...) for task=lm")
        # DataConfig only warns about unknown keys (a library default); a run refuses them.
        check_keys(data, [f.name for f in dataclasses.fields(DataConfig)], "data")
        check_keys(data.get("tokenizer") or {},
                   [f.name for f in dataclasses.fields(TokenizerConfig)], "data.tokenizer")
        return DataConfig.from_dict(data).block_size  # raises ConfigError naming data.*

    if name == "scrolls":
        from tasks.scrolls import resolve
    else:
        from tasks.synthetic.tasks import resolve

    resolve(task)  # raises ConfigError naming task.*
    if data.get("name") != name:  # conf/data/synthetic.yaml: name: ${task.name}
        raise ConfigError(f"task={name} generates its own data, but data={data.get('name')} was "
                          "chosen; drop the data= override (the task selects data=synthetic)")
    check_keys(data, SYNTHETIC_DATA_KEYS, "data")
    block_size = data.get("block_size")
    if _number(block_size, "data.block_size", integer=True) < 2:
        raise ConfigError(f"data.block_size={block_size} must be an integer >= 2")
    return block_size


@dataclass
class RunSettings:
    """The typed part of the config that the training code reads."""

    optim: OptimConfig
    eval: EvalConfig
    max_steps: int
    accumulate_grad_batches: int
    block_size: int


def validate_config(cfg: DictConfig) -> RunSettings:
    """Check the whole run config; raise `ConfigError` naming the first bad key.

    Cheap checks first (keys, values, the data config, model shapes), then the `_target_`
    configs, whose signatures need their modules imported.
    """
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{key or 'config'}: {first_line(exc)}") from None
    assert isinstance(container, dict)
    container.pop("hydra", None)
    check_keys(container, list(TOP_LEVEL_KEYS), "")
    for key in TOP_LEVEL_KEYS:
        if key not in container:
            raise ConfigError(f"config key {key} is missing (conf/train.yaml sets it)")

    _number(container["seed"], "seed", integer=True)
    metric = container["optimized_metric"]
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ConfigError(f"optimized_metric={metric!r} must be a metric name such as val/loss "
                          "(see a run's metrics.json) or null")
    for key in ("ckpt_path", "init_from"):
        if container[key] is not None and not isinstance(container[key], str):
            raise ConfigError(f"{key}={container[key]!r} must be a path or null")
    if container["ckpt_path"] and container["init_from"]:
        raise ConfigError("set only one of ckpt_path (resume a run exactly) and init_from "
                          "(start a new run from its weights)")

    finetune = container["finetune"] or {}
    check_keys(finetune, ["model_from_checkpoint", "block_size_factor"], "finetune")
    from_checkpoint = finetune.get("model_from_checkpoint")
    if not isinstance(from_checkpoint, bool):
        raise ConfigError(f"finetune.model_from_checkpoint={from_checkpoint!r} must be true or "
                          "false")
    if (finetune["model_from_checkpoint"] or finetune.get("block_size_factor") is not None) and (
            not container["init_from"] and not container["ckpt_path"]):
        raise ConfigError("finetune settings need a checkpoint to start from: set "
                          "init_from=<checkpoint or run folder>")

    optim = _from_mapping(OptimConfig, container["optim"] or {}, "optim")
    evaluation = _from_mapping(EvalConfig, container["eval"] or {}, "eval")

    check_keys(container["paths"], ["root", "output_dir", "cache_dir"], "paths")
    block_size = _check_task_and_data(container["task"] or {}, container["data"] or {})

    trainer = container["trainer"]
    max_steps = trainer.get("max_steps", -1)
    if _number(max_steps, "trainer.max_steps", integer=True) < 1:
        raise ConfigError(f"trainer.max_steps={max_steps} must be a positive number of optimizer "
                          "steps (the training loader is infinite; epochs do not end)")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if _number(accumulate, "trainer.accumulate_grad_batches", integer=True) < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} must be >= 1")
    interval = trainer.get("val_check_interval")
    if interval is not None:
        if _number(interval, "trainer.val_check_interval", integer=True) < 1:
            raise ConfigError(f"trainer.val_check_interval={interval} must be a positive number "
                              "of batches (the training loader has no epochs)")
        # Checkpoints are written after validation; one written mid-accumulation would lose the
        # partial gradient, and a resumed run would no longer match an uninterrupted one.
        if interval % accumulate:
            raise ConfigError(f"trainer.val_check_interval={interval} must be a multiple of "
                              f"trainer.accumulate_grad_batches={accumulate}")
    if trainer.get("check_val_every_n_epoch", None) is not None:
        raise ConfigError("trainer.check_val_every_n_epoch must be null: the training loader "
                          "is infinite, validation runs every trainer.val_check_interval batches")

    # The model and PE config, with the configured vocabulary standing in for the tokenizer's.
    model_config(cfg)

    # Last, as they import their targets (Lightning takes seconds to import).
    check_target_kwargs(trainer, "trainer")
    logger = container["logger"] or {}
    if logger:
        check_target_kwargs(logger, "logger")
    for name, node in (container["callbacks"] or {}).items():
        if node is not None:
            check_target_kwargs(node, f"callbacks.{name}")

    return RunSettings(optim=optim, eval=evaluation, max_steps=max_steps,
                       accumulate_grad_batches=accumulate, block_size=block_size)
