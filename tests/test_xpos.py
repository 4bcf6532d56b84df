"""xPos (`bipe/xpos.py`, docs/methods.md section 6) against its formula by hand, against
torchscale's implementation in its own interleaved layout, and in the model: SDPA, the KV cache
and LM-Infinite give what a full forward gives."""

from __future__ import annotations

import math

import pytest
import torch

from bipe import AttentionOptions, LMInfinite, PEConfig
from bipe.attention import AttentionContext
from bipe.errors import ConfigError
from bipe.rope import Rotary
from bipe.xpos import XPos, xpos_centre
from models import KVCache, ModelConfig
from tests.helpers import random_batch, tiny_model

GAMMA = 512.0


def logit(part, q: torch.Tensor, k: torch.Tensor, n: int, m: int, keys: torch.Tensor) -> float:
    """`q` at position `n` against `k` at `m`, both `[D]`, turned by the pass whose keys sit at
    `keys` `[1, Tk]`."""
    rot = part.rotation(keys)
    q_n = rot.rotate(q.view(1, 1, 1, -1), torch.tensor([[n]]))
    k_m = rot.rotate_key(k.view(1, 1, 1, -1), torch.tensor([[m]]))
    return float((q_n * k_m).sum())


def pair_term(q: torch.Tensor, k: torch.Tensor, i: int, n: int, m: int, base: float = 1e4
              ) -> float:
    """RoPE's share of `q_n . k_m` from pair `i` = dimensions `(i, i + D/2)`, by hand."""
    D = q.numel()
    theta = base ** (-2 * i / D)

    def turn(x: torch.Tensor, p: int) -> tuple[float, float]:
        a, b = float(x[i]), float(x[i + D // 2])
        c, s = math.cos(p * theta), math.sin(p * theta)
        return a * c - b * s, b * c + a * s

    (qa, qb), (ka, kb) = turn(q, n), turn(k, m)
    return qa * ka + qb * kb


def zeta(i: int, D: int) -> float:
    return (2 * i + 0.4 * D) / (1.4 * D)


POSITIONS = [(5, 2), (40, 40), (700, 100), (1500, 3), (3000, 2990)]


@pytest.mark.parametrize(("n", "m"), POSITIONS)
def test_one_pair_logit_is_ropes_times_the_decay(n, m):
    """D = 2, one pair: the logit is RoPE's times zeta_0^((n - m) / gamma), zeta_0 = 0.8 / 2.8."""
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(2, generator=g), torch.randn(2, generator=g)
    keys = torch.arange(3001)[None]
    rope = logit(Rotary(2, 1), q, k, n, m, keys)
    want = rope * (0.8 / 2.8) ** ((n - m) / GAMMA)
    assert logit(XPos(2, 1), q, k, n, m, keys) == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(("n", "m"), POSITIONS)
def test_logit_is_the_sum_over_pairs_of_ropes_term_times_its_decay(n, m):
    """D = 8: `q_n . k_m = sum_i zeta_i^((n - m) / gamma) * RoPE's pair-i term`, pair i being
    dimensions (i, i + 4) (half-split), zeta_i = (2i + 3.2) / 11.2."""
    D = 8
    g = torch.Generator().manual_seed(m)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    want = sum(zeta(i, D) ** ((n - m) / GAMMA) * pair_term(q, k, i, n, m) for i in range(D // 2))
    for keys in (torch.arange(3001)[None], torch.arange(n + 1)[None]):  # any centre: the same
        assert logit(XPos(D, 1), q, k, n, m, keys) == pytest.approx(want, rel=1e-4, abs=1e-5)
    # Pair by pair: a query and key living on pair i alone get RoPE's logit times zeta_i^...
    for i in range(D // 2):
        mask = torch.zeros(D)
        mask[[i, i + D // 2]] = 1
        rope = logit(Rotary(D, 1), q * mask, k * mask, n, m, torch.arange(3001)[None])
        got = logit(XPos(D, 1), q * mask, k * mask, n, m, torch.arange(3001)[None])
        assert got == pytest.approx(rope * zeta(i, D) ** ((n - m) / GAMMA), rel=1e-4, abs=1e-6)


def test_scale_base_is_gamma():
    q, k = torch.ones(2), torch.ones(2)
    keys = torch.arange(200)[None]
    rope = logit(Rotary(2, 1), q, k, 150, 50, keys)
    got = logit(XPos(2, 1, scale_base=100.0), q, k, 150, 50, keys)
    assert got == pytest.approx(rope * (0.8 / 2.8) ** 1.0, rel=1e-5)


# --- torchscale's code, transcribed (microsoft/torchscale, component/xpos_relative_position.py,
# commit 776b070d): interleaved pairs (2i, 2i + 1), scale centred at min_pos = -L // 2 ---------

def torchscale_xpos(x: torch.Tensor, downscale: bool, scale_base: float = GAMMA) -> torch.Tensor:
    """torchscale's `XPOS(head_dim)(x, offset=0, downscale)`, `x` `[B*H, L, D]`."""
    length, D = x.shape[1], x.shape[2]
    zeta_half = (torch.arange(0, D, 2) + 0.4 * D) / (1.4 * D)
    min_pos = -length // 2
    max_pos = length + min_pos
    scale = zeta_half ** (torch.arange(min_pos, max_pos, 1).to(zeta_half) / scale_base)[:, None]
    dim = scale.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim) / dim))
    angles = torch.einsum("i , j -> i j", torch.arange(0, length, dtype=torch.float), inv_freq)
    sin, cos = torch.sin(angles), torch.cos(angles)
    if downscale:
        scale = 1 / scale

    def interleave(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1).repeat(1, 2).view(t.shape[0], -1)

    sin, cos = interleave(sin * scale), interleave(cos * scale)
    x1, x2 = x[:, :, ::2], x[:, :, 1::2]
    every_two = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + every_two * sin


@pytest.mark.parametrize("length", [7, 64, 1000])
def test_equals_torchscale_up_to_the_layout(length):
    """torchscale's pair i is dimensions (2i, 2i + 1), ours (i, i + D/2): with the dimensions
    permuted accordingly the turned queries and keys are the same vectors, the centre included
    (ours is `ceil(L / 2)` for keys at 0..L-1, torchscale's `-min_pos`)."""
    D = 16
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(2, 3, length, D, generator=g).unbind(0)  # torchscale's layout
    half_split = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])  # ours <- theirs
    pos = torch.arange(length)[None]
    rot = XPos(D, 1).rotation(pos)
    assert int(xpos_centre(pos)) == -(-length // 2)
    ours_q = rot.rotate(q[None, :, :, half_split], pos)[0]
    ours_k = rot.rotate_key(k[None, :, :, half_split], pos)[0]
    theirs_q = torchscale_xpos(q, downscale=False)[:, :, half_split]
    theirs_k = torchscale_xpos(k, downscale=True)[:, :, half_split]
    # (The two compute RoPE's frequencies in another order: angles of ~1000 rad differ by ~1e-4.)
    torch.testing.assert_close(ours_q, theirs_q, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ours_k, theirs_k, rtol=1e-3, atol=1e-4)


def test_powers_stay_finite_at_64k_tokens_in_float32():
    """Centred, the extreme factors at 65,536 keys are zeta_0^(+-64) ~ e^(+-80): in range."""
    pos = torch.arange(65536)[None]
    rot = XPos(64, 1).rotation(pos)
    for cos, sin in (rot.cos_sin(pos), rot.key_cos_sin(pos)):
        size = cos.abs() + sin.abs()  # the factor times |cos| + |sin|, which is >= 1
        assert torch.isfinite(size).all() and (size > 0).all()


def test_rope_turns_keys_as_queries_and_caches_them_turned():
    """The contract's extension leaves RoPE as it was: keys by the queries' cos and sin."""
    pos = torch.arange(10)[None]
    rope = Rotary(8, 2)
    rot = rope.rotation(pos)
    assert not rot.keys_apart
    x = torch.randn(1, 2, 10, 8)
    assert torch.equal(rot.rotate_key(x, pos), rot.rotate(x, pos))
    ctx = AttentionContext(past=0, length=10, q_pos=pos, k_pos=pos, part=rope)
    assert ctx.k_cos is None and ctx.key_rotary(torch.float32) == ctx.rotary(torch.float32)
    xpos_ctx = AttentionContext(past=0, length=10, q_pos=pos, k_pos=pos, part=XPos(8, 2))
    assert xpos_ctx.rotation.keys_apart and xpos_ctx.k_cos is not None


@pytest.mark.parametrize("index", ["token", "inter"])
@torch.no_grad()
def test_cached_decoding_equals_a_full_forward(index):
    """SDPA after cached tokens (keys cached unturned, all turned by their own positions in each
    pass's frame) and LM-Infinite's ring buffer give the full pass's logits: by a chunk, then
    token by token."""
    model = tiny_model(PEConfig(name="xpos", relative={"type": "xpos", "index": index}))
    ids, boundary = random_batch(2, 40, p_boundary=0.3)
    for lm in (None, LMInfinite(n_global=3, n_local=6, distance_cap=4)):
        model.attention = AttentionOptions(lm_infinite=lm)
        want = model(ids, boundary)
        cache = KVCache.for_model(model)
        steps = [model(ids[:, :10], boundary[:, :10], cache=cache),
                 model(ids[:, 10:17], boundary[:, 10:17], cache=cache)]
        steps += [model(ids[:, t:t + 1], boundary[:, t:t + 1], cache=cache) for t in range(17, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lm_infinite_scores_a_far_pair_as_at_the_cap():
    """The logit depends on n - m only, so LM-Infinite's capped pair (query turned by the cap,
    key at the origin) is the xPos logit at distance `cap`, decay included: well defined."""
    D, cap = 8, 6
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    rot = XPos(D, 1).rotation(torch.arange(500)[None])
    far = float((rot.rotate(q.view(1, 1, 1, D), torch.tensor(cap))
                 * rot.at_origin(k.view(1, 1, 1, D))).sum())
    want = sum(zeta(i, D) ** (cap / GAMMA) * pair_term(q, k, i, cap, 0) for i in range(D // 2))
    assert far == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_trains_through_sdpa():
    model = tiny_model("xpos").train()
    ids, _ = random_batch(2, 32)
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="odd"):
        ModelConfig(vocab_size=10, n_layers=1, hidden_size=6, n_heads=2, pe=PEConfig.named("xpos"))
    with pytest.raises(ConfigError, match="pe.relative.scale_base"):
        XPos(8, 1, scale_base=0)
    with pytest.raises(ConfigError, match="pe.relative.scaling applies to rope only"):
        PEConfig.named("xpos", scaling={"type": "linear", "factor": 2})
