"""The field's standard bias baselines (docs/methods.md section 6) against their papers' formulas
by hand, T5's buckets against Hugging Face's own function, and each named encoding in a model:
its parameters train, save and load, and it decodes with a cache as in one pass.

Every registered part is also checked on every attention kernel by
tests/test_attention_contract.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bipe import AttentionOptions, LMInfinite, PEConfig
from bipe.config import NAMED_ENCODINGS, RelativeConfig
from bipe.encoding import RELATIVE_PARTS
from bipe.errors import ConfigError
from bipe.fire import FIRE
from bipe.kerple import KerpleLog
from bipe.t5 import T5Bias, t5_bucket
from models import KVCache
from tests.helpers import random_batch, tiny_model

NEW = ["t5", "bipe_t5", "kerple", "bipe_kerple", "fire", "bipe_fire"]
H, D = 3, 8


# --- T5 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 64), (64, 1000)])
def test_t5_buckets_are_hugging_faces(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    d = torch.arange(0, 4 * max_distance + 7)  # well past max_distance
    query, key = d, torch.zeros_like(d)  # HF takes key - query = -d
    want = T5Attention._relative_position_bucket(key - query, bidirectional=False,
                                                 num_buckets=num_buckets,
                                                 max_distance=max_distance)
    assert torch.equal(t5_bucket(d, num_buckets, max_distance), want)
    assert torch.equal(t5_bucket(d.float(), num_buckets, max_distance), want)  # as bias() calls
    assert want[-1].item() == num_buckets - 1


def test_t5_buckets_by_hand():
    # B = 32, M = 128: d < 16 exact; else 16 + floor(log(d / 16) / log(8) * 16), at most 31.
    want = {0: 0, 1: 1, 15: 15, 16: 16, 20: 17, 32: 21, 64: 26, 127: 31, 128: 31, 5000: 31}
    for d, bucket in want.items():
        if d >= 16:
            assert bucket == min(16 + math.floor(math.log(d / 16) / math.log(8) * 16), 31)
        assert t5_bucket(torch.tensor(d)).item() == bucket, d
    assert t5_bucket(torch.tensor(-3)).item() == 0  # a later key: distance 0 (masked anyway)


def test_t5_bias_is_the_table_at_the_bucket():
    part = T5Bias(D, H)
    assert part.table.shape == (H, 32)
    pos = torch.tensor([[0, 3, 20, 200]])
    bias = part.bias(pos, pos)
    assert bias.shape == (1, H, 4, 4)
    t = part.table.detach()
    assert bias[0, 2, 3, 0].item() == t[2, 31].item()  # d = 200 -> last bucket
    assert bias[0, 1, 2, 1].item() == t[1, 16].item()  # d = 17 -> 16 + floor(0.47)
    assert bias[0, 0, 1, 0].item() == t[0, 3].item()  # d = 3, exact
    capped = part.bias(pos, pos, cap=2)
    assert capped[0, 2, 3, 0].item() == t[2, 2].item()  # d = 200 clamped at 2


def test_t5_config_fields():
    part = RELATIVE_PARTS["t5"](D, H, **dataclasses.asdict(
        RelativeConfig(type="t5", num_buckets=8, max_distance=20)))
    assert part.table.shape == (H, 8) and part.max_distance == 20
    with pytest.raises(ConfigError, match="pe.relative.max_distance"):
        T5Bias(D, H, num_buckets=32, max_distance=16)
    with pytest.raises(ConfigError, match="pe.relative.num_buckets"):
        T5Bias(D, H, num_buckets=1)


# --- KERPLE -----------------------------------------------------------------------------------

def test_kerple_bias_by_hand():
    torch.manual_seed(0)
    part = KerpleLog(D, H)
    r1, r2 = (r.tolist() for r in part.coefficients())
    assert all(0.01 <= r <= 2 for r in r1) and all(0.01 <= r <= 1 for r in r2)  # KERPLE's init
    pos = torch.tensor([[0, 2, 7, 30]])
    bias = part.bias(pos, pos)
    for h, i, j in [(0, 1, 0), (1, 3, 0), (2, 3, 2), (2, 2, 2)]:
        d = abs(pos[0, i].item() - pos[0, j].item())
        assert bias[0, h, i, j].item() == pytest.approx(-r1[h] * math.log(1 + r2[h] * d),
                                                        rel=1e-6, abs=1e-7)
    capped = part.bias(pos, pos, cap=4)  # d = 30 becomes 4
    assert capped[0, 1, 3, 0].item() == pytest.approx(-r1[1] * math.log(1 + r2[1] * 4), rel=1e-6)


def test_kerple_coefficients_stay_positive():
    part = KerpleLog(D, H)
    with torch.no_grad():
        part.raw_r1.fill_(-30.0)
        part.raw_r2.fill_(-30.0)
    r1, r2 = part.coefficients()
    assert (r1 > 0).all() and (r2 > 0).all()


# --- FIRE -------------------------------------------------------------------------------------

def hand_fire(part: FIRE, c: float, L: float, i: int, j: int, h: int) -> float:
    """FIRE's formula by hand: `f(log(c (i - j) + 1) / log(c max(L, i) + 1))[h]`."""
    x = math.log(c * (i - j) + 1) / math.log(c * max(L, i) + 1)
    w1, b1, w2, b2 = (p.tolist() for p in (part.w1, part.b1, part.w2, part.b2))
    return b2[h] + sum(w2[h][k] * max(0.0, w1[k] * x + b1[k]) for k in range(len(w1)))


