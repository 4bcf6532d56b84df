import pytest
import torch

from bipe.positions import boundaries_from_separators
from models import KVCache, generate
from tests.helpers import ENCODINGS, random_batch, tiny_model


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("prefill", [1, 9])
def test_cached_decoding_equals_full_forward(name, prefill):
    """Token-by-token decoding after a prefill, boundaries falling inside the decoded part."""
    model = tiny_model(name, train_len=64)
    ids, boundary = random_batch(2, 40, p_boundary=0.3)
    assert boundary[:, prefill:].any()
    full = model(ids, boundary)
    cache = KVCache(len(model.blocks))
    steps = [model(ids[:, :prefill], boundary[:, :prefill], cache=cache)]
    steps += [model(ids[:, t:t + 1], boundary[:, t:t + 1], cache=cache)
              for t in range(prefill, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["rope", "alibi", "bipe_rope", "bipe_alibi"])
def test_chunked_prefill_equals_full_forward(name):
    model = tiny_model(name, train_len=64)
    ids, boundary = random_batch(2, 40, p_boundary=0.3)
    cache = KVCache(len(model.blocks))
    chunks = [model(ids[:, a:b], boundary[:, a:b], cache=cache) for a, b in
              [(0, 13), (13, 14), (14, 31), (31, 40)]]
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids, boundary), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ENCODINGS)
def test_greedy_generate_agrees_with_full_forward(name):
    """Each generated token is the argmax of a full forward pass over the text so far, with
    boundaries from the separator ids, including separators the model generated itself."""
    model = tiny_model(name, train_len=64)
    separators = list(range(0, 61, 3))
    prompt, _ = random_batch(2, 10)
    out = generate(model, prompt, max_new_tokens=20, separator_ids=separators)
    assert out.shape == (2, 30) and torch.equal(out[:, :10], prompt)
    boundary = boundaries_from_separators(out, separators)
    assert boundary[:, 10:].any()
    logits = model(out, boundary)
    assert torch.equal(logits[:, 9:-1].argmax(-1), out[:, 10:])


@pytest.mark.parametrize("name", ["rope", "alibi", "bipe_rope", "bipe_alibi", "learned"])
def test_prompts_of_different_lengths_decode_as_if_alone(name):
    """`prompt_lengths`: one batched call gives every row what decoding it alone gives, with
    prompt boundaries taken from `boundary` and the padding after a short prompt never read."""
    model = tiny_model(name, train_len=64)
    separators = list(range(0, 61, 3))
    ids, boundary = random_batch(3, 12, p_boundary=0.3)
    lengths = torch.tensor([12, 4, 7])
    padded = ids.clone()
    padded[1, 4:] = 7  # whatever sits past a prompt must not matter
    padded[2, 7:] = 11
    eos = 5
    out = generate(model, padded, boundary, max_new_tokens=9, separator_ids=separators,
                   eos_id=eos, prompt_lengths=lengths)
    for r, p in enumerate(lengths.tolist()):
        alone = generate(model, ids[r : r + 1, :p], boundary[r : r + 1, :p], max_new_tokens=9,
                         separator_ids=separators, eos_id=eos)[0]
        n = min(alone.numel(), out.shape[1])
        assert torch.equal(out[r, :n], alone[:n]), r
        if alone.numel() > out.shape[1]:  # the batch stopped early: every row had its eos
            assert (alone[n:] == eos).all()
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, ids, max_new_tokens=2, prompt_lengths=torch.tensor([0, 3, 3]))


def test_sampling_is_seeded_and_eos_stops():
    model = tiny_model("bipe_alibi", train_len=64)
    prompt, _ = random_batch(2, 5)
    a = generate(model, prompt, max_new_tokens=15, temperature=1.0, top_k=10,
                 generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, max_new_tokens=15, temperature=1.0, top_k=10,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    eos = int(a[0, 5])  # the first sampled token of row 0 becomes the end token
    c = generate(model, prompt, max_new_tokens=15, temperature=1.0, top_k=10, eos_id=eos,
                 generator=torch.Generator().manual_seed(3))
    assert (c[0, 5:] == eos).all()
    row1 = c[1, 5:]
    if (row1 == eos).any():  # after a row emits eos it keeps emitting it
        first = int((row1 == eos).nonzero()[0])
        assert (row1[first:] == eos).all()
