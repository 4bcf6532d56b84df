"""Bilevel positions (BiPE, docs/methods.md section 1): segment boundaries -> (intra, inter) ids;
and randomized token positions (Ruoss et al. 2023, section 6).

A boundary flag marks the *last* token of a segment. The token that closes a segment belongs to
it; the token after it starts the next segment. Everything here is vectorised over the last
(time) dimension, so it costs a cumsum and a cummax per batch, never a Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bipe.errors import ConfigError


def bilevel_ids(
    boundary: Tensor,
    max_intra: int | None = None,
    *,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Bool `[..., T]` boundary flags -> `(intra, inter)`, long `[..., T]`.

    `inter[t]` counts boundaries strictly before `t`; `intra[t]` is `t` minus the index just after
    the last boundary before `t`. `max_intra` clips `intra` to `max_intra - 1` (`inter` is never
    clipped). `start=(intra0, inter0)`, each long `[...]`, continues a sequence whose previous part
    is already processed (KV-cached decoding): they are the ids the first token gets if no
    boundary precedes it inside `boundary`.
    """
    if boundary.dtype != torch.bool:
        raise TypeError(f"boundary must be a bool tensor, got {boundary.dtype}")
    T = boundary.shape[-1]
    b = boundary.long()
    inter = torch.cumsum(b, dim=-1) - b
    idx = torch.arange(T, device=boundary.device)
    # A boundary at p makes p + 1 a segment start; the start of t's segment is the largest such
    # start at or before t, i.e. a running max over the flags of tokens strictly before t.
    starts = torch.where(boundary, idx + 1, 0)
    starts = torch.nn.functional.pad(starts[..., :-1], (1, 0))
    seg_start = torch.cummax(starts, dim=-1).values
    intra = idx - seg_start
    if start is not None:
        intra0, inter0 = start
        # Tokens before the chunk's first boundary continue the previous segment.
        intra = torch.where(seg_start == 0, intra + intra0.unsqueeze(-1), intra)
        inter = inter + inter0.unsqueeze(-1)
    if max_intra is not None:
        intra = intra.clamp(max=max_intra - 1)
    return intra, inter


def boundaries_from_separators(input_ids: Tensor, separator_ids: Iterable[int] | Tensor) -> Tensor:
    """Long `[B, T]` token ids -> bool `[B, T]`, True where the id is a separator.

    This is the released BiPE code's segmentation rule (LLaMA ids 13 = newline, 869 = " ."); it is
    kept for compatibility and for generation, where a new token's flag comes from its id.
    """
    seps = torch.as_tensor(list(separator_ids) if not isinstance(separator_ids, Tensor)
                           else separator_ids, dtype=input_ids.dtype, device=input_ids.device)
    if seps.numel() == 0:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return torch.isin(input_ids, seps)


def randomized_positions(batch: int, length: int, max_position: int, *,
                         generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
    """Long `[batch, length]`: per row, `length` positions drawn uniformly without replacement
    from `[0, max_position)` and sorted (Ruoss et al. 2023, docs/methods.md section 6), so a
    model trained on short sequences sees the positions of long ones. Draws from `generator`, or
    the global RNG (which training reseeds per batch: resumed runs stay exact)."""
    if length > max_position:
        raise ConfigError(f"pe.randomized_max={max_position} is less than the sequence length "
                          f"{length}: positions are drawn without replacement from [0, "
                          "pe.randomized_max); set it to at least the longest sequence")
    keys = torch.rand(batch, max_position, generator=generator, device=device)
    drawn = keys.topk(length, dim=-1, largest=False, sorted=False).indices
    return drawn.sort(dim=-1).values
