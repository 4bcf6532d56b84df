"""Bilevel positional encodings (BiPE) and the encodings they are compared with."""

from bipe.alibi import alibi_slopes
from bipe.encoding import NAMED_ENCODINGS, AttentionContext, PEConfig, PositionalEncoding, Positions
from bipe.positions import bilevel_ids, boundaries_from_separators
from bipe.rope import rope_frequencies

__all__ = [
    "NAMED_ENCODINGS",
    "AttentionContext",
    "PEConfig",
    "PositionalEncoding",
    "Positions",
    "alibi_slopes",
    "bilevel_ids",
    "boundaries_from_separators",
    "rope_frequencies",
]
