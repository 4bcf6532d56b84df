"""The configuration of a positional encoding, checked: `PEConfig` and RoPE scaling.

Plain dataclasses without torch, so the application can register them as Hydra structured
configs (a misspelled or mistyped key fails when the config is composed) and check values before
any model is built. `PEConfig.__post_init__` checks what types cannot: known part names, a table
size for a learned table, a well-formed scaling; every error is one line naming the key.

RoPE scaling (`pe.relative.scaling`) takes this project's keys (`type`, `factor`,
`original_max_position`, `beta_fast`, `beta_slow`, `attention_factor`) or Hugging Face's
(`rope_type`, `original_max_position_embeddings`); `normalize_scaling` maps the second onto the
first, so both give the same frequencies.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bipe.errors import ConfigError

# Part names a config may give. `bipe.encoding`'s part registries keep these lists in step (a
# part registered there is a valid name here at once), so names are checked without torch.
ABSOLUTE_TYPES = ["none", "learned", "sinusoidal"]
RELATIVE_TYPES = ["none", "rope", "alibi"]
ABSOLUTE_INDICES = ("token", "intra")
RELATIVE_INDICES = ("token", "inter")

# RoPE scaling type -> (required keys, optional keys), in this project's spelling.
SCALING_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset({"original_max_position"})),
    "ntk": (frozenset({"factor"}), frozenset({"original_max_position"})),
    "dynamic": (frozenset({"original_max_position"}), frozenset({"factor"})),
    "yarn": (frozenset({"factor", "original_max_position"}),
             frozenset({"beta_fast", "beta_slow", "attention_factor"})),
}
# Hugging Face `rope_scaling` spellings -> ours.
HF_SCALING_KEYS = {"rope_type": "type", "original_max_position_embeddings": "original_max_position"}


def normalize_scaling(scaling: Mapping[str, Any] | None, key: str = "pe.relative.scaling"
                      ) -> dict[str, Any] | None:
    """`scaling` in this project's keys (Hugging Face's `rope_type` and
    `original_max_position_embeddings` renamed), validated; None for no scaling (also HF's
    `rope_type: default`). ConfigError naming `key` for an unknown type, a missing or unknown
    field, or a factor below 1."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"{key}={scaling!r} must be a mapping such as {{type: yarn, factor: 4}} "
                          "or null")
    out: dict[str, Any] = {}
    for name, value in scaling.items():
        ours = HF_SCALING_KEYS.get(name, name)
        if ours in out and out[ours] != value:
            raise ConfigError(f"{key} gives {ours} twice ({name}={value!r} and "
                              f"{ours}={out[ours]!r}); keep one spelling")
        out[ours] = value
    if out.get("type") == "default":  # Hugging Face's name for "no scaling"
        return None
    kind = out.get("type")
    if kind not in SCALING_KEYS:
        raise ConfigError(f"{key}.type={kind!r} is not a RoPE scaling type; choose one of "
                          f"{sorted(SCALING_KEYS)} or set {key}=null")
    required, optional = SCALING_KEYS[kind]
    missing = sorted(k for k in required if out.get(k) is None)
    if missing:
        needed = ", ".join(f"{key}.{m}" for m in missing)
        raise ConfigError(f"{key} of type {kind!r} needs {needed}")
    unknown = sorted(set(out) - required - optional - {"type"})
    if unknown:
        raise ConfigError(f"{key} of type {kind!r} has unknown key(s) {unknown}; allowed: "
                          f"{sorted(required | optional)}")
    for name in ("factor", "original_max_position", "beta_fast", "beta_slow", "attention_factor"):
        value = out.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{key}.{name}={value!r} must be a number")
    if out.get("factor") is not None and out["factor"] < 1:
        raise ConfigError(f"{key}.factor={out['factor']} must be >= 1")
    if out.get("original_max_position") is not None and out["original_max_position"] < 1:
        raise ConfigError(f"{key}.original_max_position={out['original_max_position']} must be "
                          ">= 1")
    return out


def validate_scaling(scaling: Mapping[str, Any] | None,
                     key: str = "pe.relative.scaling") -> None:
    """Raise ConfigError naming `key` unless `scaling` is None or a valid scaling mapping."""
    normalize_scaling(scaling, key)


@dataclass
class AbsoluteConfig:
    """`pe.absolute`: a part added to the token embeddings."""

    type: str = "none"  # none | learned | sinusoidal
    index: str = "token"  # token | intra
    max_positions: int | None = None  # rows of a learned table (usually data.block_size)


@dataclass
class RelativeConfig:
    """`pe.relative`: a part inside attention, over token or segment (inter) positions."""

    type: str = "none"  # none | rope | alibi | t5 | kerple | fire | xpos (bipe/encoding.py)
    index: str = "token"  # token | inter
    base: float = 10000.0  # rope
    # A mapping or None (typed Any: OmegaConf cannot merge a mapping into an empty Optional
    # dict field); checked by normalize_scaling.
    scaling: Any = None  # rope: linear | ntk | dynamic | yarn (HF keys too)
    slope_multiplier: float = 1.0  # alibi (96 for BiPE-ALiBi in the released code)
    # Null: the part's own default (a non-null default would change every study's fingerprint).
    num_buckets: int | None = None  # t5 (32)
    max_distance: int | None = None  # t5 (128)
    fire_width: int | None = None  # fire: hidden units of its MLP (32)
    fire_threshold: float | None = None  # fire: the initial threshold L (512)
    scale_base: float | None = None  # xpos: gamma, the decay's length scale (512)


