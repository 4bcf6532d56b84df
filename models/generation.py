"""KV-cached decoding for every encoding, BiPE included.

The released BiPE code has no cached generation. Here the cache carries, besides keys and values,
the bilevel position state: a new token's (intra, inter) follows from the boundary flag of the
token before it, and a generated token's own flag comes from a set of separator ids.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from bipe.encoding import Positions
from bipe.positions import boundaries_from_separators


class KVCache:
    """Per-layer keys and values plus the position state of the sequence so far.

    Without a window, keys are cached already rotated, in buffers grown by doubling. With
    `window=(n_global, n_local)` (LM-Infinite) keys are cached unrotated and only the first
    `n_global` and the last `n_local` tokens are kept, so memory stays constant however long the
    text; `key_tokens` and `key_positions` say which tokens those are.
    """

    def __init__(self, n_layers: int, window: tuple[int, int] | None = None):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.window = window
        self.length = 0  # tokens seen, including those of the forward pass in progress
        self.key_tokens: Tensor | None = None  # token index of every kept key, [Tk] (window)
        self.key_positions: Tensor | None = None  # relative index of every kept key, [B or 1, Tk]
        self.next_intra: Tensor | None = None  # ids the next token gets without a boundary, [B]
        self.next_inter: Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> KVCache:
        """A cache matching the model's attention settings (windowed under LM-Infinite)."""
        lm = model.attention.lm_infinite
        return cls(len(model.blocks), None if lm is None else (lm.n_global, lm.n_local))

    def bilevel_start(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.next_intra is None:
            zero = torch.zeros(batch, dtype=torch.long, device=device)
            return zero, zero
        return self.next_intra, self.next_inter

    def _evict(self) -> None:
        """Drop keys no future query can attend: outside the first n_global and last n_local."""
        n_global, n_local = self.window
        keep = (self.key_tokens < n_global) | (self.key_tokens > self.length - n_local)
        if bool(keep.all()):
            return
        idx = keep.nonzero().squeeze(-1)
        self.k = [None if k is None else k[:, :, idx] for k in self.k]
        self.v = [None if v is None else v[:, :, idx] for v in self.v]
        self.key_tokens = self.key_tokens[idx]
        if self.key_positions is not None:
            self.key_positions = self.key_positions[..., idx]

    def extend(self, pos: Positions, q_pos: Tensor | None,
               boundary: Tensor | None) -> Tensor | None:
        """Record `T` new tokens; returns the relative positions of all kept keys."""
        T = pos.token.shape[-1]
        if self.window is not None and self.key_tokens is not None:
            self._evict()
        self.length += T
        if pos.intra is not None:
            last_b = (boundary[:, -1] if boundary is not None
                      else torch.zeros_like(pos.intra[:, -1], dtype=torch.bool))
            self.next_intra = torch.where(last_b, 0, pos.intra[:, -1] + 1)
            self.next_inter = pos.inter[:, -1] + last_b.long()
        if self.window is not None:
            new = pos.token.view(-1)
            self.key_tokens = new if self.key_tokens is None else torch.cat([self.key_tokens, new])
        if q_pos is None:
            return None
        if self.key_positions is None:
            self.key_positions = q_pos
        else:
            self.key_positions = torch.cat([self.key_positions, q_pos], dim=-1)
        return self.key_positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append `k`, `v` `[B, H, T, D]` for `layer`; returns all kept keys and values."""
        if self.window is not None:  # small and bounded: plain concatenation
            if self.k[layer] is not None:
                k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
            self.k[layer], self.v[layer] = k, v
            return k, v
        T = k.shape[2]
        start, end = self.length - T, self.length
        buf_k = self.k[layer]
        if buf_k is None or buf_k.shape[2] < end:
            cap = max(end, 2 * (0 if buf_k is None else buf_k.shape[2]), 16)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self.v[layer][:, :, :start]
            self.k[layer], self.v[layer] = new_k, new_v
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _next_token(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> Tensor:
    """Logits `[B, V]` -> token ids `[B]`: greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: Tensor, boundary: Tensor | None = None, *,
             max_new_tokens: int, separator_ids: Iterable[int] = (), temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None,
             prompt_lengths: Tensor | None = None) -> Tensor:
    """Continue `input_ids` `[B, T]` by up to `max_new_tokens` -> `[B, T + n]`.

    `boundary`: the prompt's flags (bool `[B, T]`); when None they come from `separator_ids`,
    as do the flags of generated tokens. Greedy at `temperature=0`. Rows that emitted `eos_id`
    keep emitting it; decoding stops when every row has.

    Prompts of different lengths: with `prompt_lengths` (long `[B]`, right-padded `input_ids`),
    row r's prompt is `input_ids[r, :prompt_lengths[r]]` and its continuation starts right after
    it, at position `prompt_lengths[r]` of the output, as if each row were decoded alone: all
    rows advance one position per step, a row still inside its prompt is fed its next prompt
    token instead of a sample, so no row ever holds padding and every encoding sees exact
    positions. The output has `max(prompt_lengths) + max_new_tokens` columns at most; a row's
    tokens past `prompt_lengths[r] + max_new_tokens` are further samples, for the caller to
    ignore. With `eos_id`, decoding stops once every row has emitted it after its prompt.
    """
    separator_ids = list(separator_ids)
    if boundary is None and separator_ids:
        boundary = boundaries_from_separators(input_ids, separator_ids)
    B, T = input_ids.shape
    if prompt_lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=input_ids.device)
    else:
        lengths = prompt_lengths.to(device=input_ids.device, dtype=torch.long)
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"prompt_lengths must be in 1..{T} (the width of input_ids)")
    start = int(lengths.min()) if B else T
    end = (int(lengths.max()) if B else T) + max_new_tokens  # exclusive: output width at most
    cache = KVCache.for_model(model)
    prefix_flags = None if boundary is None else boundary[:, :start]
    logits = model(input_ids[:, :start], prefix_flags, cache=cache)[:, -1]
    out = [input_ids[:, :start]]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for t in range(start, end):
        token = _next_token(logits, temperature, top_k, generator)
        forced = (t < lengths) if t < T else None  # rows still inside their prompt
        if forced is not None:
            token = torch.where(forced, input_ids[:, t], token)
        if eos_id is not None:
            token = torch.where(done, eos_id, token)
            done |= token == eos_id if forced is None else (token == eos_id) & ~forced
        out.append(token[:, None])
        if t == end - 1 or (eos_id is not None and bool(done.all())):
            break
        flag = boundaries_from_separators(token[:, None], separator_ids)
        if forced is not None and boundary is not None:
            flag = torch.where(forced[:, None], boundary[:, t : t + 1], flag)
        logits = model(token[:, None], flag, cache=cache)[:, -1]
    return torch.cat(out, dim=1)
