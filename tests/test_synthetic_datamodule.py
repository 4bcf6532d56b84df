"""SyntheticDataModule: resumable training stream, evaluation sets, batches, config errors."""

import pytest
import torch
from tokenizers import Tokenizer

from bipe.errors import ConfigError
from tasks import arithmetic as ar
from tests.helpers import synthetic_dm

SMALL = {"name": "arithmetic", "operators": 4, "batch_size": 8, "n_val": 12,
         "eval_batch_size": 5}


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_start_batch_k_reproduces_batch_k_and_seeds_differ():
    dm = synthetic_dm(SMALL, seed=3)
    it = iter(dm.train_dataloader())
    first = [next(it) for _ in range(4)]
    resumed = synthetic_dm(SMALL, seed=3)
    resumed.start_batch = 3
    assert equal(next(iter(resumed.train_dataloader())), first[3])
    assert not equal(first[0], first[1])
    other = synthetic_dm(SMALL, seed=4)
    assert not equal(next(iter(other.train_dataloader())), first[0])


def test_workers_keep_the_batch_order():
    dm = synthetic_dm({**SMALL, "num_workers": 2}, seed=1)
    it = iter(dm.train_dataloader())
    got = [next(it) for _ in range(3)]
    ref = dm.train_dataloader().dataset
    assert all(equal(g, ref.batch(k)) for k, g in enumerate(got))


def test_val_loaders_names_sizes_and_settings():
    dm = synthetic_dm(SMALL, seed=0)
    loaders = dm.val_dataloader()
    assert dm.val_names == ["ops_4", "ops_5", "ops_6", "ops_7"]
    assert len(loaders) == 4 and all(len(d.dataset) == 12 for d in loaders)
    for name, loader in zip(dm.val_names, loaders, strict=True):
        batches = list(loader)
        assert [b["input_ids"].shape[0] for b in batches] == [5, 5, 2]
        assert all((b["operators"] == int(name[4:])).all() for b in batches)
    # the same examples for every training seed; test sets are drawn separately
    again = synthetic_dm(SMALL, seed=9).val_dataloader()
    assert equal(next(iter(again[2])), next(iter(loaders[2])))
    test = dm.test_dataloader()
    assert not equal(next(iter(test[2])), next(iter(loaders[2])))


def test_training_never_draws_an_evaluation_question():
    cfg = {**SMALL, "operators": 1, "n_val": 30}  # one operator: few questions, many repeats
    dm = synthetic_dm(cfg, seed=0)
    dm.setup()
    held = dm._held_out
    assert len(held) > 20
    data = dm.train_dataloader().dataset
    drawn = [data.task.key(e) for k in range(20) for e in data.examples(k)]
    assert not held.intersection(drawn)


def test_padding_is_never_scored_and_never_a_boundary():
    dm = synthetic_dm(SMALL, seed=0)
    batch = next(iter(dm.train_dataloader()))
    T = batch["input_ids"].shape[1]
    real = torch.arange(T)[None] < batch["length"][:, None]
    assert (batch["input_ids"][~real] == dm.pad_id).all()
    assert (batch["targets"][~real] == -100).all() and not batch["boundary"][~real].any()
    assert (batch["input_ids"][real] != dm.pad_id).all()
    # scored targets: from the first '=' (prompt_len - 1) to the last real input
    idx = torch.arange(T)[None]
    expect = (idx >= batch["prompt_len"][:, None] - 1) & real
    assert torch.equal(batch["targets"] != -100, expect)
    assert (batch["input_ids"].gather(1, batch["prompt_len"][:, None] - 1) == ar.EQ_ID).all()
    assert torch.equal(batch["boundary"], batch["input_ids"] == ar.EQ_ID)


def test_stats_bound_what_training_produces():
    dm = synthetic_dm(SMALL, seed=0)
    data = dm.train_dataloader().dataset
    examples = [e for k in range(30) for e in data.examples(k)]
    assert max(e.segments() for e in examples) == dm.stats["max_segments_per_block"] == 5
    assert max(e.input_length for e in examples) <= dm.stats["max_input_length"]
    assert max(e.max_segment_length() for e in examples) <= dm.stats["max_segment_length"]
    assert all(isinstance(v, (int, float)) for v in dm.stats.values())
    bi = synthetic_dm({"name": "bi_nfa", "segments": [2, 6], "n_val": 4}, seed=0)
    data = bi.train_dataloader().dataset
    examples = [e for k in range(5) for e in data.examples(k)]
    assert max(e.segments() for e in examples) == bi.stats["max_segments_per_block"] == 6
    assert max(e.input_length for e in examples) <= bi.stats["max_input_length"]


def test_tokenizer_encodes_the_readable_form_and_travels_as_a_string():
    dm = synthetic_dm(SMALL, seed=0)
    batch = next(iter(dm.val_dataloader()[0]))
    row = batch["input_ids"][0, : batch["length"][0]].tolist()
    text = dm.tokenizer.decode(row, skip_special_tokens=False)
    restored = Tokenizer.from_str(dm.tokenizer.to_str())
    assert restored.encode(text).ids == row
    assert restored.token_to_id("<eos>") == dm.eod_id and dm.stats["vocab_size"] == 21
    bi = synthetic_dm({"name": "bi_nfa", "n_val": 4}, seed=0)
    seq = next(iter(bi.val_dataloader()[0]))["input_ids"][0].tolist()
    assert bi.tokenizer.encode(bi.tokenizer.decode(seq, skip_special_tokens=False)).ids == seq


@pytest.mark.parametrize(("cfg", "key"), [
    ({"name": "arithmetic", "operator": 5}, "task.operator"),
    ({"name": "arithmetic", "operators": 0}, "task.operators"),
    ({"name": "arithmetic", "direct": "yes"}, "task.direct"),
    ({"name": "arithmetic", "test_offsets": []}, "task.test_offsets"),
    ({"name": "bi_nfa", "segment_length": [5, 2]}, "task.segment_length"),
    ({"name": "bi_nfa", "outer_states": 7}, "task.outer_states"),
    ({"name": "bi_nfa", "density": 1.5}, "task.density"),
    ({"name": "bi_nfa", "outer_states": 1}, "task.outer_states"),
    ({"name": "bi_nfa", "alphabet": 2, "inner_states": 2, "outer_states": 2, "density": 1.0},
     "task (bi_nfa)"),  # every set saturates: no non-degenerate automaton
    ({"name": "lm"}, "task.name"),
])
def test_config_errors_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        synthetic_dm(cfg, seed=0)