@dataclass
class PEConfig:
    """A positional encoding: `PEConfig.named("bipe_rope", max_positions=256)` or from a dict."""

    name: str = "custom"
    absolute: AbsoluteConfig = field(default_factory=AbsoluteConfig)
    relative: RelativeConfig = field(default_factory=RelativeConfig)
    # Randomized positions (Ruoss et al. 2023): the token index becomes a sorted draw from
    # [0, randomized_max) per sequence, in training and evaluation alike; null: 0..T-1.
    randomized_max: int | None = None

    def __post_init__(self) -> None:
        self.absolute = build(AbsoluteConfig, self.absolute, "pe.absolute")
        self.relative = build(RelativeConfig, self.relative, "pe.relative")
        a, r = self.absolute, self.relative
        if a.type not in ABSOLUTE_TYPES:
            raise ConfigError(f"pe.absolute.type={a.type!r} is unknown; choose one of "
                              f"{list(ABSOLUTE_TYPES)}")
        if r.type not in RELATIVE_TYPES:
            raise ConfigError(f"pe.relative.type={r.type!r} is unknown; choose one of "
                              f"{list(RELATIVE_TYPES)}")
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
            r.scaling = normalize_scaling(r.scaling)
        elif r.scaling is not None:
            raise ConfigError(f"pe.relative.scaling applies to rope only, not {r.type!r}; "
                              "set pe.relative.scaling=null")
        m = self.randomized_max
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"pe.randomized_max={m!r} must be a positive integer (positions "
                              "are drawn from [0, pe.randomized_max)) or null")
        reads_token = ((a.type != "none" and a.index == "token")
                       or (r.type != "none" and r.index == "token"))
        if m is not None and not reads_token:
            raise ConfigError(f"pe.randomized_max randomizes the token index, which no part of "
                              f"pe={self.name} reads; set pe.randomized_max=null")

    @property
    def uses_bilevel(self) -> bool:
        """True when any part reads intra or inter positions (needs segment boundaries)."""
        return ((self.absolute.type != "none" and self.absolute.index == "intra")
                or (self.relative.type != "none" and self.relative.index == "inter"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PEConfig:
        return build(cls, data, "pe")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def named(cls, name: str, max_positions: int | None = None, **relative: Any) -> PEConfig:
        """One of `NAMED_ENCODINGS`; `max_positions` sizes a learned table (by default one over
        randomized positions has `randomized_max` rows)."""
        if name not in NAMED_ENCODINGS:
            raise ConfigError(f"pe={name!r} is unknown; choose one of {sorted(NAMED_ENCODINGS)}")
        spec = NAMED_ENCODINGS[name]
        absolute = dict(spec.get("absolute", {}))
        randomized = spec.get("randomized_max")
        if absolute.get("type") == "learned":
            absolute["max_positions"] = randomized if max_positions is None else max_positions
        return cls(name=name, absolute=absolute, relative={**spec.get("relative", {}), **relative},
                   randomized_max=randomized)


# name -> {"absolute": {...}, "relative": {...}, and optionally "randomized_max": int}
NAMED_ENCODINGS: dict[str, dict[str, Any]] = {
    "nope": {},
    "sinusoidal": {"absolute": {"type": "sinusoidal", "index": "token"}},
    "learned": {"absolute": {"type": "learned", "index": "token"}},
    "rope": {"relative": {"type": "rope", "index": "token"}},
    "alibi": {"relative": {"type": "alibi", "index": "token"}},
    "bipe_rope": {"absolute": {"type": "learned", "index": "intra"},
                  "relative": {"type": "rope", "index": "inter"}},
    "bipe_alibi": {"absolute": {"type": "learned", "index": "intra"},
                   "relative": {"type": "alibi", "index": "inter", "slope_multiplier": 96.0}},
    "t5": {"relative": {"type": "t5", "index": "token"}},
    "bipe_t5": {"absolute": {"type": "learned", "index": "intra"},
                "relative": {"type": "t5", "index": "inter"}},
    "kerple": {"relative": {"type": "kerple", "index": "token"}},
    "bipe_kerple": {"absolute": {"type": "learned", "index": "intra"},
                    "relative": {"type": "kerple", "index": "inter"}},
    "fire": {"relative": {"type": "fire", "index": "token"}},
    "bipe_fire": {"absolute": {"type": "learned", "index": "intra"},
                  "relative": {"type": "fire", "index": "inter"}},
    "xpos": {"relative": {"type": "xpos", "index": "token"}},
    # Randomized positions from [0, 4096): 16x the default 256-token blocks, the longest test.
    "rope_randomized": {"relative": {"type": "rope", "index": "token"}, "randomized_max": 4096},
    "learned_randomized": {"absolute": {"type": "learned", "index": "token"},
                           "randomized_max": 4096},
}


def build(cls: type, data: Any, key: str) -> Any:
    """An instance of dataclass `cls` from a mapping (or `cls` itself); the one way this project
    turns a config section into its object: ConfigError naming `key.<field>` for an unknown key
    (with the valid ones), and the class's own `__post_init__` checks for the values."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        name = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ConfigError(f"unknown config key {name}; {hint}valid keys here: "
                          f"{', '.join(names)}")
    return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()})
