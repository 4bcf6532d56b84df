"""End-of-run perplexity at multiples of the training length: does the encoding extrapolate?

A thin layer over `evaluation.perplexity_at_length` (blocks protocol: non-overlapping
blocks, every token of the split scored once, token-weighted, as in the BiPE paper): it picks
the lengths, turns a length the model cannot run into a table row instead of a crash, and
formats the table `train.py` prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bipe.errors import BipeError
from evaluation import perplexity_at_length
from training.messages import first_line

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class LengthRow:
    """Perplexity at `multiple` x the training length; `ppl` None (and a `note`) if not run."""

    multiple: int
    length: int
    blocks: int = 0
    tokens: int = 0
    loss: float | None = None
    ppl: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_lengths(model: nn.Module, datamodule: Any, block_size: int,
                     multiples: Sequence[int], *, split: str = "validation",
                     tokens_per_batch: int, batch_size: int | None = None,
                     max_blocks: int | None = None, device: torch.device | str = "cpu",
                     precision: str | None = None) -> list[LengthRow]:
    """Perplexity of `model` on `split` at `multiple * block_size` tokens for each multiple.

    `batch_size` blocks per batch, or None for about `tokens_per_batch` tokens per batch;
    `max_blocks` caps the blocks per length (None: the whole split); `precision` is the
    trainer's (`bf16-mixed` evaluates under bf16 autocast like training). A length the model
    cannot run (a learned token table past its rows) gets `ppl=None` and the reason.
    """
    ids, boundary = datamodule.split_arrays(split)
    autocast_dtype = AUTOCAST_DTYPES.get(str(precision))
    was_training = model.training
    model.eval()
    rows = []
    try:
        for multiple in multiples:
            length = multiple * block_size
            row = LengthRow(multiple=multiple, length=length)
            rows.append(row)
            end = len(ids) if max_blocks is None else min(len(ids), max_blocks * length + 1)
            try:
                result = perplexity_at_length(
                    model, ids[:end], boundary[:end], length, protocol="blocks",
                    batch_size=batch_size or max(1, tokens_per_batch // length), device=device,
                    autocast_dtype=autocast_dtype)
            except BipeError as exc:  # e.g. a learned token table cannot extrapolate
                row.note = first_line(exc)
                continue
            row.blocks, row.tokens = result.windows, result.tokens
            row.loss, row.ppl = result.nll, result.ppl
    finally:
        model.train(was_training)
    return rows


def format_table(rows: Sequence[LengthRow], title: str) -> str:
    """A plain-text table: length, multiple, blocks, tokens, loss, perplexity."""
    lines = [title, f"{'length':>8} {'x':>3} {'blocks':>7} {'tokens':>9} {'loss':>7} {'ppl':>10}"]
    for r in rows:
        if r.ppl is None:
            lines.append(f"{r.length:>8} {r.multiple:>3} {'-':>7} {'-':>9} {'-':>7} {'n/a':>10}"
                         f"  ({r.note})")
        else:
            lines.append(f"{r.length:>8} {r.multiple:>3} {r.blocks:>7} {r.tokens:>9} "
                         f"{r.loss:>7.4f} {r.ppl:>10.2f}")
    return "\n".join(lines)
