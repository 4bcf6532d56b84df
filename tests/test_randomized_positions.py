"""Randomized positions (Ruoss et al. 2023, docs/methods.md section 6; `pe.randomized_max`): the
draws, their determinism in training (the run's RNG) and in evaluation (the same on every
call, as the paper also draws at test time), the parts reading them, the one-line errors, and
runs that resume exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bipe import PEConfig, PositionalEncoding
from bipe.errors import ConfigError
from bipe.positions import randomized_positions
from models import KVCache, Transformer
from tests.conftest import compose_train
from tests.helpers import random_batch, tiny_model
from training.config import validate_config


def rope_randomized(randomized_max: int = 64) -> PEConfig:
    return PEConfig(name="rope_randomized", relative={"type": "rope", "index": "token"},
                    randomized_max=randomized_max)


def test_draws_are_sorted_distinct_and_in_range():
    g = torch.Generator().manual_seed(0)
    pos = randomized_positions(64, 20, 50, generator=g)
    assert pos.shape == (64, 20) and pos.dtype == torch.long
    assert (pos[:, 1:] > pos[:, :-1]).all()  # sorted, without replacement
    assert pos.min() >= 0 and pos.max() < 50
    assert len({tuple(row.tolist()) for row in pos}) == 64  # a draw per sequence
    assert torch.equal(randomized_positions(3, 50, 50, generator=g), torch.arange(50).expand(3, -1))


def test_every_position_is_drawn_equally_often():
    """Uniform without replacement: position p is in a draw of 8 from 32 with probability 1/4."""
    g = torch.Generator().manual_seed(1)
    pos = randomized_positions(4000, 8, 32, generator=g)
    counts = torch.bincount(pos.flatten(), minlength=32).float()
    assert ((counts - 1000).abs() < 100).all(), counts  # 1000 +- 3.6 sd


def test_a_sequence_longer_than_the_range_is_one_line_error():
    with pytest.raises(ConfigError, match="pe.randomized_max=16 is less than the sequence") as e:
        randomized_positions(1, 17, 16)
    assert "\n" not in str(e.value)


def test_training_draws_from_the_seeded_global_rng_and_evaluation_always_alike():
    pe = PositionalEncoding(rope_randomized(), hidden_size=32, n_heads=4).train()
    torch.manual_seed(5)
    a = pe.positions(None, 3, 10).token
    torch.manual_seed(5)
    assert torch.equal(pe.positions(None, 3, 10).token, a)  # the run's seed decides
    assert not torch.equal(pe.positions(None, 3, 10).token, a)  # and the stream moves on
    pe.eval()
    b = pe.positions(None, 3, 10).token
    torch.manual_seed(123)
    assert torch.equal(pe.positions(None, 3, 10).token, b)  # whatever the global RNG
    assert b.shape == (3, 10) and not torch.equal(b[0], b[1])  # still one draw per sequence


def test_without_randomized_max_positions_are_the_token_index():
    pe = PositionalEncoding(PEConfig.named("rope"), hidden_size=32, n_heads=4).train()
    assert torch.equal(pe.positions(None, 2, 7).token, torch.arange(7)[None])


def test_the_parts_read_the_drawn_positions():
    """The learned table adds its rows at the drawn positions; RoPE rotates by them."""
    cfg = PEConfig(name="learned_randomized", absolute={"type": "learned", "index": "token",
                                                        "max_positions": 64}, randomized_max=64)
    pe = PositionalEncoding(cfg, hidden_size=16, n_heads=2).eval()
    pos = pe.positions(None, 2, 5)
    h = torch.zeros(2, 5, 16)
    assert torch.equal(pe.embed(h, pos), pe.absolute.table.weight[pos.token])
    rope = PositionalEncoding(rope_randomized(), hidden_size=16, n_heads=2).eval()
    pos = rope.positions(None, 2, 5)
    ctx = rope.context(rope.relative_positions(pos), rope.relative_positions(pos), 0, 5)
    torch.testing.assert_close(ctx.cos, rope.relative.cos_sin(pos.token)[0])
    assert ctx.cos.shape == (2, 1, 5, 8)


@torch.no_grad()
def test_a_model_evaluates_deterministically_and_trains_on_fresh_draws():
    model = tiny_model(rope_randomized(256))
    ids, _ = random_batch(2, 32)
    torch.manual_seed(0)
    first = model(ids)
    torch.manual_seed(1)
    torch.testing.assert_close(model(ids), first, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    a = model(ids)
    torch.manual_seed(1)
    assert not torch.allclose(model(ids), a)


def test_kv_cached_decoding_is_one_line_error():
    model = tiny_model(rope_randomized())
    ids, _ = random_batch(1, 8)
    cache = KVCache.for_model(model)
    model(ids[:, :4], cache=cache)
    with pytest.raises(ConfigError, match="KV cache cannot extend") as e:
        model(ids[:, 4:5], cache=cache)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("pe", "match"), [
    ({"randomized_max": 0}, "pe.randomized_max=0 must be a positive integer"),
    ({"randomized_max": True}, "pe.randomized_max=True must be a positive integer"),
    ({"name": "bipe_rope", "absolute": {"type": "learned", "index": "intra", "max_positions": 8},
      "relative": {"type": "rope", "index": "inter"}, "randomized_max": 64},
     "no part of pe=bipe_rope reads"),
])
def test_bad_settings_are_one_line_errors(pe, match):
    with pytest.raises(ConfigError, match=match) as e:
        PEConfig.from_dict({"relative": {"type": "rope"}, **pe})
    assert "\n" not in str(e.value)


def test_named_encodings_and_a_learned_table_of_randomized_max_rows():
    assert PEConfig.named("rope_randomized").randomized_max == 4096
    learned = PEConfig.named("learned_randomized")
    assert learned.randomized_max == learned.absolute.max_positions == 4096
    small = PEConfig.named("learned_randomized", max_positions=64)  # rows < the range drawn from
    model = tiny_model(small)
    with pytest.raises(ConfigError, match="learned token table of 64 rows"):
        model(random_batch(1, 8)[0])


@pytest.mark.parametrize(("overrides", "key"), [
    (["pe=rope_randomized", "pe.randomized_max=16"], "pe.randomized_max=16 is less than "
                                                     "data.block_size=32"),
    (["pe=learned_randomized", "pe.absolute.max_positions=64"], "pe.absolute.max_positions=64"),
])
def test_the_run_config_is_checked_before_any_work(overrides, key, corpus, cache_dir, tmp_path):
    from tests.conftest import smoke_overrides

    cfg = compose_train([*smoke_overrides(corpus, cache_dir), *overrides], tmp_path)
    with pytest.raises(ConfigError, match=key) as e:
        validate_config(cfg)
    assert "\n" not in str(e.value)


def test_a_task_whose_test_sequences_pass_the_range_is_refused(tmp_path):
    from tasks import get_task

    pe = {**PEConfig.named("rope_randomized").to_dict(), "randomized_max": 8}
    with pytest.raises(ConfigError, match="pe.randomized_max=8 cannot cover task=arithmetic"):
        get_task("arithmetic")({"name": "arithmetic"}).datamodule({"seed": 0, "pe": pe}, None,
                                                                  tmp_path)


def test_learned_randomized_follows_an_overridden_range(corpus, cache_dir, tmp_path):
    from tests.conftest import smoke_overrides

    cfg = compose_train([*smoke_overrides(corpus, cache_dir), "pe=learned_randomized",
                         "pe.randomized_max=512"], tmp_path)
    assert cfg.pe.absolute.max_positions == 512
    validate_config(cfg)


@pytest.mark.parametrize("pe", ["rope_randomized", "learned_randomized"])
def test_a_run_trains_and_its_report_is_reproduced_by_the_checkpoint(pe, run_train):
    """The end-of-run report evaluates with randomized positions (drawn alike on every call):
    the model rebuilt from the checkpoint scores the same 1x perplexity; 2x runs too."""
    from data import LMDataModule
    from training.module import next_token_loss

    _, run_dir = run_train(pe, f"pe={pe}")
    model = Transformer.from_pretrained(run_dir / "checkpoints" / "last.ckpt")
    assert model.config.pe.randomized_max == 4096
    report = json.loads((run_dir / "length_eval.json").read_text())
    dm = LMDataModule(model.meta["run_config"]["data"], seed=0)
    ids, _ = dm.split_arrays("validation")
    n = 4 * 32
    inputs = torch.from_numpy(ids[:n].astype("int64")).view(4, 32)
    targets = torch.from_numpy(ids[1 : n + 1].astype("int64")).view(4, 32)
    with torch.no_grad():
        total, count = next_token_loss(model(inputs), targets)
    assert math.exp(total.item() / int(count)) == pytest.approx(report["results"][0]["ppl"],
                                                                rel=1e-4)
    assert report["results"][1]["ppl"] is not None


def test_a_resumed_run_matches_an_uninterrupted_one_bitwise(run_train):
    """The draws come from the global RNG, which training reseeds per batch: a run stopped
    after its validation at step 4 and resumed ends with the uninterrupted run's weights."""
    common = ["pe=rope_randomized", "model.dropout=0.1", "trainer.max_steps=8",
              "trainer.val_check_interval=4"]
    _, full = run_train("full", *common)
    stop = ["+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
            "+callbacks.stop.monitor=val/loss", "+callbacks.stop.stopping_threshold=1e9"]
    _, first = run_train("first", *common, *stop)
    _, resumed = run_train("resumed", *common, f"ckpt_path={first}")
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