def small_fire() -> FIRE:
    part = FIRE(D, 2, fire_width=2, fire_threshold=4.0)  # L = 4
    with torch.no_grad():
        part.c.fill_(0.5)
        part.w1.copy_(torch.tensor([1.0, -1.0]))
        part.b1.copy_(torch.tensor([0.0, 0.5]))
        part.w2.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
        part.b2.copy_(torch.tensor([0.1, -0.2]))
    return part


def test_fire_bias_by_hand():
    part = small_fire()
    pos = torch.tensor([[0, 1, 3, 6, 10]])
    bias = part.bias(pos, pos)
    for h, i, j in [(0, 1, 0), (1, 2, 1), (0, 3, 0), (1, 4, 2), (0, 4, 4), (1, 0, 0)]:
        qi, kj = pos[0, i].item(), pos[0, j].item()  # below L = 4 and above it
        assert bias[0, h, i, j].item() == pytest.approx(hand_fire(part, 0.5, 4.0, qi, kj, h),
                                                        rel=1e-5, abs=1e-6)
    # LM-Infinite's cap: the distance is clamped, the query keeps its own normaliser.
    capped = part.bias(pos, pos, cap=2)
    assert capped[0, 1, 4, 0].item() == pytest.approx(hand_fire(part, 0.5, 4.0, 10, 8, 1),
                                                      rel=1e-5)


def test_fire_over_segments_reads_each_rows_positions():
    part = small_fire()
    pos = torch.tensor([[0, 0, 1, 5], [0, 1, 2, 2]])  # segment indices, one row per sequence
    bias = part.bias(pos, pos)
    assert bias.shape == (2, 2, 4, 4)
    assert bias[0, 0, 3, 1].item() == pytest.approx(hand_fire(part, 0.5, 4.0, 5, 0, 0), rel=1e-5)
    assert bias[1, 1, 3, 1].item() == pytest.approx(hand_fire(part, 0.5, 4.0, 2, 1, 1), rel=1e-5)


def test_fire_maps_every_querys_distances_into_0_1():
    part = FIRE(D, H)
    i = torch.arange(2000.0)[:, None]
    d = torch.arange(2000.0)[None, :]
    x = part.normalised(torch.minimum(d, i), i)
    assert x.min().item() == 0.0 and x.max().item() <= 1.0
    assert x[1999, 1999].item() == pytest.approx(1.0, abs=1e-5)  # beyond L: its own position
    assert x[100, 100].item() < 0.9  # below L = 512: normalised by L


