import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bipe.attention import AttentionOptions
from evaluation import build_prompt, generation_quality, perplexity_at_length
from evaluation.passkey import FILLER, INSTRUCTION, KEY, QUESTION, _sentences, first_number
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [INSTRUCTION, QUESTION, KEY.format(key=12345), *FILLER] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_block_perplexity_matches_hand_computation():
    model = tiny_model("bipe_alibi", vocab=61, train_len=64)
    g = np.random.default_rng(0)
    ids = g.integers(0, 61, size=23)
    boundary = g.random(23) < 0.3
    res = perplexity_at_length(model, ids, boundary, length=8, batch_size=2)
    # By hand: blocks of 8 inputs at 0, 8, 16 (the last has 6 inputs), positions restart.
    nll, n = 0.0, 0
    for s in (0, 8, 16):
        e = min(s + 8, 22)
        x = torch.tensor(ids[s:e])[None]
        y = torch.tensor(ids[s + 1:e + 1])
        logits = model(x, torch.tensor(boundary[s:e])[None])[0]
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    assert res.tokens == n == 22 and res.windows == 3
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res.count_by_position.tolist() == [3] * 6 + [2] * 2


@pytest.mark.parametrize("stride", [3, 8])
def test_sliding_scores_every_token_once(stride):
    model = tiny_model("rope", vocab=61)
    ids = np.random.default_rng(1).integers(0, 61, size=41)  # 40 targets: 5 full blocks of 8
    blocks = perplexity_at_length(model, ids, None, length=8)
    sliding = perplexity_at_length(model, ids, None, length=8, protocol="sliding",
                                   stride=stride, batch_size=3)
    assert sliding.tokens == blocks.tokens == 40
    if stride == 8:  # stride == length: exactly the windows of the blocks protocol
        assert sliding.windows == 5 and sliding.nll == pytest.approx(blocks.nll, rel=1e-6)
    else:  # more context per scored token: a different (here: overlapping) computation
        assert sliding.windows > blocks.windows


def test_batching_does_not_change_the_result():
    model = tiny_model("bipe_rope", vocab=61)
    g = np.random.default_rng(2)
    ids, boundary = g.integers(0, 61, size=100), g.random(100) < 0.2
    one = perplexity_at_length(model, ids, boundary, length=16, batch_size=1)
    many = perplexity_at_length(model, ids, boundary, length=16, batch_size=4)
    assert many.nll == pytest.approx(one.nll, rel=1e-6)


def test_each_length_is_reported_as_soon_as_it_is_done():
    """`on_row` gets every row, in order, complete when it is called (the progress lines of the
    length check and eval.py), a length the model cannot run included."""
    from evaluation.perplexity import describe_row, perplexity_rows

    model = tiny_model("learned", vocab=61, train_len=16)  # no positions past 16
    ids = np.random.default_rng(3).integers(0, 61, size=65)
    seen = []
    rows, _ = perplexity_rows(model, ids, None, [8, 16, 32], base={"model": "m"},
                              train_length=16, on_row=lambda row: seen.append(dict(row)))
    assert seen == rows and [r["length"] for r in seen] == [8, 16, 32]
    assert seen[0]["ppl"] > 1 and seen[0]["tokens"] == 64 and seen[2]["ppl"] is None
    assert describe_row(seen[1]).startswith("len     16 (1x)  ppl ")
    assert f"{seen[1]['ppl']:.2f}" in describe_row(seen[1])
    assert "n/a" in describe_row(seen[2]) and seen[2]["note"] in describe_row(seen[2])


@pytest.mark.parametrize("length", [160, 203, 512])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_depth(tokenizer, length, depth):
    p = build_prompt(tokenizer, length, depth, key=48213)
    assert len(p.ids) == len(p.boundary) == length
    text = tokenizer.decode(p.ids)
    assert text.count("48213") == 2 and text.rstrip().endswith("The pass key is")
    key_ids = tokenizer.encode(" The pass key is").ids
    assert p.ids[p.key_start:p.key_start + len(key_ids)] == key_ids
    # The key sits `depth` of the way through the filler, to within one filler sentence.
    head = sum(map(len, _sentences(tokenizer, INSTRUCTION)))
    fixed = head + sum(map(len, _sentences(tokenizer, KEY.format(key=48213))
                           + _sentences(tokenizer, QUESTION)))
    sentence = max(len(tokenizer.encode(" " + f).ids) for f in FILLER)
    assert abs((p.key_start - head) - depth * (length - fixed)) <= sentence


def test_passkey_too_short_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="eval.passkey.lengths"):
        build_prompt(tokenizer, 10, 0.5, key=12345)


def test_first_number():
    assert first_number(" 48213. Remember") == 48213 and first_number(" none") is None


class Oracle(torch.nn.Module):
    """Knows the stream's rule next = (7 * prev + 3) % V: predicts the gold continuation."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.blocks = [None]  # KVCache sizing

    def forward(self, ids, boundary=None, cache=None):
        nxt = (7 * ids + 3) % self.vocab
        return F.one_hot(nxt, self.vocab).float()


def test_generation_quality_is_perfect_for_an_oracle(tokenizer):
    V = tokenizer.get_vocab_size()
    stream = [5]
    for _ in range(400):
        stream.append((7 * stream[-1] + 3) % V)
    oracle = Oracle(V)
    oracle.attention = AttentionOptions()
    rows = generation_quality(oracle, tokenizer, np.array(stream), None, [32, 64],
                              new_tokens=20, samples=3)
    assert [r["prefix"] for r in rows] == [32, 64]
    for r in rows:
        assert r["bleu"] == pytest.approx(100.0) and r["rougeL"] == pytest.approx(100.0)


@pytest.mark.parametrize(("values", "inside"), [([163.7, 281.0], True), ([20.0, 2000.0], False),
                                               ([5.01, 5.02], True)])
def test_log_axis_is_labelled_even_inside_one_decade(values, inside):
    """Matplotlib labels only powers of ten on a log axis: perplexities between 163 and 281 had
    no number at all on the figure."""
    import matplotlib.pyplot as plt

    from evaluation.plots import _label_log_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2], values)
    ax.set_yscale("log")
    _label_log_axis(ax, values)
    lo, hi = ax.get_ylim()
    labelled = [t for t in ax.get_yticks() if lo <= t <= hi]
    if inside:
        assert len(labelled) >= 2 and values[0] / 1.06 <= min(labelled)
        assert [t.get_text() for t in ax.get_yticklabels()][: len(labelled)]
    else:
        assert any(t in (100, 1000) for t in labelled)  # the default decade ticks stay
    plt.close(fig)


def test_nll_by_position_is_binned_into_a_readable_trend():
    """4,096 positions become at most 48 log-spaced bins, each the mean of its positions."""
    from evaluation.plots import log_bins

    nll = np.arange(4096, dtype=float)  # the NLL at position p is p
    centres, means = log_bins(nll, bins=48)
    assert len(centres) <= 48 and len(centres) == len(means)
    assert np.all(np.diff(centres) > 0) and means[0] == 0.0  # the first bin is position 0 alone
    assert means[-1] == pytest.approx(nll[-len(nll) // 16:].mean(), rel=0.1)
    assert np.all(np.diff(means) > 0)  # an increasing curve stays increasing
