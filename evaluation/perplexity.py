"""Perplexity against sequence length (PAPERS.md section 1, protocol of the BiPE paper).

`blocks`: the token stream is cut into non-overlapping blocks of `length` inputs; every token is
scored exactly once (the last, shorter block too), positions restart at every block, and the
perplexity is weighted by tokens. `sliding`: windows of `length` tokens every `stride` tokens;
each window scores only the targets the previous one did not, so again every token is scored
once, now with up to `length - stride` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def _windows(n: int, length: int, protocol: str, stride: int | None
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

    for window in _windows(n, length, protocol, stride):
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
