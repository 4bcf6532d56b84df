import random

import pytest
import torch

from bipe.positions import bilevel_ids, boundaries_from_separators


def reference_bilevel_ids(flags: list[bool], max_intra: int | None = None):
    """The released BiPE `get_bilevel_ids` rule, written as a plain loop."""
    intra, inter, i, s = [], [], 0, 0
    for flag in flags:
        intra.append(i if max_intra is None else min(i, max_intra - 1))
        inter.append(s)
        i, s = (0, s + 1) if flag else (i + 1, s)
    return intra, inter


def test_worked_example_from_papers():
    # a b c| d e f g| h i| | k
    b = torch.zeros(11, dtype=torch.bool)
    b[[2, 6, 8, 9]] = True
    intra, inter = bilevel_ids(b[None])
    assert intra[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 0]
    assert inter[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 4]


@pytest.mark.parametrize("pattern", ["random", "all_true", "all_false", "runs"])
def test_matches_loop_reference(pattern):
    rng = random.Random(0)
    for trial in range(50):
        B, T = rng.randint(1, 4), rng.randint(1, 70)
        if pattern == "all_true":
            flags = [[True] * T for _ in range(B)]
        elif pattern == "all_false":
            flags = [[False] * T for _ in range(B)]
        elif pattern == "runs":  # long runs of consecutive boundaries and of non-boundaries
            flags = [[(t // rng.randint(1, 5)) % 2 == 0 for t in range(T)] for _ in range(B)]
        else:
            p = rng.random()
            flags = [[rng.random() < p for _ in range(T)] for _ in range(B)]
        max_intra = rng.choice([None, 1, 3, 8])
        intra, inter = bilevel_ids(torch.tensor(flags), max_intra=max_intra)
        for row, f in enumerate(flags):
            ref_intra, ref_inter = reference_bilevel_ids(f, max_intra)
            assert intra[row].tolist() == ref_intra, (trial, f, max_intra)
            assert inter[row].tolist() == ref_inter, (trial, f)


def test_clipping_only_touches_intra():
    b = torch.zeros(1, 20, dtype=torch.bool)
    intra, inter = bilevel_ids(b, max_intra=5)
    assert intra.max().item() == 4 and intra[0, -1].item() == 4
    assert inter.max().item() == 0


def test_continuation_equals_whole_sequence():
    g = torch.Generator().manual_seed(1)
    b = torch.rand(3, 40, generator=g) < 0.3
    intra, inter = bilevel_ids(b)
    for cut in (1, 7, 39):
        head_i, head_s = bilevel_ids(b[:, :cut])
        last = b[:, cut - 1]
        start = (torch.where(last, 0, head_i[:, -1] + 1), head_s[:, -1] + last.long())
        tail_i, tail_s = bilevel_ids(b[:, cut:], start=start)
        assert torch.equal(torch.cat([head_i, tail_i], 1), intra)
        assert torch.equal(torch.cat([head_s, tail_s], 1), inter)


def test_extra_batch_dims_and_dtype():
    b = torch.rand(2, 3, 9) < 0.5
    intra, inter = bilevel_ids(b)
    assert intra.shape == (2, 3, 9) and intra.dtype == torch.long
    flat_i, _ = bilevel_ids(b.reshape(6, 9))
    assert torch.equal(intra.reshape(6, 9), flat_i)
    with pytest.raises(TypeError):
        bilevel_ids(b.long())


def test_boundaries_from_separators():
    ids = torch.tensor([[5, 13, 7, 869, 29889, 13]])
    assert boundaries_from_separators(ids, [13, 869]).tolist() == [
        [False, True, False, True, False, True]]
    assert not boundaries_from_separators(ids, []).any()
