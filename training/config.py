"""The run config's schema: Hydra structured configs, checked at composition and before any work.

`register_configs()` (called by `train.py` before Hydra composes) stores the dataclasses of every
layer in Hydra's ConfigStore: `TrainConfig` is the schema of `conf/train.yaml`, so the `pe`,
`model`, `optim`, `eval`, `finetune` and `paths` nodes are typed; each `conf/data/*.yaml` and
`conf/task/*.yaml` extends its own schema (`schema/data/text`, `schema/data/generated`,
`schema/task/<task>`).
A misspelled key (`+optim.lrr=1`) or a mistyped value (`optim.lr=abc`) therefore fails while the
config is composed. `validate_config` then builds the objects (each dataclass checks its values
in `__post_init__`), checks what spans several keys, and the `_target_` nodes (trainer, logger,
callbacks) against their signatures. Every error is one line naming the key.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bipe.config import PEConfig, build
from bipe.errors import ConfigError, first_line
from data.config import register_data_schema
from evaluation.config import PathsConfig
from models.config import DecoderShape, ModelConfig
from tasks import Task, get_task, load_all
from tasks.base import GeneratedDataConfig
from training.schedule import SCHEDULES
from training.study import StudyConfig, run_folder_name


def _number(value: Any, key: str, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r} must be {kind}")
    return value


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`optim.*`); weight decay on matrices and embeddings
    only (p.dim() >= 2). The defaults of every run."""

    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 30  # linear warmup, then `schedule` down to min_lr_ratio * lr
    schedule: str = "cosine"  # cosine | linear | polynomial | constant
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
class LengthEvalConfig:
    """End-of-run perplexity at multiples of the training length (`eval.*`, task=lm)."""

    lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # x data.block_size
    split: str = "validation"
    batch_size: int | None = None  # blocks per batch; None: the training batch's token count
    max_blocks: int | None = None  # per length; None: every block of the split

    def __post_init__(self) -> None:
        if not isinstance(self.lengths, list) or not self.lengths or not all(
                _number(m, "eval.lengths", integer=True) >= 1 for m in self.lengths):
            raise ConfigError(f"eval.lengths={self.lengths} must be a list of positive integers "
                              "(multiples of data.block_size)")
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"eval.split={self.split!r}; choose train, validation or test")
        for key in ("batch_size", "max_blocks"):
            value = getattr(self, key)
            if value is not None and _number(value, f"eval.{key}", integer=True) < 1:
                raise ConfigError(f"eval.{key}={value} must be a positive integer or null")


@dataclass
class FinetuneConfig:
    """`finetune.*`, with `init_from` (experiment=yarn_finetune sets these)."""

    model_from_checkpoint: bool = False  # the checkpoint's model and pe; only the scaling is ours
    block_size_factor: float | None = None  # train on blocks of this x the checkpoint's

    def __post_init__(self) -> None:
        factor = self.block_size_factor
        if factor is not None and (isinstance(factor, bool) or _number(
                factor, "finetune.block_size_factor") < 1):
            raise ConfigError(f"finetune.block_size_factor={factor!r} must be a number >= 1 "
                              "or null")


@dataclass
class ExtrasConfig:
    """`extras.*`: conveniences around a run."""

    print_config: bool = True  # print the composed config as a tree when the run starts


@dataclass
class TrainConfig:
    """The schema of `conf/train.yaml`; groups whose shape varies (data, task, trainer, logger,
    callbacks) are untyped here and typed by their own files' schemas or by `_target_`."""

    seed: int = 0
    tags: list[str] = field(default_factory=list)  # given to the logger (W&B run tags)
    # torch.compile the model (checkpoints stay plain: they load compiled or not); None: on
    # where it pays (GPUs), off on CPUs, where compiling costs more than a short run saves
    compile: bool | None = None
    optimized_metric: str | None = None
    ckpt_path: str | None = None
    init_from: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: LengthEvalConfig = field(default_factory=LengthEvalConfig)
    pe: PEConfig = field(default_factory=PEConfig)
    model: DecoderShape = field(default_factory=DecoderShape)
    data: Any = None
    task: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)
    study: StudyConfig = field(default_factory=StudyConfig)  # training/study.py


