"""`PositionalEncoding`: one class composed of an absolute part and a relative part.

absolute: `none` | `learned` | `sinusoidal`, over the `token` or `intra` index, added to the
          token embeddings;
relative: `none` | `rope` | `xpos` (rotations) | `alibi` | `t5` | `kerple` | `fire` (biases),
          over the `token` or `inter` index, acting inside attention (rotating q/k, or adding a
          bias to the logits).

RoPE, ALiBi, BiPE-RoPE and BiPE-ALiBi are four named configurations of this one class (NoPE and
the absolute-only baselines come for free). A new scheme is a new entry in `ABSOLUTE_PARTS` or
`RELATIVE_PARTS` (which makes its name a valid `pe.absolute.type` / `pe.relative.type`); a
relative part implements `bipe.relative`'s contract (a rotation, or a bias as a tensor and as a
flex score_mod), and neither the model nor the attention kernels are edited. The model only talks
to `PositionalEncoding`.
The configuration (`PEConfig`) lives in `bipe.config`, without torch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bipe.absolute import LearnedAbsolute, SinusoidalAbsolute
from bipe.alibi import ALiBi
from bipe.attention import AttentionContext, AttentionOptions
from bipe.config import (
    ABSOLUTE_TYPES,
    NAMED_ENCODINGS,
    RELATIVE_TYPES,
    AbsoluteConfig,
    PEConfig,
    RelativeConfig,
)
from bipe.errors import ConfigError
from bipe.fire import FIRE
from bipe.kerple import KerpleLog
from bipe.positions import bilevel_ids, randomized_positions
from bipe.relative import RelativePart
from bipe.rope import Rotary
from bipe.t5 import T5Bias
from bipe.xpos import XPos

__all__ = ["ABSOLUTE_PARTS", "NAMED_ENCODINGS", "RELATIVE_PARTS", "AbsoluteConfig", "PEConfig",
           "PartRegistry", "PositionalEncoding", "Positions", "RelativeConfig"]


class PartRegistry(dict):
    """Part name -> class. Registering a part (`RELATIVE_PARTS["name"] = cls`) also makes its
    name a valid config value (`bipe.config`'s list for the kind, checked there without torch);
    a relative part must implement `bipe.relative`'s contract."""

    def __init__(self, names: list[str], parts: dict[str, type[nn.Module]],
                 base: type | None = None):
        super().__init__()
        self.names, self.base = names, base
        for name, part in parts.items():
            self[name] = part

    def __setitem__(self, name: str, part: type[nn.Module]) -> None:
        if self.base is not None and not (isinstance(part, type) and issubclass(part, self.base)):
            raise TypeError(f"part {name!r}: {part!r} does not implement "
                            f"{self.base.__module__}.{self.base.__name__}")
        super().__setitem__(name, part)
        if name not in self.names:
            self.names.append(name)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        if name in self.names:
            self.names.remove(name)


ABSOLUTE_PARTS = PartRegistry(ABSOLUTE_TYPES, {"learned": LearnedAbsolute,
                                               "sinusoidal": SinusoidalAbsolute})
# A relative part is a `RotaryPart` or a `BiasPart`; attention reads it only through them.
RELATIVE_PARTS = PartRegistry(RELATIVE_TYPES, {"rope": Rotary, "alibi": ALiBi}, RelativePart)
# The field's standard bias baselines (docs/methods.md section 6).
RELATIVE_PARTS["t5"] = T5Bias
RELATIVE_PARTS["kerple"] = KerpleLog
RELATIVE_PARTS["fire"] = FIRE
RELATIVE_PARTS["xpos"] = XPos  # RoPE with xPos's decay (docs/methods.md section 6)


class Positions(NamedTuple):
    """Every index a part may read. token: `[1, T]` (`[B, T]`, drawn, with randomized
    positions); intra, inter: `[B, T]` or None."""

    token: Tensor
    intra: Tensor | None = None
    inter: Tensor | None = None

    def get(self, index: str) -> Tensor:
        pos = getattr(self, index)
        assert pos is not None, f"{index} positions were not computed"
        return pos


EVAL_DRAW_SEED = 0  # randomized positions outside training: the same draws on every call


class PositionalEncoding(nn.Module):
    """An absolute part (embedding side) plus a relative part (attention side)."""

    def __init__(self, config: PEConfig, hidden_size: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.config = config
        a, r = config.absolute, config.relative
        self.absolute = (None if a.type == "none" else ABSOLUTE_PARTS[a.type](
            hidden_size, **dataclasses.asdict(a), init_std=init_std))
        head_dim = hidden_size // n_heads
        self.relative = (None if r.type == "none" else RELATIVE_PARTS[r.type](
            head_dim, n_heads, **dataclasses.asdict(r)))

    def positions(self, boundary: Tensor | None, batch: int, length: int, past: int = 0,
                  start: tuple[Tensor, Tensor] | None = None, device=None) -> Positions:
        """Ids for `length` new tokens after `past` cached ones. `boundary`: bool `[B, T]`|None;
        `start`: the (intra, inter) the first new token gets if no boundary precedes it."""
        randomized = self.config.randomized_max
        if self.absolute is not None:  # drawn positions reach randomized_max - 1
            self.absolute.check_length(past + length if randomized is None else randomized)
        if randomized is None:
            token = torch.arange(past, past + length, device=device).unsqueeze(0)
        else:
            token = self.randomized_token(batch, length, past, device)
        if not self.config.uses_bilevel:
            return Positions(token)
        if boundary is None:  # no segments: one segment spanning the whole sequence
            boundary = torch.zeros(batch, length, dtype=torch.bool, device=device)
        intra, inter = bilevel_ids(boundary, start=start)
        return Positions(token, intra, inter)

    def randomized_token(self, batch: int, length: int, past: int, device=None) -> Tensor:
        """Token positions drawn per sequence from `[0, randomized_max)`, sorted, `[B, T]`:
        Ruoss et al. 2023 draw them in training and at test time alike (docs/methods.md section
        6). Training draws from the global RNG, which the training loop reseeds per batch (a
        resumed run stays exact); evaluation from a generator seeded alike on every call, so a
        score depends on the model and the inputs only."""
        if past:
            raise ConfigError(f"pe.randomized_max: pe={self.config.name} draws the positions of a "
                              "whole sequence at once, so a KV cache cannot extend them; score "
                              "whole sequences without cached decoding")
        generator = None
        if not self.training:
            generator = torch.Generator(device=device or "cpu").manual_seed(EVAL_DRAW_SEED)
        return randomized_positions(batch, length, self.config.randomized_max,
                                    generator=generator, device=device)

    def embed(self, h: Tensor, pos: Positions) -> Tensor:
        """Add the absolute part to token embeddings `h` `[B, T, C]`."""
        if self.absolute is None:
            return h
        return h + self.absolute(pos.get(self.config.absolute.index)).to(h.dtype)

    def relative_positions(self, pos: Positions) -> Tensor | None:
        """The index the relative part reads, `[B or 1, T]`, or None without a relative part."""
        return None if self.relative is None else pos.get(self.config.relative.index)

    @property
    def uses_bias(self) -> bool:
        return self.relative is not None and self.relative.uses_bias

    def context(self, q_pos: Tensor | None, k_pos: Tensor | None, past: int, length: int,
                options: AttentionOptions | None = None) -> AttentionContext:
        """Attention inputs for `length` queries after `past` cached keys.

        `q_pos`: relative positions of the new tokens `[B or 1, Tq]`; `k_pos`: of all keys
        `[B or 1, Tk]` (read by bias-type parts and by LM-Infinite). The context asks the
        relative part for what attention needs (`bipe.relative`) and chooses the kernel.
        """
        return AttentionContext(past=past, length=length, q_pos=q_pos, k_pos=k_pos,
                                options=options or AttentionOptions(), part=self.relative)
