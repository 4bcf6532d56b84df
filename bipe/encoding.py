"""`PositionalEncoding`: one class composed of an absolute part and a relative part.

absolute: `none` | `learned` | `sinusoidal`, over the `token` or `intra` index, added to the
          token embeddings;
relative: `none` | `rope` | `alibi`, over the `token` or `inter` index, acting inside attention
          (rotating q/k, or adding a bias to the logits).

RoPE, ALiBi, BiPE-RoPE and BiPE-ALiBi are four named configurations of this one class (NoPE and
the absolute-only baselines come for free). A new scheme is a new entry in `ABSOLUTE_PARTS` or
`RELATIVE_PARTS`; the model only talks to `PositionalEncoding`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from bipe.absolute import LearnedAbsolute, SinusoidalAbsolute
from bipe.alibi import ALiBi
from bipe.attention import AttentionContext, AttentionOptions
from bipe.errors import ConfigError
from bipe.positions import bilevel_ids
from bipe.rope import Rotary, validate_scaling

ABSOLUTE_PARTS: dict[str, type[nn.Module]] = {"learned": LearnedAbsolute,
                                              "sinusoidal": SinusoidalAbsolute}
RELATIVE_PARTS: dict[str, type[nn.Module]] = {"rope": Rotary, "alibi": ALiBi}
ABSOLUTE_INDICES = ("token", "intra")
RELATIVE_INDICES = ("token", "inter")


@dataclass
class AbsoluteConfig:
    type: str = "none"
    index: str = "token"
    max_positions: int | None = None  # rows of a learned table


@dataclass
class RelativeConfig:
    type: str = "none"
    index: str = "token"
    base: float = 10000.0  # rope
    scaling: dict[str, Any] | None = None  # rope: linear | ntk | dynamic | yarn
    slope_multiplier: float = 1.0  # alibi (96 for BiPE-ALiBi in the released code)


def _from_mapping(cls: type, data: Any, key: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{key} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
                          f"valid keys: {sorted(names)}")
    return cls(**data)


@dataclass
class PEConfig:
    """A positional encoding: `PEConfig.named("bipe_rope", max_positions=256)` or from a dict."""

    name: str = "custom"
    absolute: AbsoluteConfig = field(default_factory=AbsoluteConfig)
    relative: RelativeConfig = field(default_factory=RelativeConfig)

    def __post_init__(self) -> None:
        self.absolute = _from_mapping(AbsoluteConfig, self.absolute, "pe.absolute")
        self.relative = _from_mapping(RelativeConfig, self.relative, "pe.relative")
        a, r = self.absolute, self.relative
        valid_abs, valid_rel = ["none", *ABSOLUTE_PARTS], ["none", *RELATIVE_PARTS]
        if a.type not in valid_abs:
            raise ConfigError(f"pe.absolute.type={a.type!r} is unknown; choose one of {valid_abs}")
        if r.type not in valid_rel:
            raise ConfigError(f"pe.relative.type={r.type!r} is unknown; choose one of {valid_rel}")
        if a.index not in ABSOLUTE_INDICES:
            raise ConfigError(f"pe.absolute.index={a.index!r} is unknown; choose one of "
                              f"{list(ABSOLUTE_INDICES)}")
        if r.index not in RELATIVE_INDICES:
            raise ConfigError(f"pe.relative.index={r.index!r} is unknown; choose one of "
                              f"{list(RELATIVE_INDICES)}")
        if a.type == "learned" and (a.max_positions is None or a.max_positions < 1):
            raise ConfigError(f"pe.absolute.max_positions={a.max_positions} must be a positive "
                              "number of table rows for a learned table (usually data.block_size)")
        if r.type == "rope":
            validate_scaling(r.scaling)
        elif r.scaling is not None:
            raise ConfigError(f"pe.relative.scaling applies to rope only, not {r.type!r}; "
                              "set pe.relative.scaling=null")

    @property
    def uses_bilevel(self) -> bool:
        """True when any part reads intra or inter positions (needs segment boundaries)."""
        return ((self.absolute.type != "none" and self.absolute.index == "intra")
                or (self.relative.type != "none" and self.relative.index == "inter"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PEConfig:
        return _from_mapping(cls, dict(data), "pe")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def named(cls, name: str, max_positions: int | None = None, **relative: Any) -> PEConfig:
        """One of `NAMED_ENCODINGS`; `max_positions` sizes a learned table."""
        if name not in NAMED_ENCODINGS:
            raise ConfigError(f"pe={name!r} is unknown; choose one of {sorted(NAMED_ENCODINGS)}")
        spec = NAMED_ENCODINGS[name]
        absolute = dict(spec.get("absolute", {}))
        if absolute.get("type") == "learned":
            absolute["max_positions"] = max_positions
        return cls(name=name, absolute=absolute, relative={**spec.get("relative", {}), **relative})


NAMED_ENCODINGS: dict[str, dict[str, dict[str, Any]]] = {
    "nope": {},
    "sinusoidal": {"absolute": {"type": "sinusoidal", "index": "token"}},
    "learned": {"absolute": {"type": "learned", "index": "token"}},
    "rope": {"relative": {"type": "rope", "index": "token"}},
    "alibi": {"relative": {"type": "alibi", "index": "token"}},
    "bipe_rope": {"absolute": {"type": "learned", "index": "intra"},
                  "relative": {"type": "rope", "index": "inter"}},
    "bipe_alibi": {"absolute": {"type": "learned", "index": "intra"},
                   "relative": {"type": "alibi", "index": "inter", "slope_multiplier": 96.0}},
}


class Positions(NamedTuple):
    """Every index a part may read. token: `[1, T]`; intra, inter: `[B, T]` or None."""

    token: Tensor
    intra: Tensor | None = None
    inter: Tensor | None = None

    def get(self, index: str) -> Tensor:
        pos = getattr(self, index)
        assert pos is not None, f"{index} positions were not computed"
        return pos


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
        if self.absolute is not None:
            self.absolute.check_length(past + length)
        token = torch.arange(past, past + length, device=device).unsqueeze(0)
        if not self.config.uses_bilevel:
            return Positions(token)
        if boundary is None:  # no segments: one segment spanning the whole sequence
            boundary = torch.zeros(batch, length, dtype=torch.bool, device=device)
        intra, inter = bilevel_ids(boundary, start=start)
        return Positions(token, intra, inter)

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
        `[B or 1, Tk]` (read by bias-type parts and by LM-Infinite).
        """
        ctx = AttentionContext(past=past, length=length, q_pos=q_pos, k_pos=k_pos,
                               options=options or AttentionOptions())
        rel = self.relative
        if rel is None:
            return ctx
        if rel.uses_bias:
            ctx.bias_fn, ctx.slopes = rel.bias, rel.slopes
        else:
            ctx.inv_freq, ctx.rope_scale = rel.frequencies(k_pos)
            if ctx.lm_infinite is None:  # Lambda attention rotates per pair instead
                ctx.cos, ctx.sin = rel.cos_sin(q_pos)
        return ctx
