"""Typed, validated view of the Hydra `data` config group.

`DataConfig` is the schema of the `data` config group (a Hydra structured config: an unknown or
mistyped key fails when the config is composed) and the object the pipeline reads. Its checks
run when it is built (`__post_init__`); each raises a one-line `ConfigError` that names the
offending `data.*` key and says what would be valid, so `train.py` can print it and exit with
status 2 before any work is done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bipe.config import build
from bipe.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("shakespeare", "python_code", "pg19", "pile", "text_files")
SEGMENTERS: tuple[str, ...] = ("punkt", "lines", "separators", "fixed", "none")
SEPARATOR_MATCHES: tuple[str, ...] = ("exact", "contains")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_ALIASES: dict[str, str] = {"val": "validation", "valid": "validation", "dev": "validation"}

# Byte-level BPE needs the 256 byte tokens plus the end-of-document token.
MIN_VOCAB_SIZE = 257


CACHE_ENV = "BIPE_CACHE"  # the one variable that moves every cache (conf/paths reads it too)


def default_cache_dir() -> str:
    """`$BIPE_CACHE` or `~/.cache/bipe`: where caches go when the config names none."""
    return os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "bipe")


def canonical_split(split: str) -> str:
    """'val' -> 'validation'; raises ConfigError for names that are no split."""
    name = SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return name


@dataclass
class TokenizerConfig:
    """`data.tokenizer`: train a byte-level BPE of `vocab_size`, or load `path` (tokenizer.json)."""

    vocab_size: int = 8192
    path: str | None = None
    eod_token: str = "<|endoftext|>"


@dataclass
class DataConfig:
    """The resolved `data` config; see conf/data/*.yaml for what each key means."""

    name: str = "shakespeare"
    segmenter: str = "punkt"
    block_size: int = 256
    batch_size: int = 16  # blocks per optimizer step, split across devices and accumulation
    num_workers: int = 0  # DataLoader worker processes
    pack_workers: int | None = None  # processes that tokenize and segment a new cache (None: CPUs)
    pin_memory: bool | None = None  # None: pin when CUDA is available
    cache_dir: str = field(default_factory=default_cache_dir)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # segmenter options
    newline_boundaries: bool = True  # punkt: every newline also ends a segment
    separators: list[str] = field(default_factory=lambda: ["\n", " ."])  # tokens that end segments
    separator_match: str = "exact"  # exact: token == separator; contains: separator in token
    separator_ids: list[int] | None = None  # explicit ids (e.g. LLaMA 13, 869); wins
    segment_length: int = 64  # fixed: a boundary every `segment_length` tokens
    # splits
    validation_plays: list[str] = field(default_factory=list)  # shakespeare: held-out play stems
    test_plays: list[str] = field(default_factory=list)
    validation_fraction: float = 0.02  # python_code / text_files: hash split fractions
    test_fraction: float = 0.02
    # text_files
    glob: str | None = None
    train_glob: str | None = None
    validation_glob: str | None = None
    test_glob: str | None = None
    text_key: str = "text"
    # python_code
    stdlib_path: str | None = None  # None: sysconfig.get_paths()['stdlib']
    # pg19 / pile (Hugging Face datasets, streamed)
    hf_path: str | None = None
    hf_name: str | None = None
    hf_revision: str | None = None
    hf_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    subset: str | None = None  # pile: keep documents whose meta.pile_set_name equals this
    max_train_documents: int | None = 20000
    max_eval_documents: int | None = 500
    max_train_chars: int | None = 200_000_000
    max_eval_chars: int | None = 20_000_000
    hf_data_files: Any = None  # {split: file(s)} for local builders (json, text); a mapping
    streaming: bool = False  # pg19/pile: stream the whole train split (caps: tokenizer/eval only)
    shuffle_buffer: int = 10_000  # streaming: documents in the seeded shuffle buffer

    def __post_init__(self) -> None:
        self.tokenizer = build(TokenizerConfig, self.tokenizer or {}, "data.tokenizer")
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()
        if self.hf_splits is None:
            self.hf_splits = {s: s for s in SPLITS}
        for key in ("separators", "validation_plays", "test_plays"):
            value = getattr(self, key)
            setattr(self, key, [] if value is None else [value] if isinstance(value, str)
                    else list(value))
        if self.separator_ids is not None:
            self.separator_ids = [int(i) for i in self.separator_ids]
        self.validate()

    @classmethod
    def from_dict(cls, cfg: Any) -> DataConfig:
        """Build from a plain mapping or an OmegaConf DictConfig; ConfigError names bad keys."""
        return build(cls, _to_plain_dict(cfg), "data")

    # -- validation -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid `data.*` key."""
        if self.name not in SOURCES:
            raise ConfigError(
                f"data.name={self.name!r} is not a data source; valid: {', '.join(SOURCES)} "
                f"(choose one with data=<name>)"
            )
        if self.segmenter not in SEGMENTERS:
            raise ConfigError(
                f"data.segmenter={self.segmenter!r} is not a segmenter; valid: "
                f"{', '.join(SEGMENTERS)}"
            )
        _check_int("data.block_size", self.block_size, 2, "blocks need at least 2 input tokens")
        _check_int("data.batch_size", self.batch_size, 1)
        _check_int("data.num_workers", self.num_workers, 0)
        if self.pack_workers is not None:
            _check_int("data.pack_workers", self.pack_workers, 1)
        _check_int("data.segment_length", self.segment_length, 1)
        _check_int(
            "data.tokenizer.vocab_size",
            self.tokenizer.vocab_size,
            MIN_VOCAB_SIZE,
            "a byte-level BPE needs 256 byte tokens plus <|endoftext|>",
        )
        if self.tokenizer.vocab_size > 2**32 - 1:
            raise ConfigError("data.tokenizer.vocab_size must be below 2**32")
        if not self.tokenizer.eod_token:
            raise ConfigError("data.tokenizer.eod_token must be a non-empty string")
        if self.separator_match not in SEPARATOR_MATCHES:
            raise ConfigError(
                f"data.separator_match={self.separator_match!r}; valid: "
                f"{', '.join(SEPARATOR_MATCHES)}"
            )
        if not all(isinstance(s, str) and s for s in self.separators):
            raise ConfigError(f"data.separators must be non-empty strings, got {self.separators!r}")
        if self.segmenter == "separators" and not self.separators:
            raise ConfigError(
                "data.separators is empty; data.segmenter=separators needs at least one"
            )
        for key in ("validation_fraction", "test_fraction"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"data.{key}={v!r} must be a number in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError(
                "data.validation_fraction + data.test_fraction must be below 1 "
                f"(got {self.validation_fraction} + {self.test_fraction})"
            )
        if "${" in str(self.cache_dir):
            raise ConfigError(
                f"data.cache_dir={self.cache_dir!r} is an unresolved interpolation; pass the "
                "resolved config (OmegaConf.to_container(cfg, resolve=True))"
            )
        limits = ("max_train_documents", "max_eval_documents", "max_train_chars", "max_eval_chars")
        for key in limits:
            v = getattr(self, key)
            if v is not None:
                _check_int(f"data.{key}", v, 1)
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise ConfigError(f"data.pin_memory={self.pin_memory!r} must be true, false or null")
        if not isinstance(self.newline_boundaries, bool):
            raise ConfigError(f"data.newline_boundaries={self.newline_boundaries!r} must be a bool")
        if not self.text_key:
            raise ConfigError("data.text_key must name the JSON field that holds the text")
        if not isinstance(self.streaming, bool):
            raise ConfigError(f"data.streaming={self.streaming!r} must be true or false")
        if self.streaming and self.name not in ("pg19", "pile"):
            raise ConfigError(f"data.streaming=true reads a Hugging Face dataset; data={self.name} "
                              "is read whole (use data=pg19 or data=pile)")
        _check_int("data.shuffle_buffer", self.shuffle_buffer, 1)
        if self.hf_data_files is not None and not isinstance(self.hf_data_files, Mapping):
            raise ConfigError(f"data.hf_data_files={self.hf_data_files!r} must map split names "
                              "to file(s), or be null")

    @property
    def cache_root(self) -> str:
        """The cache directory with `~` expanded."""
        return os.path.abspath(os.path.expanduser(str(self.cache_dir)))


def _check_int(key: str, value: Any, minimum: int, why: str = "") -> None:
    """ConfigError unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f" ({why})" if why else ""
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}{hint}")


def _to_plain_dict(cfg: Any) -> dict[str, Any]:
    """Mapping or DictConfig -> plain dict with interpolations resolved."""
    if cfg is None:
        return {}
    if isinstance(cfg, DataConfig):
        raise TypeError("already a DataConfig")
    try:  # DictConfig without a hard dependency at import time
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a requirement
        pass
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the data config must be a mapping, got {type(cfg).__name__}")
    return {str(k): v for k, v in cfg.items()}


def register_data_schema() -> None:
    """Store `DataConfig` as `schema/data/text` in Hydra's ConfigStore, the schema every corpus
    config (`conf/data/*.yaml`) names first; `train.py` and `eval.py` both compose those."""
    from hydra.core.config_store import ConfigStore  # lazy: only callers that compose need Hydra

    ConfigStore.instance().store(group="schema/data", name="text", node=DataConfig,
                                 package="data")
