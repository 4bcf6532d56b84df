"""What a task is: the data a model trains on and how it is scored, behind one interface.

A task is a class registered in `tasks.TASKS` under its name (`task.name` in the config). It
declares

* `config`: the dataclass of its `task.*` keys: the Hydra structured config that checks a run's
  `task` node (an unknown or mistyped key fails at composition; values in `__post_init__`);
* `trains`: which Lightning module trains it: `"language_model"` (next-token loss on text,
  perplexity against length at the end) or `"sequence"` (per-setting validation and test with the
  task's own `score`);
* `main_metric`: the headline rate of its reports (`tasks.scoring.RATES`);
* `check_data(data)`: the `data` node it reads, checked; returns the block size (the length a
  learned position table must cover);
* `datamodule(...)`: the prepared Lightning data module.

Adding a task is a new module here (a registered subclass, listed in `tasks.TASK_MODULES`) plus a
`conf/task/<name>.yaml`; `train.py` does not change.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bipe.config import build
from bipe.errors import ConfigError


def check_int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    """`value` if it is an integer in `lo..hi`; else ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
            hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{key}={value!r} must be an integer {bound}")
    return value


def check_int_list(key: str, value: Any, lo: int, length: int | None = None) -> list[int]:
    """`value` as a list of integers >= `lo` (of `length` items); else ConfigError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value or (
            length is not None and len(value) != length) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < lo for v in value):
        shape = f"a list of {length}" if length else "a non-empty list of"
        raise ConfigError(f"{key}={value!r} must be {shape} integers >= {lo}")
    return [int(v) for v in value]


@dataclass
class TaskConfig:
    """`task.*` keys every task has."""

    name: str = "lm"


class Task(ABC):
    """One task: its config, its data, how it is trained and scored (module docstring)."""

    name: ClassVar[str]
    config: ClassVar[type[TaskConfig]]
    trains: ClassVar[str] = "sequence"
    main_metric: ClassVar[str] = "accuracy"

    def __init__(self, cfg: Any) -> None:
        self.cfg = build(self.config, cfg, "task") if isinstance(cfg, Mapping) else cfg

    def plain_config(self) -> dict[str, Any]:
        """The task's config as a plain dict (for checkpoints and reports)."""
        return dataclasses.asdict(self.cfg)

    @abstractmethod
    def check_data(self, data: Mapping[str, Any]) -> int:
        """Check the run's `data` node for this task; return the block size."""

    @abstractmethod
    def datamodule(self, run: Any, start_meta: Mapping[str, Any] | None,
                   output_dir: Path) -> Any:
        """The prepared Lightning data module for a run (`run`: the resolved run config;
        `start_meta`: the `"bipe"` entry of the checkpoint the run starts from, if any)."""


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to `TASKS` under its `name`."""
    TASKS[cls.name] = cls
    return cls


@dataclass
class GeneratedDataConfig:
    """The `data` node of a task that brings its own sequences (conf/data/synthetic.yaml):
    nothing is read from disk; `block_size` only sizes the learned position tables that the pe
    configs take from `data.block_size`."""

    name: str = "generated"  # the task's (`${task.name}`): run folders read <pe>_<model>_<task>
    block_size: int = 256


@dataclass
class GeneratedTaskConfig(TaskConfig):
    """`task.*` keys of every task whose examples are generated on the fly."""

    batch_size: int = 64  # global batch (split across devices and accumulation)
    eval_batch_size: int = 256
    n_val: int = 256  # fixed examples per evaluation setting (validation and test each)
    val_seed: int = 1234  # evaluation sets do not depend on the training seed: runs share them
    num_workers: int = 0

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size", "n_val"):
            check_int(f"task.{key}", getattr(self, key), 1)
        check_int("task.val_seed", self.val_seed, 0)
        check_int("task.num_workers", self.num_workers, 0)


@dataclass(frozen=True)
class EvalSetting:
    """One evaluation set: its name (`ops_6`, `seg_16`) and how to draw one of its examples."""

    name: str
    draw: Any  # Callable[[random.Random], EncodedExample]


class GeneratedTask(Task):
    """A task whose examples a generator draws (arithmetic, Bi-NFA), served by
    `tasks.generated.SyntheticDataModule`: training examples from `train_example(rng)`, one fixed
    evaluation set per `eval_settings()` entry (in-distribution first), scored by `score`.
    Subclasses set `vocab`, `pad_id`, `bos_id`, `eod_id` and define the generator methods."""

    config: ClassVar[type[TaskConfig]] = GeneratedTaskConfig
    vocab: tuple[str, ...]
    pad_id: int
    bos_id: int
    eod_id: int

    @abstractmethod
    def train_example(self, rng: Any) -> Any:
        """One training example (an `EncodedExample`) drawn with `rng` (a `random.Random`)."""

    @abstractmethod
    def eval_settings(self) -> list[EvalSetting]:
        """The evaluation settings, in-distribution first."""

    @abstractmethod
    def key(self, example: Any) -> tuple[int, ...]:
        """What makes two examples the same question (held-out sets are kept out of training)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Plain numbers about the generated data (bounds, segments per sequence)."""

    @abstractmethod
    def score(self, model: Any, batch: dict[str, Any]) -> dict[str, float]:
        """The task's sums and counts on one evaluation batch (`tasks.scoring.RATES`)."""

    def check_data(self, data: Mapping[str, Any]) -> int:
        if data.get("name") != self.name:  # conf/data/synthetic.yaml: name: ${task.name}
            raise ConfigError(f"task={self.name} generates its own data, but data="
                              f"{data.get('name')} was chosen; drop the data= override (the "
                              "task selects data=synthetic)")
        return check_int("data.block_size", data.get("block_size"), 2)

    def datamodule(self, run: Any, start_meta: Mapping[str, Any] | None,
                   output_dir: Path) -> Any:
        """`SyntheticDataModule` with its evaluation sets drawn. A learned token-position table
        and randomized positions' range must cover the longest test sequence; a checkpoint to
        start from must share the task's vocabulary."""
        # lazy: the data module imports torch and Lightning; config checks must not wait for them
        from tasks.generated import SyntheticDataModule

        dm = SyntheticDataModule(self, seed=int(run["seed"]))
        dm.setup("fit")
        absolute = run["pe"]["absolute"]
        longest = dm.stats["eval_max_input_length"]
        randomized = run["pe"].get("randomized_max")
        if randomized is not None and randomized < longest:
            raise ConfigError(f"pe.randomized_max={randomized} cannot cover task={self.name}'s "
                              f"longest test sequence ({longest} tokens): positions are drawn "
                              f"from [0, pe.randomized_max) at test time too; set "
                              f"pe.randomized_max>={longest}")
        if (absolute["type"] == "learned" and absolute["index"] == "token"
                and absolute["max_positions"] < longest):
            raise ConfigError(f"pe.absolute.max_positions={absolute['max_positions']} rows cannot "
                              f"cover task={self.name}'s longest test sequence ({longest} "
                              f"tokens); set data.block_size>={longest}")
        if start_meta is not None and dm.tokenizer.to_str() != start_meta["tokenizer"]:
            raise ConfigError(f"the checkpoint this run starts from was trained on another "
                              f"vocabulary than task={self.name} with these settings; start from "
                              "a checkpoint of the same task")
        return dm