def short_dirname(name: str, limit: int = 120) -> str:
    """A sweep job's folder name (`conf/hydra/default.yaml`: `<num>_${bipe.dirname:<overrides>}`).

    Characters other than letters, digits and `._,=+-` become `_` (an override value such as
    `../x` must not climb out of the sweep folder). File systems cap a name at 255 bytes and a
    job with a dozen overrides passes that: names longer than `limit` characters become their
    first characters + `~` + a hash of the whole string, so they stay unique.
    """
    safe = "".join(c if c.isalnum() or c in "._,=+-" else "_" for c in name).replace("..", "__")
    if len(safe) <= limit and safe == name:
        return name
    return f"{safe[: limit - 11]}~{hashlib.sha1(name.encode()).hexdigest()[:10]}"


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore and the `bipe.dirname` resolver (idempotent);
    call before composing."""
    if not OmegaConf.has_resolver("bipe.dirname"):
        OmegaConf.register_new_resolver("bipe.dirname", short_dirname)
    if not OmegaConf.has_resolver("bipe.study_run"):
        OmegaConf.register_new_resolver("bipe.study_run", run_folder_name)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    register_data_schema()
    cs.store(group="schema/data", name="generated", node=GeneratedDataConfig, package="data")
    for name, task in load_all().items():
        cs.store(group="schema/task", name=name, node=task.config, package="task")


@dataclass
class RunSettings:
    """The typed part of the config that the training code reads."""

    optim: OptimConfig
    eval: LengthEvalConfig
    task: Task
    max_steps: int
    accumulate_grad_batches: int
    block_size: int


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown config key {key}; {hint}valid keys here: {', '.join(valid)}")


def check_target_kwargs(node: Mapping[str, Any], prefix: str) -> None:
    """Check a `_target_` config's keys against the target's signature (before instantiating it)."""
    target = node.get("_target_")
    if not isinstance(target, str):
        raise ConfigError(f"{prefix}._target_ is missing: name the class or function to build")
    try:
        from hydra.utils import get_object  # lazy: imports the target's module

        obj: Callable[..., Any] = get_object(target)
    except Exception as exc:  # hydra wraps import errors in several types
        raise ConfigError(f"{prefix}._target_={target!r} cannot be imported: "
                          f"{first_line(exc)}") from None
    params = inspect.signature(obj).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
    for key in node:
        if not str(key).startswith("_") and key not in valid:
            raise _unknown_key_error(f"{prefix}.{key}", valid)


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The whole run config resolved into plain Python; ConfigError naming a bad interpolation."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{key or 'config'}: {first_line(exc)}") from None
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return container


def validate_config(cfg: DictConfig) -> RunSettings:
    """Check the whole run config; raise `ConfigError` naming the first bad key.

    Keys and types were checked when Hydra composed the config against the schemas; here each
    section is built into its dataclass (values), then what spans sections, then the `_target_`
    configs, whose signatures need their modules imported.
    """
    run = plain(cfg)
    for key in TrainConfig.__dataclass_fields__:
        if key not in run:
            raise ConfigError(f"config key {key} is missing (conf/train.yaml sets it)")
    unknown = [k for k in run if k not in TrainConfig.__dataclass_fields__]
    if unknown:
        raise _unknown_key_error(unknown[0], list(TrainConfig.__dataclass_fields__))
    _number(run["seed"], "seed", integer=True)
    if run["seed"] < 0:
        raise ConfigError(f"seed={run['seed']} must be >= 0")
    if run["compile"] is not None and not isinstance(run["compile"], bool):
        raise ConfigError(f"compile={run['compile']!r} must be true, false or null (auto)")
    metric = run["optimized_metric"]
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ConfigError(f"optimized_metric={metric!r} must be a metric name such as val/loss "
                          "(see a run's metrics.json) or null")
    for key in ("ckpt_path", "init_from"):
        if run[key] is not None and not isinstance(run[key], str):
            raise ConfigError(f"{key}={run[key]!r} must be a path or null")
    if run["ckpt_path"] and run["init_from"]:
        raise ConfigError("set only one of ckpt_path (resume a run exactly) and init_from "
                          "(start a new run from its weights)")
    finetune = build(FinetuneConfig, run["finetune"] or {}, "finetune")
    if (finetune.model_from_checkpoint or finetune.block_size_factor is not None) and (
            not run["init_from"] and not run["ckpt_path"]):
        raise ConfigError("finetune settings need a checkpoint to start from: set "
                          "init_from=<checkpoint or run folder>")
    optim = build(OptimConfig, run["optim"] or {}, "optim")
    evaluation = build(LengthEvalConfig, run["eval"] or {}, "eval")
    build(PathsConfig, run["paths"] or {}, "paths")
    build(ExtrasConfig, run["extras"] or {}, "extras")
    build(StudyConfig, run["study"] or {}, "study")
    if not isinstance(run["tags"], list) or not all(isinstance(t, str) for t in run["tags"]):
        raise ConfigError(f"tags={run['tags']!r} must be a list of strings")
    task_node = run["task"] or {}
    task = get_task(task_node.get("name"))(task_node)
    block_size = task.check_data(run["data"] or {})

    trainer = run["trainer"] or {}
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

    model_config(run)  # the model and PE config, with the configured vocabulary standing in
    check_randomized(run["pe"], block_size)

    # Last, as they import their targets (Lightning takes seconds to import).
    check_target_kwargs(trainer, "trainer")
    logger = run["logger"] or {}
    if logger:
        check_target_kwargs(logger, "logger")
    for name, node in (run["callbacks"] or {}).items():
        if node is not None:
            check_target_kwargs(node, f"callbacks.{name}")

    return RunSettings(optim=optim, eval=evaluation, task=task, max_steps=max_steps,
                       accumulate_grad_batches=accumulate, block_size=block_size)


def check_randomized(pe: Mapping[str, Any], block_size: int) -> None:
    """Randomized positions (`pe.randomized_max`) must cover the training length, and a learned
    token table must have a row for every position they can draw; else ConfigError."""
    randomized = pe.get("randomized_max")
    if randomized is None:
        return
    if randomized < block_size:
        raise ConfigError(f"pe.randomized_max={randomized} is less than data.block_size="
                          f"{block_size}: positions are drawn without replacement from [0, "
                          "pe.randomized_max); set it to at least the longest sequence evaluated")
    absolute = pe["absolute"]
    if (absolute["type"] == "learned" and absolute["index"] == "token"
            and absolute["max_positions"] < randomized):
        raise ConfigError(f"pe.absolute.max_positions={absolute['max_positions']} rows cannot "
                          f"hold positions drawn from [0, pe.randomized_max={randomized}); set "
                          f"pe.absolute.max_positions={randomized}")


def model_config(run: Mapping[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """`ModelConfig` from the resolved run config's `model` and `pe`.

    `model.vocab_size: null` takes the tokenizer's size; a larger value pads the embedding (e.g.
    to a multiple of 64), a smaller one is an error. Without `vocab_size` (before the data is
    built) the configured tokenizer size stands in, so shape errors surface before data work.
    """
    model = dict(run["model"])
    configured = model.get("vocab_size")
    if vocab_size is None:
        vocab_size = configured or ((run.get("data") or {}).get("tokenizer") or {}).get(
            "vocab_size") or 2
    elif configured is not None and configured < vocab_size:
        raise ConfigError(f"model.vocab_size={configured} is smaller than the tokenizer's "
                          f"{vocab_size} tokens; leave it null to use the tokenizer's size")
    model["vocab_size"] = configured or vocab_size
    return ModelConfig.from_dict({**model, "pe": run["pe"]})
