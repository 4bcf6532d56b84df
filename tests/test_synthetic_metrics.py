"""Task metrics: an oracle scores 1.0, an untrained model scores low, errors are counted."""

from types import SimpleNamespace

import torch
from torch import nn

from bipe import PEConfig
from models import ModelConfig, Transformer
from tasks.arithmetic import arithmetic_accuracy
from tasks.bi_nfa import bi_nfa_accuracy
from tests.helpers import synthetic_dm


class Oracle(nn.Module):
    """Puts all mass on the true next token of whichever reference sequence the input continues.

    Works with and without a KV cache (it keeps the tokens seen so far on the cache object), so
    `models.generate` can drive it like a Transformer.
    """

    def __init__(self, sequences, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.blocks = nn.ModuleList()  # what KVCache.for_model reads
        self.attention = SimpleNamespace(lm_infinite=None)
        self.next = {}
        for seq in sequences:
            for t in range(len(seq) - 1):
                self.next[tuple(seq[: t + 1])] = seq[t + 1]

    def forward(self, input_ids, boundary=None, *, cache=None):
        B, T = input_ids.shape
        seen = getattr(cache, "oracle_seen", None) or [()] * B
        rows = [seen[b] + tuple(input_ids[b].tolist()) for b in range(B)]
        if cache is not None:
            cache.oracle_seen = rows
        logits = torch.full((B, T, self.vocab_size), -1e9)
        for b, row in enumerate(rows):
            for t in range(T):
                prefix = row[: len(row) - T + t + 1]
                logits[b, t, self.next.get(prefix, 0)] = 0.0  # unknown prefix: <pad>, wrong
        return logits


def references(batch):
    """Each row's full sequence: its real inputs and the final target."""
    out = []
    for ids, n, tgt in zip(batch["input_ids"], batch["length"], batch["targets"], strict=True):
        out.append(ids[:n].tolist() + [int(tgt[n - 1])])
    return out


def tiny_transformer(vocab, pe="bipe_rope"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layers=2, hidden_size=32, n_heads=4,
                      pe=PEConfig.named(pe, max_positions=64))
    return Transformer(cfg).eval()


def arithmetic_batch(operators=3, n=24):
    dm = synthetic_dm({"name": "arithmetic", "operators": operators, "n_val": n,
                              "eval_batch_size": n}, seed=0)
    return dm, next(iter(dm.val_dataloader()[1]))


def test_arithmetic_oracle_is_always_right_and_wrong_answers_are_counted():
    dm, batch = arithmetic_batch()
    assert len(set(batch["prompt_len"].tolist())) > 1  # several decoding groups
    oracle = Oracle(references(batch), dm.stats["vocab_size"])
    m = arithmetic_accuracy(oracle, batch)
    assert m["accuracy"] == 1.0 and m["exact"] == 1.0 and m["count"] == 24
    assert dm.score(oracle, batch)["correct"] == 24
    wrong = dict(batch, answer_id=(batch["answer_id"] - 10 + 1) % 11 + 10)
    assert arithmetic_accuracy(oracle, wrong)["accuracy"] == 0.0
    # without <eos> within the budget the last generated token is the prediction
    truncated = arithmetic_accuracy(oracle, batch, max_new_tokens=2)
    assert truncated["accuracy"] < 0.5 and truncated["exact"] == 0.0


def test_arithmetic_untrained_model_scores_low_and_keeps_its_mode():
    dm, batch = arithmetic_batch(operators=2, n=12)
    model = tiny_transformer(dm.stats["vocab_size"]).train()
    m = arithmetic_accuracy(model, batch)
    assert m["accuracy"] <= 0.3 and m["exact"] == 0.0
    assert model.training


def test_bi_nfa_oracle_random_model_and_one_wrong_state():
    dm = synthetic_dm({"name": "bi_nfa", "segments": [1, 4], "n_val": 16,
                              "eval_batch_size": 16}, seed=0)
    batch = next(iter(dm.val_dataloader()[1]))  # 8 segments
    refs = references(batch)
    m = bi_nfa_accuracy(Oracle(refs, dm.stats["vocab_size"]), batch)
    assert m["token_accuracy"] == 1.0 and m["sequence_accuracy"] == 1.0
    assert m["tokens"] == 16 * 8 and m["sequences"] == 16
    # change the first state label of row 0: one wrong token, one wrong sequence
    targets = batch["targets"].clone()
    first = int((targets[0] != -100).nonzero()[0])
    targets[0, first] = dm.task.vocab.index("{}")
    m = bi_nfa_accuracy(Oracle(refs, dm.stats["vocab_size"]), dict(batch, targets=targets))
    assert m["tokens_correct"] == 16 * 8 - 1 and m["sequences_correct"] == 15
    random_model = bi_nfa_accuracy(tiny_transformer(dm.stats["vocab_size"]), batch)
    assert random_model["token_accuracy"] < 0.5 and random_model["sequence_accuracy"] < 0.2
