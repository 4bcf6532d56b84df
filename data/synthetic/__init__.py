"""Synthetic reasoning tasks: chain-of-thought arithmetic mod 11 and the Bi-NFA.

`data.synthetic.arithmetic` and `data.synthetic.bi_nfa` are the generators (each with a command
line); `data.synthetic.datamodule.SyntheticDataModule` serves them to training like
`data.LMDataModule`; `data.synthetic.metrics` scores a model on them. Importing this package does
not import Lightning until `SyntheticDataModule` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .datamodule import SyntheticDataModule

__all__ = ["SyntheticDataModule"]


def __getattr__(name: str) -> Any:
    # Lazy: the command-line generators should not pay for Lightning.
    if name == "SyntheticDataModule":
        from .datamodule import SyntheticDataModule

        return SyntheticDataModule
    raise AttributeError(f"module 'data.synthetic' has no attribute {name!r}")
