"""LM-Infinite (Han et al., NAACL 2024; docs/methods.md section 4): Lambda-shaped attention with
a cap on the relative distance, an inference-time fix for relative encodings.

Query `i` attends to keys `j <= i` that are either local (`i - j < n_local`, token distance) or
global (`j < n_global`); one softmax covers both branches. Every attended pair is scored as if its
relative distance were `min(p_i - p_j, distance_cap)`, where `p` is the index the relative part
reads (token index, or segment index for BiPE). For a rotary part a capped pair is scored with
the query rotated by the cap and the key by 0, which is exactly a rotation by the capped distance;
a bias part clamps the distance itself (`bipe.relative`).

The sequence is processed in query blocks; each block sees the `n_global` first keys and the
keys of its own local band, so time and memory are `O(T * (n_global + n_local))`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bipe.relative import BiasPart, FrequencyRotation, LinearBias, Rotation


def lambda_block(q: Tensor, k: Tensor, v: Tensor, *, q_tok: Tensor, k_tok: Tensor,
                 q_pos: Tensor, k_pos: Tensor, n_global: int, n_local: int,
                 rotation: Rotation | None = None, bias: BiasPart | None = None,
                 distance_cap: int | None = None, k_rot: Tensor | None = None) -> Tensor:
    """Lambda attention of the queries `q` `[B, H, Tq, D]` over an arbitrary key set `k`, `v`
    `[B, H, Tk, D]` (unrotated). `q_tok` `[Tq]`, `k_tok` `[Tk]` are token indices (for the mask;
    a negative index is an empty slot); `q_pos` `[B or 1, Tq]`, `k_pos` `[B or 1, Tk]` the
    relative positions; the relative part acts through `rotation` (a rotary part's) or `bias` (a
    bias part), `bipe.relative`'s contract; `k_rot`: the keys already rotated by their own
    positions (a cache's), else they are rotated here. Returns `[B, H, Tq, D]`. Keys outside
    every query's Lambda are harmless (masked), so callers may pass a superset."""
    rel = q_tok.view(-1, 1) - k_tok.view(1, -1)  # token distance, (Tq, Tk)
    allowed = (rel >= 0) & ((rel < n_local) | (k_tok.view(1, -1) < n_global))
    allowed = allowed & (k_tok.view(1, -1) >= 0)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if rotation is not None:
        if k_rot is None:
            k_rot = rotation.rotate_key(k, k_pos)
        scores = rotation.rotate(q, q_pos) @ k_rot.transpose(-1, -2)
        if distance_cap is not None:
            capped = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).unsqueeze(1) > distance_cap
            if bool(capped.any()):
                cap = torch.tensor(float(distance_cap), device=q.device)
                # Query rotated by the cap, key by 0: the pair's angle is the cap's.
                far = rotation.rotate(q, cap) @ rotation.at_origin(k).transpose(-1, -2)
                scores = torch.where(capped, far, scores)
    else:
        scores = q @ k.transpose(-1, -2)
    scores = scores.float() * scale
    if bias is not None:
        scores = scores + bias.bias(q_pos, k_pos, distance_cap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return probs @ v


def lambda_attention(q: Tensor, k: Tensor, v: Tensor, *, n_global: int, n_local: int,
                     positions: Tensor | None = None, inv_freq: Tensor | None = None,
                     alibi_slopes: Tensor | None = None, distance_cap: int | None = None,
                     rope_scale: float = 1.0, block_size: int | None = None,
                     rotation: Rotation | None = None, bias: BiasPart | None = None) -> Tensor:
    """LM-Infinite attention. `q, k, v` `[B, H, T, D]` before any rotation; `positions` long
    `[B, T]` for the relative part (token index when omitted); the relative part as `rotation`
    or `bias` (`bipe.relative`'s contract), or by the public API's shorthands
    (docs/architecture.md):
    `inv_freq` `[D/2]` and `rope_scale` (cos and sin multiplied by it, YaRN) for a rotation by
    frequencies, `alibi_slopes` `[H]` (multiplier applied) for a linear bias. Returns
    `[B, H, T, D]`; time and memory `O(T * (n_global + n_local))`."""
    if n_local < 1 or n_global < 0:
        raise ValueError(f"need n_local >= 1 and n_global >= 0, got {n_local}, {n_global}")
    if inv_freq is not None:
        rotation = FrequencyRotation(inv_freq, rope_scale)
    if alibi_slopes is not None:
        bias = LinearBias(alibi_slopes.to(q.device))
    T = q.shape[2]
    tok = torch.arange(T, device=q.device)
    pos = tok.unsqueeze(0) if positions is None else positions
    c = block_size or min(n_local, 512)
    out = []
    for s in range(0, T, c):
        e = min(s + c, T)
        lo = max(0, s - n_local + 1)  # first key of the block's local band
        g = min(n_global, lo)  # global keys not already in the band
        idx = torch.cat([tok[:g], tok[lo:e]])
        out.append(lambda_block(
            q[:, :, s:e], k[:, :, idx], v[:, :, idx], q_tok=tok[s:e], k_tok=idx,
            q_pos=pos[:, s:e], k_pos=pos[:, idx], n_global=n_global, n_local=n_local,
            rotation=rotation, bias=bias, distance_cap=distance_cap))
    return torch.cat(out, dim=2)
