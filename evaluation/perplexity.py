"""Perplexity against sequence length (docs/methods.md section 1, protocol of the BiPE paper): the
one computation (`perplexity_at_length`, `perplexity_rows`) and the one table (`format_ppl_table`,
with mean and 95% interval over the seeds of a group), for the end of a training run and for
`eval.py` alike.

`blocks`: the token stream is cut into non-overlapping blocks of `length` inputs; every token is
scored exactly once (the last, shorter block too), positions restart at every block, and the
perplexity is weighted by tokens. `sliding`: windows of `length` tokens every `stride` tokens;
each window scores only the targets the previous one did not, so again every token is scored
once, now with up to `length - stride` tokens of context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bipe.errors import BipeError, first_line
from evaluation.memory import track_peak_memory
from evaluation.stats import Spread


@dataclass
class LengthResult:
    """Perplexity at one evaluation length."""

    length: int
    tokens: int
    nll_sum: float
    windows: int
    seconds: float = 0.0
    peak_mib: float = 0.0
    # Summed NLL and counts by position inside the window (blocks protocol), for the curve.
    nll_by_position: np.ndarray | None = field(default=None, repr=False)
    count_by_position: np.ndarray | None = field(default=None, repr=False)

    @property
    def nll(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))

    def to_dict(self) -> dict:
        return {"length": self.length, "tokens": self.tokens, "nll": self.nll, "ppl": self.ppl,
                "windows": self.windows, "seconds": self.seconds, "peak_mib": self.peak_mib}


def scoring_windows(n: int, length: int, protocol: str, stride: int | None
             ) -> Iterator[tuple[int, int, int]]:
    """Yield `(start, end, first_scored)`: inputs `[start, end)`, targets `start+1 .. end`, of
    which those at input offsets `>= first_scored` are scored. `n` = tokens in the stream."""
    if protocol == "blocks":
        for start in range(0, n - 1, length):
            yield start, min(start + length, n - 1), 0
    elif protocol == "sliding":
        stride = stride or length // 2
        if not 0 < stride <= length:
            raise ValueError(f"eval.stride={stride} must be in (0, length={length}]")
        scored_until = 0  # targets up to this input index are scored already
        start = 0
        while scored_until < n - 1:
            end = min(start + length, n - 1)
            yield start, end, scored_until - start
            scored_until = end
            start += stride
            if start + length > n - 1:  # the last window ends at the stream's end
                start = max(0, n - 1 - length)
    else:
        raise ValueError(f"eval.protocol={protocol!r} is unknown; choose 'blocks' or 'sliding'")


@torch.no_grad()
def perplexity_at_length(model: nn.Module, ids: np.ndarray, boundary: np.ndarray | None,
                         length: int, *, protocol: str = "blocks", stride: int | None = None,
                         batch_size: int = 1, device: torch.device | str = "cpu",
                         autocast_dtype: torch.dtype | None = None) -> LengthResult:
    """Score the stream `ids` (int `[N]`, with `boundary` bool `[N]` or None) at one length."""
    n = len(ids)
    if n < 2:
        raise ValueError("the evaluation stream needs at least 2 tokens")
    device = torch.device(device)
    nll_sum, tokens, windows = 0.0, 0, 0
    by_pos = np.zeros(length, dtype=np.float64)
    count = np.zeros(length, dtype=np.int64)
    pending: list[tuple[int, int, int]] = []

    def run(group: list[tuple[int, int, int]]) -> None:
        nonlocal nll_sum, tokens, windows
        x = torch.stack([torch.from_numpy(np.array(ids[s:e], dtype=np.int64))
                         for s, e, _ in group]).to(device)
        y = torch.stack([torch.from_numpy(np.array(ids[s + 1:e + 1], dtype=np.int64))
                         for s, e, _ in group]).to(device)
        b = None
        if boundary is not None:
            b = torch.stack([torch.from_numpy(np.array(boundary[s:e], dtype=bool))
                             for s, e, _ in group]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(x, b)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        for row, (_, _, first) in enumerate(group):
            scored = nll[row, first:]
            nll_sum += float(scored.sum())
            tokens += scored.numel()
            if protocol == "blocks":
                by_pos[: scored.numel()] += scored.double().cpu().numpy()
                count[: scored.numel()] += 1
        windows += len(group)

    for window in scoring_windows(n, length, protocol, stride):
        # Only windows of one size share a batch (the last block is shorter).
        if pending and (window[1] - window[0] != pending[0][1] - pending[0][0]
                        or len(pending) == batch_size):
            run(pending)
            pending = []
        pending.append(window)
    if pending:
        run(pending)
    return LengthResult(length=length, tokens=tokens, nll_sum=nll_sum, windows=windows,
                        nll_by_position=by_pos if protocol == "blocks" else None,
                        count_by_position=count if protocol == "blocks" else None)


def perplexity_rows(model: nn.Module, ids: np.ndarray, boundary: np.ndarray | None,
                    lengths: list[int], *, base: dict[str, Any], protocol: str = "blocks",
                    stride: int | None = None, batch_size: int | None = None,
                    batch_tokens: int = 16384, device: torch.device | str = "cpu",
                    autocast_dtype: torch.dtype | None = None, track_memory: bool = False,
                    train_length: int | None = None, max_blocks: int | None = None,
                    on_row: Callable[[dict[str, Any]], None] | None = None
                    ) -> tuple[list[dict], LengthResult | None]:
    """One row per length: `base` plus the `LengthResult` (tokens, nll, ppl, windows, seconds,
    peak_mib) and `multiple` of `train_length`; `max_blocks` caps the blocks scored per length.
    A length the model cannot run (a learned token table past its rows) gets `ppl: None` and the
    reason in `note`, not an exception. `on_row` gets each row as soon as it is done (progress
    of a long evaluation). Also returns the result at the longest length (for its NLL by
    position)."""
    rows, longest = [], None
    was_training = model.training
    model.eval()
    try:
        for length in lengths:
            row: dict[str, Any] = {**base, "length": length, "train_length": train_length,
                                   "multiple": length / train_length if train_length else None}
            rows.append(row)
            batch = batch_size or max(1, batch_tokens // length)
            t0 = time.perf_counter()
            try:
                end = len(ids) if max_blocks is None else min(len(ids), max_blocks * length + 1)
                with track_peak_memory(device) if track_memory else nullcontext() as mem:
                    res = perplexity_at_length(model, ids[:end],
                                               None if boundary is None else boundary[:end],
                                               length, protocol=protocol,
                                               stride=stride, batch_size=batch, device=device,
                                               autocast_dtype=autocast_dtype)
            except BipeError as exc:  # e.g. a learned token table cannot extrapolate
                row.update(ppl=None, note=first_line(exc))
            else:
                res.seconds = time.perf_counter() - t0
                res.peak_mib = mem.peak_mib if mem is not None else 0.0
                row.update(res.to_dict())
                if length == max(lengths):
                    longest = res
            if on_row is not None:
                on_row(row)
    finally:
        model.train(was_training)
    return rows, longest


def describe_row(row: dict[str, Any]) -> str:
    """One `perplexity_rows` row as a progress line: length (and multiple), perplexity or why
    there is none, tokens scored, seconds."""
    multiple = f" ({row['multiple']:g}x)" if row.get("multiple") else ""
    if row.get("ppl") is None:
        return f"len {row['length']:6d}{multiple}  ppl n/a ({row.get('note', 'not measured')})"
    return (f"len {row['length']:6d}{multiple}  ppl {row['ppl']:9.2f}  "
            f"({row.get('tokens', 0):,} tokens, {row.get('seconds', 0.0):.1f}s)")


def summarize_ppl(rows: list[dict]) -> list[dict]:
    """One row per (dataset, group, length): perplexity over the group's seeds (mean, std,
    95% interval half-width, min, max, seeds). A group of one checkpoint has no interval."""
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r.get("group", r["model"]), r["length"]), []).append(r)
    out = []
    for (dataset, group, length), members in cells.items():
        first = members[0]
        row = {"dataset": dataset, "group": group, "length": length,
               "multiple": first.get("multiple"), "train_length": first.get("train_length"),
               "lm_infinite": first.get("lm_infinite", False), "pe": first.get("pe"),
               "split": first.get("split"),
               "seeds_list": sorted(str(m.get("seed")) for m in members)}
        values = [m["ppl"] for m in members if m.get("ppl") is not None]
        if values:  # lengths a model cannot run (a learned token table) have no perplexity
            spread = Spread.of(values)
            row.update(**spread.to_dict("ppl_"), seeds=spread.n)
        else:
            row.update(ppl_mean=None, seeds=0, note=first.get("note", ""))
        out.append(row)
    return out


def format_ppl_table(rows: list[dict]) -> str:
    """Groups x lengths, one block per dataset: the table printed at the end of `eval.py`.
    A group of several seeds shows `mean ± half-width of the 95% interval` and their number."""
    lines = []
    summary = summarize_ppl(rows)
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        sub = [r for r in summary if r["dataset"] == dataset]
        lengths = sorted({r["length"] for r in sub})
        groups = list(dict.fromkeys(r["group"] for r in sub))
        seeds = {g: max(r["seeds"] for r in sub if r["group"] == g) for g in groups}
        several = max(seeds.values()) > 1
        cell_w = 18 if several else 10
        width = max(12, *(len(g) + 2 for g in groups))
        split = sub[0].get("split") or "test"
        note = "; mean ± 95% interval over seeds" if several else ""
        lines.append(f"perplexity on {dataset} (split {split}{note})")
        lines.append("model".ljust(width) + (f"{'seeds':>6}" if several else "")
                     + "".join(f"{n:>{cell_w}}" for n in lengths))
        for g in groups:
            cells = {r["length"]: r for r in sub if r["group"] == g}
            text = []
            for n in lengths:
                r = cells.get(n)
                if r is None or r["ppl_mean"] is None:
                    text.append(f"{'-' if r is None else 'n/a':>{cell_w}}")
                    continue
                spread = Spread(r["ppl_mean"], r["ppl_std"], r["ppl_ci95"], r["ppl_n"],
                                r["ppl_min"], r["ppl_max"])
                text.append(f"{spread.format(digits=2).replace(' +- ', ' ± '):>{cell_w}}")
            lines.append(g.ljust(width) + (f"{seeds[g]:>6}" if several else "") + "".join(text))
        notes = sorted({r["note"] for r in sub if r.get("note")})
        lines += [f"  n/a: {note}" for note in notes]
        lines.append("")
    return "\n".join(lines).rstrip()
