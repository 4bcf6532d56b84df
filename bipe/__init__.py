"""Bilevel positional encodings (BiPE) and the encodings they are compared with."""

from bipe.alibi import alibi_slopes
from bipe.attention import AttentionContext, AttentionOptions, LMInfinite
from bipe.encoding import NAMED_ENCODINGS, PEConfig, PositionalEncoding, Positions
from bipe.lm_infinite import lambda_attention
from bipe.positions import bilevel_ids, boundaries_from_separators
from bipe.rope import rope_frequencies

__all__ = [
    "NAMED_ENCODINGS",
    "AttentionContext",
    "AttentionOptions",
    "LMInfinite",
    "PEConfig",
    "PositionalEncoding",
    "Positions",
    "alibi_slopes",
    "bilevel_ids",
    "boundaries_from_separators",
    "lambda_attention",
    "rope_frequencies",
]
