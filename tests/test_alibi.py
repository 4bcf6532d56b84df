import math

import pytest
import torch

from bipe.alibi import ALiBi, alibi_slopes


def paper_slopes(n: int) -> list[float]:
    """ALiBi paper (Press et al. 2022), appendix: geometric slopes starting at 2^(-8/n); for n
    not a power of two, those of the closest lower power of two plus every other of the next."""
    def pow2(m):
        return [2 ** (-8 * (k + 1) / m) for k in range(m)]
    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + pow2(2 * c)[0::2][: n - c]


@pytest.mark.parametrize("h", range(1, 17))
def test_slopes_match_paper_formula(h):
    torch.testing.assert_close(alibi_slopes(h), torch.tensor(paper_slopes(h)))


def test_bipe_alibi_slopes_for_12_heads():
    # docs/methods.md: 12 heads x 96 = 48, 24, 12, 6, 3, 1.5, 0.75, 0.375, 67.9, 33.9, 17.0, 8.5
    got = (alibi_slopes(12) * 96).tolist()
    want = [48, 24, 12, 6, 3, 1.5, 0.75, 0.375, 67.9, 33.9, 17.0, 8.5]
    assert got == pytest.approx(want, abs=0.06)


def test_bias_is_minus_slope_times_distance():
    alibi = ALiBi(8, 2, slope_multiplier=2.0)
    pos = torch.tensor([[0, 0, 1, 3]])
    bias = alibi.bias(pos, pos)
    slopes = alibi_slopes(2) * 2.0
    assert bias.shape == (1, 2, 4, 4)
    assert bias[0, 1, 3, 0].item() == pytest.approx(-slopes[1].item() * 3)
    assert bias[0, 0, 1, 0].item() == 0.0  # same segment index: no penalty
