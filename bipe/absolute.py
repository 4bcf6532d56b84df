"""Absolute position parts: added to the token embeddings, over the token or intra-segment index."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bipe.errors import ConfigError


class LearnedAbsolute(nn.Module):
    """A learned table of `max_positions` rows.

    Over `intra` (BiPE), offsets past the table clip to the last row, and that row is trained like
    the others (the released BiPE code's `padding_idx=-1` froze it at zero; we do not). Over
    `token`, a position past the table is an error: a learned table cannot extrapolate.
    """

    def __init__(self, hidden_size: int, index: str, max_positions: int, init_std: float = 0.02,
                 **_: Any):
        super().__init__()
        if max_positions is None or max_positions < 1:
            raise ConfigError(f"pe.absolute.max_positions={max_positions} must be a positive "
                              "number of table rows (usually the training block length)")
        self.index, self.max_positions = index, max_positions
        self.table = nn.Embedding(max_positions, hidden_size)
        nn.init.normal_(self.table.weight, std=init_std)

    def check_length(self, end: int) -> None:
        if self.index == "token" and end > self.max_positions:
            raise ConfigError(
                f"position {end - 1} is past the learned token table of {self.max_positions} rows "
                f"(pe.absolute.max_positions); a learned token table cannot extrapolate, so "
                "evaluate at most that length or use pe=sinusoidal or a relative encoding")

    def forward(self, pos: Tensor) -> Tensor:
        """Long `[B or 1, T]` -> float `[B or 1, T, C]`."""
        return self.table(pos.clamp(max=self.max_positions - 1))


class SinusoidalAbsolute(nn.Module):
    """Fixed sinusoids (Vaswani et al. 2017) with a learned scalar scale.

    The scale starts at `C^-0.5` (as x-transformers' ScaledSinusoidalEmbedding) so the unit-size
    sinusoids do not swamp token embeddings initialised with std 0.02.
    """

    def __init__(self, hidden_size: int, index: str, base: float = 10000.0, **_: Any):
        super().__init__()
        self.index = index
        half = hidden_size // 2
        inv_freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = nn.Parameter(torch.tensor(hidden_size ** -0.5))
        self.hidden_size = hidden_size

    def check_length(self, end: int) -> None:
        pass

    def forward(self, pos: Tensor) -> Tensor:
        """Long `[B or 1, T]` -> float `[B or 1, T, C]`."""
        angles = pos.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((angles.sin(), angles.cos()), dim=-1)
        if emb.shape[-1] < self.hidden_size:  # odd hidden size: pad one zero column
            emb = nn.functional.pad(emb, (0, self.hidden_size - emb.shape[-1]))
        return emb * self.scale

