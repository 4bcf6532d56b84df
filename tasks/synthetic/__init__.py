"""Synthetic reasoning tasks: chain-of-thought arithmetic mod 11 and the Bi-NFA.

`tasks.synthetic.arithmetic` and `tasks.synthetic.bi_nfa` are the generators (each with a command
line); `tasks.synthetic.datamodule.SyntheticDataModule` serves them to training like
`data.LMDataModule`; `tasks.synthetic.metrics` scores a model on them. Importing this package does
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
    raise AttributeError(f"module 'tasks.synthetic' has no attribute {name!r}")
