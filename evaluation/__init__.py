"""Evaluation: perplexity against length, passkey retrieval, generation quality, figures."""

from evaluation.generation_quality import generation_quality
from evaluation.memory import track_peak_memory
from evaluation.passkey import build_prompt, passkey_accuracy
from evaluation.perplexity import LengthResult, perplexity_at_length

__all__ = ["LengthResult", "build_prompt", "generation_quality", "passkey_accuracy",
           "perplexity_at_length", "track_peak_memory"]
