"""`bipe.far_field`: a bias affine in the distance far from the diagonal (ALiBi, T5), the exact
bias near it, the far field folded into fused SDPA, each head's vanishing far past left out;
equal to the explicit bias."""

from __future__ import annotations

import math

import pytest
import torch

from bipe import AttentionOptions, PEConfig
from bipe.alibi import ALiBi
from bipe.attention import AttentionContext, BiasFlex, BiasSDPA, FarFieldSDPA
from bipe.far_field import far_field_attention, reach
from bipe.positions import bilevel_ids
from bipe.relative import LinearBias
from bipe.t5 import T5Bias
from tests.helpers import random_batch, tiny_model

B, H, T, D = 2, 4, 700, 8


def dense(q, k, v, pos, part):
    """Softmax over the explicit `[B, H, T, T]` float64 scores with the part's bias."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s + part.bias(pos, pos).double()
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


def segments(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return bilevel_ids(torch.rand(B, T, generator=g) < 0.2)[1]  # segment index, [B, T]


def t5(max_distance: int) -> T5Bias:
    part = T5Bias(D, H, num_buckets=16, max_distance=max_distance)
    with torch.no_grad():
        part.table.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(4))
    return part


CASES = {
    # steep heads see a few dozen tokens, one sees everything (slope 0)
    "alibi tokens": (torch.arange(T)[None], LinearBias(torch.tensor([2.0, 0.5, 0.05, 0.0])), 1.0),
    # BiPE-ALiBi's x96 slopes over segment indices (per batch element), large norms
    "alibi segments": (segments(0), LinearBias(torch.tensor([48.0, 6.0, 0.4, 0.0])), 3.0),
    # constant from 40 tokens on (its table far from 0, so a wrong constant shows)
    "t5 tokens": (torch.arange(T)[None], t5(40), 1.0),
    "t5 segments": (segments(1), t5(20), 2.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [64, 256])
@torch.inference_mode()
def test_equals_the_explicit_bias(case, block):
    pos, part, scale = CASES[case]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g) * scale for _ in range(3))
    if "alibi" in case:  # the windows really cut: the steepest head reaches a tenth or less
        zero = torch.zeros(1, 1, dtype=torch.long)
        assert reach(q, k, part.far_field(), part.bias(zero, zero)[0, :, 0, 0])[0] \
            < pos.max() / 10
    got = far_field_attention(q, k, v, pos, part, block)
    torch.testing.assert_close(got, dense(q, k, v, pos, part), rtol=1e-5, atol=2e-5)


def test_the_far_fields_are_the_parts_formulas():
    """Past `start` each part's bias is `offset + slope * d`, at every distance tried."""
    d = torch.arange(0, 5000)
    for part in (ALiBi(D, H), ALiBi(D, H, slope_multiplier=96.0), t5(40), T5Bias(D, H)):
        far = part.far_field()
        bias = part.bias(d[-1:][None], (d[-1] - d)[None])[0, :, 0]  # (H, distances)
        beyond = d >= far.start
        want = far.offset[:, None] + far.slope[:, None] * d[beyond].float()
        torch.testing.assert_close(bias[:, beyond], want, rtol=1e-6, atol=1e-4)
        assert (far.slope <= 0).all()
        if isinstance(part, T5Bias):  # and just before it the bias is not yet constant
            assert not torch.equal(bias[:, far.start - 20], bias[:, far.start])


@torch.inference_mode()
def test_a_far_key_that_dominates_is_kept():
    """The window grows with the norms: a key far back whose dot product with a late query
    outweighs its bias still gets its weight (a window of fixed width would drop it)."""
    pos, part = torch.arange(T)[None], LinearBias(torch.tensor([1.0, 1.0, 0.5, 0.5]))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, T, D, generator=g) * 0.1 for _ in range(3))
    k[:, :, 10] = 60.0 * q[:, :, T - 1] / q[:, :, T - 1].norm(dim=-1, keepdim=True)
    q[:, :, T - 1] = 60.0 * q[:, :, T - 1] / q[:, :, T - 1].norm(dim=-1, keepdim=True)
    v[:, :, 10] = 5.0
    want = dense(q, k, v, pos, part)
    assert want[:, :, T - 1].abs().max() > 1.0  # key 10 carries the last query's output
    got = far_field_attention(q, k, v, pos, part, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["alibi", "bipe_alibi", "t5", "bipe_t5"])
def test_a_model_at_inference_equals_its_training_kernel(name):
    """Above `chunk_size` without a gradient the model gets FarFieldSDPA; with one it gets
    the explicit bias (BiasSDPA): the logits agree."""
    model = tiny_model(PEConfig.named(name, max_positions=512)).eval()
    ids, boundary = random_batch(2, 300, p_boundary=0.2)
    model.attention = AttentionOptions(chunk_size=64)
    pos, part = torch.arange(300)[None], LinearBias(torch.ones(2))
    for grad, kind in ((True, BiasSDPA), (False, FarFieldSDPA)):
        with torch.set_grad_enabled(grad):
            ctx = AttentionContext(past=0, length=300, q_pos=pos, k_pos=pos,
                                   options=model.attention, part=part)
            assert type(ctx.kernel) is kind
    with torch.enable_grad():
        want = model(ids, boundary).detach()
    with torch.inference_mode():
        got = model(ids, boundary)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_outside_its_domain_the_explicit_bias_runs_instead(caplog, monkeypatch):
    """bfloat16 (the folded column would hold the bias to a fraction of a logit) and positions
    that decrease (the windows assume they never do) are computed with the explicit bias, and
    the log says so."""
    monkeypatch.setattr("bipe.attention._LOGGED", set())
    part = LinearBias(torch.tensor([0.5, 0.1]))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, D, generator=g) for _ in range(3))
    options = AttentionOptions(chunk_size=64)
    shuffled = torch.randperm(300, generator=g)[None]
    for pos, dtype, why in ((torch.arange(300)[None], torch.bfloat16, "not float32"),
                            (shuffled, torch.float32, "positions that decrease")):
        ctx = AttentionContext(past=0, length=300, q_pos=pos, k_pos=pos, options=options,
                               part=part)
        assert isinstance(ctx.kernel, FarFieldSDPA)
        x = [t.to(dtype) for t in (q, k, v)]
        with caplog.at_level("INFO", logger="bipe.attention"):
            got = ctx.attend(*x)
        assert why in caplog.text
        assert torch.equal(got, BiasSDPA.of(64, 300).attend(ctx, *x))


@torch.inference_mode()
@pytest.mark.parametrize("kernel", [FarFieldSDPA(), BiasFlex("flex", 64)])
def test_attention_dropout_runs_on_the_explicit_bias(kernel, caplog, monkeypatch):
    """Neither the far-field fold nor flex has attention dropout: such a call is SDPA with the
    explicit bias (the same dropout draws), and the log says why."""
    monkeypatch.setattr("bipe.attention._LOGGED", set())
    part = LinearBias(torch.tensor([0.5, 0.1]))
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 300, D, generator=g) for _ in range(3))
    pos = torch.arange(300)[None]
    ctx = AttentionContext(past=0, length=300, q_pos=pos, k_pos=pos,
                           options=AttentionOptions(chunk_size=64), part=part)
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="bipe.attention"):
        got = kernel.attend(ctx, q, k, v, dropout_p=0.3)
    assert "(attention dropout)" in caplog.text
    torch.manual_seed(0)
    assert torch.equal(got, BiasSDPA.of(64, 300).attend(ctx, q, k, v, dropout_p=0.3))
