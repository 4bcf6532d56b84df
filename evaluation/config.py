"""The schema of `conf/eval.yaml`: every key of an evaluation typed, defaulted and checked.

As for training (`training.config`), the dataclasses are Hydra structured configs: a misspelled
or mistyped key fails while the config is composed, and `__post_init__` checks each value when
`validate_eval_config` builds them; every error is one line naming the key (`eval.lengths`,
`eval.passkey.depths`, `device`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bipe.config import HF_SCALING_KEYS, build, normalize_scaling
from bipe.errors import ConfigError, first_line
from data.config import register_data_schema

PROTOCOLS = ("blocks", "sliding")
LENGTH_UNITS = ("multiple", "tokens")
PRECISIONS = ("32", "bf16")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _positive(key: str, value: Any, *, integer: bool = True, allow_none: bool = False,
              zero: bool = False) -> None:
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < (0 if zero else 1):
        what = "an integer" if integer else "a number"
        bound = ">= 0" if zero else ">= 1"
        raise ConfigError(f"{key}={value!r} must be {what} {bound}"
                          + (" or null" if allow_none else ""))


def _number_list(key: str, values: Any, *, integer: bool, lo: float, hi: float | None = None
                 ) -> None:
    kinds = (int,) if integer else (int, float)
    if not isinstance(values, list) or not values or any(
            isinstance(v, bool) or not isinstance(v, kinds) or v < lo or (hi is not None and v > hi)
            for v in values):
        bound = f">= {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
        raise ConfigError(f"{key}={values!r} must be a non-empty list of "
                          f"{'integers' if integer else 'numbers'} {bound}")


@dataclass
class LMInfiniteSettings:
    """`eval.lm_infinite`: Lambda-shaped attention with a distance cap (docs/methods.md 4)."""

    enabled: Any = False  # false | true | both
    n_global: int = 100  # LM-Infinite's setting for perplexity (10 for passkey)
    n_local: int | None = None  # None: the training length
    distance_cap: int | None = None  # None: training length; for BiPE the most segments per block

    def __post_init__(self) -> None:
        if self.enabled not in (True, False, "both"):
            raise ConfigError(f"eval.lm_infinite.enabled={self.enabled!r}: choose true, false "
                              "or both")
        _positive("eval.lm_infinite.n_global", self.n_global, zero=True)
        _positive("eval.lm_infinite.n_local", self.n_local, allow_none=True)
        _positive("eval.lm_infinite.distance_cap", self.distance_cap, allow_none=True)


@dataclass
class PasskeySettings:
    """`eval.passkey`: retrieval of a key hidden at a depth of a filler prompt."""

    enabled: bool = False
    lengths: list[float] = field(default_factory=lambda: [1, 2, 4])  # in eval.length_unit
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5

    def __post_init__(self) -> None:
        _number_list("eval.passkey.lengths", self.lengths, integer=False, lo=1e-9)
        _number_list("eval.passkey.depths", self.depths, integer=False, lo=0.0, hi=1.0)
        _positive("eval.passkey.trials", self.trials)


@dataclass
class GenerationSettings:
    """`eval.generation`: greedy continuations at long prefixes, BLEU and ROUGE."""

    enabled: bool = False
    prefix_lengths: list[float] = field(default_factory=lambda: [1, 2, 4])
    new_tokens: int = 100
    samples: int = 4

    def __post_init__(self) -> None:
        _number_list("eval.generation.prefix_lengths", self.prefix_lengths, integer=False,
                     lo=1e-9)
        _positive("eval.generation.new_tokens", self.new_tokens)
        _positive("eval.generation.samples", self.samples)


@dataclass
class EvalSettings:
    """`eval.*` (conf/eval.yaml says what each key does)."""

    lengths: list[float] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    length_unit: str = "multiple"  # multiple (of each model's training length) | tokens
    datasets: list[str] = field(default_factory=lambda: ["train", "python_code"])
    split: str = "test"
    protocol: str = "blocks"  # blocks | sliding
    stride: int | None = None  # sliding: step between windows (None: half the length)
    max_tokens: int | None = 65536  # score the first N tokens of each stream at every length
    batch_tokens: int = 16384  # tokens per forward batch
    precision: str = "32"  # 32 | bf16
    chunk_size: int | None = 1024  # full attention in query chunks
    rope_scaling: Any = None  # a mapping, e.g. {type: yarn, factor: 4} (HF keys too)
    lm_infinite: LMInfiniteSettings = field(default_factory=LMInfiniteSettings)
    passkey: PasskeySettings = field(default_factory=PasskeySettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        self.lm_infinite = build(LMInfiniteSettings, self.lm_infinite, "eval.lm_infinite")
        self.passkey = build(PasskeySettings, self.passkey, "eval.passkey")
        self.generation = build(GenerationSettings, self.generation, "eval.generation")
        if self.length_unit not in LENGTH_UNITS:
            raise ConfigError(f"eval.length_unit={self.length_unit!r} is unknown; choose one of "
                              f"{', '.join(LENGTH_UNITS)}")
        _number_list("eval.lengths", self.lengths, integer=self.length_unit == "tokens",
                     lo=1 if self.length_unit == "tokens" else 1e-9)
        if not isinstance(self.datasets, list) or not self.datasets or not all(
                isinstance(d, str) and d for d in self.datasets):
            raise ConfigError(f"eval.datasets={self.datasets!r} must be a non-empty list of "
                              "corpus names (train = the checkpoint's own, or conf/data names)")
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"eval.split={self.split!r}; choose train, validation or test")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol={self.protocol!r} is unknown; choose one of "
                              f"{', '.join(PROTOCOLS)}")
        _positive("eval.stride", self.stride, allow_none=True)
        _positive("eval.max_tokens", self.max_tokens, allow_none=True)
        _positive("eval.batch_tokens", self.batch_tokens)
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(f"eval.precision={self.precision!r} is unknown; choose one of "
                              f"{', '.join(PRECISIONS)}")
        _positive("eval.chunk_size", self.chunk_size, allow_none=True)
        if self.rope_scaling is not None:  # original_max_position: each checkpoint's, later
            probe = {HF_SCALING_KEYS.get(k, k): v for k, v in self.rope_scaling.items()}
            if probe.get("original_max_position") is None:
                probe["original_max_position"] = 1
            normalize_scaling(probe, "eval.rope_scaling")


@dataclass
class PathsConfig:
    """`paths.*` (conf/paths/default.yaml), shared by training and evaluation."""

    root: str = "."
    output_dir: str = "."
    cache_dir: str = "~/.cache/bipe"


@dataclass
class EvalRunConfig:
    """The schema of `conf/eval.yaml`."""

    ckpt_path: str | None = None  # one checkpoint: a .ckpt, a run folder or a saved folder
    ckpt: str | None = None  # the same (older name)
    ckpts: list[str] = field(default_factory=list)
    sweep_dir: str | None = None  # every run of a sweep
    labels: list[str] | None = None
    seed: int = 0
    tags: list[str] = field(default_factory=list)  # given to the W&B run
    device: str = "auto"  # auto (cuda if available) | cpu | cuda[:n] | mps
    eval: EvalSettings = field(default_factory=EvalSettings)
    logger: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        self.eval = build(EvalSettings, self.eval, "eval")
        if self.ckpt_path is not None and self.ckpt is not None and self.ckpt_path != self.ckpt:
            raise ConfigError("ckpt_path and ckpt name the same thing; give one of them")
        for key in ("ckpt_path", "ckpt", "sweep_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{key}={value!r} must be a path")
        if not DEVICE.match(str(self.device)):
            raise ConfigError(f"device={self.device!r} is unknown; choose auto, cpu, cuda, "
                              "cuda:<n> or mps")
        _positive("seed", self.seed, zero=True)


def register_eval_configs() -> None:
    """Store the evaluation schema, and the corpus schema `eval.datasets` compose with, in
    Hydra's ConfigStore; call before composing."""
    ConfigStore.instance().store(name="eval_schema", node=EvalRunConfig)
    register_data_schema()


def validate_eval_config(cfg: DictConfig) -> EvalRunConfig:
    """Every key and value of an evaluation checked; ConfigError naming the first bad one."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{key or 'config'}: {first_line(exc)}") from None
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return build(EvalRunConfig, container, "")
