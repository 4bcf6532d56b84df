"""Data pipeline: source -> segmenter -> tokenizer -> packer -> LMDataModule.

`from data import LMDataModule` is the entry point (see `data.datamodule`). The submodules are
small and importable on their own (`data.segment`, `data.sources`, ...); importing this package
does not import Lightning until `LMDataModule` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import SEGMENTERS, SOURCES, DataConfig

if TYPE_CHECKING:
    from .datamodule import LMDataModule

__all__ = ["SEGMENTERS", "SOURCES", "DataConfig", "LMDataModule"]


def __getattr__(name: str) -> Any:
    # Lazy: Lightning/torch load only for code that needs the DataModule.
    if name == "LMDataModule":
        from .datamodule import LMDataModule

        return LMDataModule
    raise AttributeError(f"module 'data' has no attribute {name!r}")
