import math

import pytest
import torch

from bipe import AttentionOptions, LMInfinite, lambda_attention
from bipe.alibi import alibi_slopes
from bipe.rope import rope_frequencies
from models import KVCache
from tests.helpers import ENCODINGS, random_batch, tiny_model


def naive_lambda(q, k, v, *, n_global, n_local, positions, inv_freq, slopes, cap, scale=1.0):
    """Materialises every (i, j) pair: rotate k_j by the capped distance directly."""
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        p = positions[min(b, positions.shape[0] - 1)]
        for i in range(T):
            logits = torch.full((H, T), float("-inf"))
            for j in range(i + 1):
                if not (i - j < n_local or j < n_global):
                    continue
                d = int(p[i] - p[j])
                d = d if cap is None else min(d, cap)
                qi, kj = q[b, :, i], k[b, :, j]
                if inv_freq is not None:  # q_i . R(d) k_j, R rotating pairs (m, m + D/2)
                    ang = -d * inv_freq  # rotate k backwards by d = rotate q forwards by d
                    c, s = torch.cos(ang), torch.sin(ang)
                    k1, k2 = kj[:, : D // 2], kj[:, D // 2:]
                    kj = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], -1) * scale * scale
                logits[:, j] = (qi * kj).sum(-1) / math.sqrt(D)
                if slopes is not None:
                    logits[:, j] -= slopes * d
            out[b, :, i] = torch.einsum("ht,htd->hd", torch.softmax(logits, -1), v[b])
    return out


@pytest.mark.parametrize("kind", ["rope", "alibi", "none"])
@pytest.mark.parametrize(("n_global", "n_local", "cap", "bilevel"), [
    (2, 5, 5, False), (0, 4, None, False), (3, 6, 2, True), (1, 3, 7, True)])
def test_matches_naive_reference(kind, n_global, n_local, cap, bilevel):
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 23, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    if bilevel:  # segment indices, as BiPE passes them
        positions = torch.cumsum(torch.rand(B, T, generator=g) < 0.4, -1)
    else:
        positions = torch.arange(T)[None]
    inv_freq = rope_frequencies(D)[0] if kind == "rope" else None
    slopes = alibi_slopes(H) * 3 if kind == "alibi" else None
    got = lambda_attention(q, k, v, n_global=n_global, n_local=n_local, positions=positions,
                           inv_freq=inv_freq, alibi_slopes=slopes, distance_cap=cap,
                           block_size=4)
    want = naive_lambda(q, k, v, n_global=n_global, n_local=n_local, positions=positions,
                        inv_freq=inv_freq, slopes=slopes, cap=cap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rope_scale_squares_into_logits():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 9, 8, generator=g) for _ in range(3))
    inv_freq = rope_frequencies(8)[0]
    pos = torch.arange(9)[None]
    got = lambda_attention(q, k, v, n_global=1, n_local=3, positions=pos, inv_freq=inv_freq,
                           distance_cap=2, rope_scale=1.2)
    want = naive_lambda(q, k, v, n_global=1, n_local=3, positions=pos, inv_freq=inv_freq,
                        slopes=None, cap=2, scale=1.2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_wide_window_without_cap_is_causal_attention():
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    got = lambda_attention(q, k, v, n_global=0, n_local=40, block_size=7)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ENCODINGS)
def test_chunked_full_attention_equals_unchunked(name):
    model = tiny_model(name, train_len=64)
    ids, boundary = random_batch(2, 50)
    want = model(ids, boundary)
    model.attention = AttentionOptions(chunk_size=8)
    torch.testing.assert_close(model(ids, boundary), want, rtol=0, atol=1e-5)
    cache = KVCache.for_model(model)  # chunked prefill after a cached part
    got = torch.cat([model(ids[:, :20], boundary[:, :20], cache=cache),
                     model(ids[:, 20:], boundary[:, 20:], cache=cache)], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ENCODINGS)
def test_lm_infinite_with_huge_window_changes_nothing(name):
    model = tiny_model(name, train_len=64)
    ids, boundary = random_batch(2, 30)
    want = model(ids, boundary)
    model.attention = AttentionOptions(lm_infinite=LMInfinite(n_global=0, n_local=1000,
                                                              distance_cap=None))
    torch.testing.assert_close(model(ids, boundary), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ENCODINGS)
def test_lm_infinite_cached_decoding_equals_full_pass(name):
    model = tiny_model(name, train_len=64)
    model.attention = AttentionOptions(lm_infinite=LMInfinite(n_global=3, n_local=6,
                                                              distance_cap=4))
    ids, boundary = random_batch(2, 40, p_boundary=0.3)
    want = model(ids, boundary)
    cache = KVCache.for_model(model)
    steps = [model(ids[:, :10], boundary[:, :10], cache=cache)]
    sizes = []
    for t in range(10, 40):
        steps.append(model(ids[:, t:t + 1], boundary[:, t:t + 1], cache=cache))
        sizes.append(cache.k[0].shape[2])
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)
    assert max(sizes) <= 3 + 6  # constant memory: first n_global + last n_local keys


@pytest.mark.parametrize("name", ["rope", "bipe_rope", "bipe_alibi", "nope"])
def test_ring_buffer_takes_chunks_and_wraps_many_times(name):
    """Prefill, a multi-token chunk, then single tokens, past many turns of the ring: equal to
    the full Lambda pass, with each key rotated once (its rotated copy never changes)."""
    model = tiny_model(name, train_len=64)
    model.attention = AttentionOptions(lm_infinite=LMInfinite(n_global=2, n_local=5,
                                                              distance_cap=3))
    ids, boundary = random_batch(2, 48, p_boundary=0.3)
    want = model(ids, boundary)
    cache = KVCache.for_model(model)
    pieces = [(0, 4), (4, 13), *((t, t + 1) for t in range(13, 48))]
    steps = [model(ids[:, a:b], boundary[:, a:b], cache=cache) for a, b in pieces]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)
    assert cache.k[0].shape[2] == 2 + 5 and cache.slot_tokens.tolist() == [0, 1, 47, 43, 44,
                                                                           45, 46]


@pytest.mark.slow
@pytest.mark.parametrize("lm_infinite", [False, True])
@pytest.mark.parametrize("name", ENCODINGS)
@torch.no_grad()
def test_flex_and_sdpa_kernels_agree(name, lm_infinite):
    """The compiled flex kernel (ALiBi as score_mod, causal or Lambda block mask) and SDPA (or
    the block-wise Lambda reference) give the same outputs, BiPE segment positions included;
    300 tokens: the last 128-token block is partial."""
    model = tiny_model(name, train_len=300)
    ids, boundary = random_batch(2, 300, p_boundary=0.2)
    lm = LMInfinite(n_global=7, n_local=50, distance_cap=20) if lm_infinite else None
    model.attention = AttentionOptions(kernel="sdpa", lm_infinite=lm, chunk_size=64)
    want = model(ids, boundary)
    model.attention = AttentionOptions(kernel="flex", lm_infinite=lm)
    torch.testing.assert_close(model(ids, boundary), want, rtol=1e-5, atol=1e-5)
