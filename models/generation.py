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

    Without a window, keys are cached already rotated (unrotated where the rotation turns keys
    apart from queries: xPos rotates every key in each pass), in buffers grown by doubling. With
    `window=(n_global, n_local)` (LM-Infinite) the cache is a fixed ring of `n_global + n_local`
    slots per layer: token t < n_global keeps slot t for good, a later token takes slot
    `n_global + (t - n_global) % n_local`, overwriting the token `n_local` before it, which no
    later query can see. Keys are kept both as computed and rotated once by their own position
    (RoPE; xPos rotates them in each pass), so a decoding step costs one attention over the
    window, and memory stays constant however long the text. `slot_tokens` and
    `slot_positions` say which token (-1: none yet) and which relative position each slot holds.
    """

    def __init__(self, n_layers: int, window: tuple[int, int] | None = None):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.k_rot: list[Tensor | None] = [None] * n_layers  # window: keys rotated once
        self.window = window
        self.length = 0  # tokens seen, including those of the forward pass in progress
        self.key_positions: Tensor | None = None  # relative index of every cached key (full)
        self.slot_tokens: Tensor | None = None  # window: token index in each slot, [S]
        self.slot_positions: Tensor | None = None  # window: relative index in each slot
        self._before: tuple[Tensor, Tensor] | None = None  # slot metadata before this pass
        self._new: tuple[Tensor, Tensor | None] | None = None  # this pass's tokens, positions
        self._writes: tuple[Tensor, Tensor] | None = None  # (which new tokens, into which slots)
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

    def extend(self, pos: Positions, q_pos: Tensor | None,
               boundary: Tensor | None) -> Tensor | None:
        """Record `T` new tokens; returns the relative positions of all cached keys (full
        cache) or None (window: `window()` gives the keys with theirs)."""
        T = pos.token.shape[-1]
        first = self.length
        self.length += T
        if pos.intra is not None:
            last_b = (boundary[:, -1] if boundary is not None
                      else torch.zeros_like(pos.intra[:, -1], dtype=torch.bool))
            self.next_intra = torch.where(last_b, 0, pos.intra[:, -1] + 1)
            self.next_inter = pos.inter[:, -1] + last_b.long()
        if self.window is not None:
            self._plan_window(pos.token.view(-1), q_pos)
            return None
        if q_pos is None:
            return None
        self.key_positions = q_pos if first == 0 else torch.cat([self.key_positions, q_pos], -1)
        return self.key_positions

    def _plan_window(self, tokens: Tensor, q_pos: Tensor | None) -> None:
        """Which of this pass's tokens stay in the ring, in which slots (once for all layers)."""
        n_global, n_local = self.window
        size = n_global + n_local
        device = tokens.device
        positions = q_pos if q_pos is not None else tokens.unsqueeze(0)
        if self.slot_tokens is None:
            self.slot_tokens = torch.full((size,), -1, dtype=torch.long, device=device)
            self.slot_positions = torch.zeros(positions.shape[0], size, dtype=torch.long,
                                              device=device)
        self._before = (self.slot_tokens.clone(), self.slot_positions.clone())
        self._new = (tokens, positions)
        last = int(tokens[-1])
        keep = (tokens < n_global) | (tokens > last - n_local)  # one token per slot
        which = keep.nonzero().squeeze(-1)
        kept = tokens[which]
        slots = torch.where(kept < n_global, kept, n_global + (kept - n_global) % n_local)
        self._writes = (which, slots)
        self.slot_tokens[slots] = kept
        if positions.shape[0] != self.slot_positions.shape[0]:  # token positions -> per row
            self.slot_positions = self.slot_positions.expand(positions.shape[0], -1).clone()
        self.slot_positions[:, slots] = positions[:, which]

    def write_window(self, layer: int, k: Tensor, v: Tensor, k_rot: Tensor | None) -> None:
        """Store this pass's kept keys (as computed and rotated) and values of `layer`."""
        which, slots = self._writes
        size = sum(self.window)
        for store, new in ((self.k, k), (self.v, v), (self.k_rot, k_rot)):
            if new is None:
                continue
            if store[layer] is None:
                store[layer] = new.new_zeros(new.shape[0], new.shape[1], size, new.shape[3])
            store[layer][:, :, slots] = new[:, :, which]

    def window_keys(self, layer: int, extra: tuple[Tensor, Tensor | None, Tensor] | None = None
               ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
        """`(keys, rotated keys, values, token indices, positions)` of `layer`'s ring; with
        `extra` (this pass's keys, rotated keys, values), the ring as it was before this pass
        followed by them (a chunk whose later tokens overwrite slots earlier ones still see)."""
        k, k_rot, v = self.k[layer], self.k_rot[layer], self.v[layer]
        if extra is None:
            return k, k_rot, v, self.slot_tokens, self.slot_positions
        nk, nrot, nv = extra
        tokens, positions = self._new
        old_tokens, old_positions = self._before
        if k is None:  # nothing cached for this layer yet
            return nk, nrot, nv, tokens, positions
        rows = max(old_positions.shape[0], positions.shape[0])
        return (torch.cat([k, nk], 2), None if nrot is None else torch.cat([k_rot, nrot], 2),
                torch.cat([v, nv], 2), torch.cat([old_tokens, tokens]),
                torch.cat([old_positions.expand(rows, -1), positions.expand(rows, -1)], -1))

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append `k`, `v` `[B, H, T, D]` (rotated) for `layer`; returns all cached keys and
        values (full cache)."""
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