def test_fire_width_and_threshold_from_the_config():
    cfg = RelativeConfig(type="fire", fire_width=5, fire_threshold=64.0)
    part = RELATIVE_PARTS["fire"](D, H, **dataclasses.asdict(cfg))
    assert part.w2.shape == (H, 5) and part.threshold == 64.0
    with pytest.raises(ConfigError, match="pe.relative.fire_width"):
        FIRE(D, H, fire_width=0)


SMALL = {"t5": lambda: T5Bias(D, H, num_buckets=8, max_distance=12),
         "kerple": lambda: KerpleLog(D, H), "fire": lambda: FIRE(D, H, fire_threshold=4.0)}


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("cap", [None, 3])
@torch.no_grad()
def test_score_mod_is_the_bias_tensor_pair_by_pair(name, cap):
    """Past FIRE's threshold too (the contract test's positions all stay below the default L),
    where the query's own position normalises: each pair's score_mod equals the tensor's entry."""
    torch.manual_seed(0)
    part = SMALL[name]()
    q_pos = torch.tensor([[0, 2, 5, 9, 30], [1, 1, 4, 20, 21]])
    k_pos = torch.tensor([[0, 1, 2, 3, 5, 9, 30], [0, 1, 1, 2, 4, 20, 21]])
    bias = part.bias(q_pos, k_pos, cap)
    score_mod = part.score_mod(q_pos, k_pos, cap)
    zero = torch.zeros(())
    for b in range(2):
        for h in range(H):
            for i in range(5):
                for j in range(7):
                    got = score_mod(zero, *(torch.tensor(x) for x in (b, h, i, j)))
                    if k_pos[b, j] <= q_pos[b, i]:  # the pairs attention keeps
                        assert got.item() == pytest.approx(bias[b, h, i, j].item(), abs=1e-6)


# --- in a model -------------------------------------------------------------------------------

def test_new_config_fields_default_to_null():
    """Study records fingerprint the config with nulls dropped: existing encodings unchanged."""
    cfg = RelativeConfig()
    assert all(getattr(cfg, f) is None for f in ("num_buckets", "max_distance", "fire_width",
                                                 "fire_threshold"))
    for name in NEW:
        assert name in NAMED_ENCODINGS


@pytest.mark.parametrize("name", NEW)
def test_parameters_train_and_round_trip_through_the_state_dict(name):
    model = tiny_model(name).train()
    ids, boundary = random_batch(2, 24)
    model(ids, boundary).logsumexp(-1).sum().backward()
    rel = dict(model.pe.relative.named_parameters())
    assert rel, name
    for n, p in rel.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, (name, n)
        assert f"pe.relative.{n}" in model.state_dict()

    model.eval()
    other = tiny_model(name, seed=1)
    with torch.no_grad():
        assert not torch.allclose(other(ids, boundary), model(ids, boundary))
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(ids, boundary), model(ids, boundary), rtol=0, atol=0)


@pytest.mark.parametrize("name", NEW)
@torch.no_grad()
def test_decodes_with_a_cache_as_in_one_pass(name):
    model = tiny_model(name, train_len=40)
    ids, boundary = random_batch(2, 40, p_boundary=0.3)
    for lm in (None, LMInfinite(n_global=3, n_local=6, distance_cap=4)):
        model.attention = AttentionOptions(lm_infinite=lm)
        want = model(ids, boundary)
        cache = KVCache.for_model(model)
        steps = [model(ids[:, :10], boundary[:, :10], cache=cache)]
        steps += [model(ids[:, t:t + 1], boundary[:, t:t + 1], cache=cache) for t in range(10, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)


def test_named_configs_build():
    for name in NEW:
        cfg = PEConfig.named(name, max_positions=32)
        assert cfg.relative.type in RELATIVE_PARTS and cfg.uses_bilevel == name.startswith("bipe")
