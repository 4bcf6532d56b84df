import math

import pytest
import torch

from bipe.errors import ConfigError
from bipe.rope import Rotary, apply_rotary, rope_frequencies


def test_unscaled_frequencies_match_formula():
    inv_freq, scale = rope_frequencies(64, 10000.0)
    expected = torch.tensor([10000.0 ** (-2 * d / 64) for d in range(32)])
    torch.testing.assert_close(inv_freq, expected)
    assert scale == 1.0 and inv_freq.dtype == torch.float32


def test_rotation_matches_hf_llama_layout():
    # Hugging Face Llama: dim d pairs with d + D/2; q_embed = q*cos + rotate_half(q)*sin
    D, T = 8, 5
    rot = Rotary(D, 1)
    pos = torch.arange(T)[None]
    cos, sin = rot.cos_sin(pos)
    q = torch.randn(1, 1, T, D)
    out = apply_rotary(q, cos, sin)
    for t in range(T):
        for d in range(D // 2):
            angle = t * 10000.0 ** (-2 * d / D)
            a, b = q[0, 0, t, d], q[0, 0, t, d + D // 2]
            assert out[0, 0, t, d].item() == pytest.approx(
                (a * math.cos(angle) - b * math.sin(angle)).item(), abs=1e-5)
            assert out[0, 0, t, d + D // 2].item() == pytest.approx(
                (b * math.cos(angle) + a * math.sin(angle)).item(), abs=1e-5)


def test_scores_depend_only_on_relative_position():
    rot = Rotary(16, 1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        ci, si = rot.cos_sin(torch.tensor([[i]]))
        cj, sj = rot.cos_sin(torch.tensor([[j]]))
        return (apply_rotary(q, ci, si) * apply_rotary(k, cj, sj)).sum().item()

    assert score(7, 3) == pytest.approx(score(1007, 1003), abs=1e-3)


def test_no_length_limit():
    rot = Rotary(32, 4)
    cos, _ = rot.cos_sin(torch.arange(64 * 1024)[None])
    assert cos.shape == (1, 1, 64 * 1024, 32) and torch.isfinite(cos).all()


def test_odd_head_size_is_a_config_error():
    with pytest.raises(ConfigError, match="odd"):
        rope_frequencies(33)
