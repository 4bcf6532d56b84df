"""End-to-end training runs (in-process, seconds each): every encoding, resume, init_from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data import LMDataModule
from models import Transformer
from models.checkpoint import CHECKPOINT_KEY
from training.module import next_token_loss

ENCODINGS = ["nope", "sinusoidal", "learned", "rope", "alibi", "bipe_rope", "bipe_alibi"]


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("pe", ENCODINGS)
def test_each_encoding_trains_and_its_checkpoint_rebuilds_the_model(pe, run_train):
    metrics, run_dir = run_train(pe, f"pe={pe}")
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # self-describing and plain: no pickled objects
    meta = ckpt[CHECKPOINT_KEY]
    assert ckpt["global_step"] == 6 and meta["global_step"] == 6
    assert meta["model_config"]["pe"]["name"] == pe
    assert meta["run_config"]["pe"]["name"] == pe and meta["data_stats"]["block_size"] == 32
    assert meta["data_stats"]["max_segments_per_block"] >= 1

    # The model rebuilt from the checkpoint alone reproduces the run's own 1x perplexity.
    model = Transformer.from_pretrained(last)
    tokenizer = model.tokenizer
    assert model.config.vocab_size == tokenizer.get_vocab_size()
    report = json.loads((run_dir / "length_eval.json").read_text())
    at_1x = report["results"][0]
    dm = LMDataModule(meta["run_config"]["data"], seed=0)
    ids, boundary = dm.split_arrays("validation")
    n = 4 * 32  # experiment=smoke scores 4 blocks of 32 tokens per length
    inputs = torch.from_numpy(ids[:n].astype("int64")).view(4, 32)
    targets = torch.from_numpy(ids[1 : n + 1].astype("int64")).view(4, 32)
    with torch.no_grad():
        logits = model(inputs, torch.from_numpy(boundary[:n].copy()).view(4, 32))
        total, count = next_token_loss(logits, targets)
    assert int(count) == at_1x["tokens"] == 4 * 32
    assert math.exp(total.item() / int(count)) == pytest.approx(at_1x["ppl"], rel=1e-4)
    # It learned something in 6 steps: better than a uniform guess over the vocabulary.
    assert metrics["eval/ppl_1x"] < 0.8 * model.config.vocab_size

    at_2x = report["results"][1]
    if pe == "learned":  # a learned token table has no rows past the training length
        assert at_2x["ppl"] is None and "max_positions" in at_2x["note"]
    else:
        assert at_2x["ppl"] is not None and at_2x["length"] == 64


@pytest.mark.parametrize("accumulate", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_matches_an_uninterrupted_run_bitwise(accumulate, run_train):
    # Dropout > 0: the masks after the resume must be the ones the uninterrupted run drew.
    common = ["model.dropout=0.1", "trainer.max_steps=8", "trainer.precision=32-true",
              f"trainer.accumulate_grad_batches={accumulate}",
              f"trainer.val_check_interval={4 * accumulate}"]
    _, full = run_train("full", *common)
    # The same run, stopped after its validation at step 4 (as if killed there) ...
    stop = ["+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
            "+callbacks.stop.monitor=val/loss", "+callbacks.stop.stopping_threshold=1e9"]
    _, first = run_train("first", *common, *stop)
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # ... then resumed from its run folder (-> checkpoints/last.ckpt).
    _, resumed = run_train("resumed", *common, f"ckpt_path={first}")

    a = weights(full / "checkpoints" / "last.ckpt")
    b = weights(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"
    # Control: the checkpoint at step 4 is really different, so the comparison has teeth.
    c = weights(first / "checkpoints" / "last.ckpt")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_init_from_loads_weights_only(run_train):
    _, source = run_train("source")
    # lr 1e-30: every update rounds away in fp32, so the weights after training equal the ones
    # training started from, which must be the source's.
    _, tuned = run_train("tuned", f"init_from={source / 'checkpoints' / 'last.ckpt'}",
                         "optim.lr=1e-30", "trainer.max_steps=2", "trainer.val_check_interval=2")
    src = torch.load(source / "checkpoints" / "last.ckpt", weights_only=True)
    new = torch.load(tuned / "checkpoints" / "last.ckpt", weights_only=True)
    assert new["global_step"] == 2  # a new run: steps restart at 0
    assert all(torch.equal(src["state_dict"][k], new["state_dict"][k]) for k in src["state_dict"])
    # Fresh optimizer: its step counters count only the new run's 2 steps.
    steps = {float(s["step"]) for s in new["optimizer_states"][0]["state"].values()}
    assert steps == {2.0}
    assert new[CHECKPOINT_KEY]["tokenizer"] == src[CHECKPOINT_KEY]["tokenizer"]


class FailAtStep:
    """A callback that crashes the run when `step` optimizer steps are done."""

    def __new__(cls, step: int):
        import lightning as L

        class _Fail(L.Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == step:
                    raise RuntimeError(f"simulated crash at step {step}")

        return _Fail()


@pytest.mark.slow
def test_a_crashed_run_resumes_from_its_interrupted_checkpoint_bitwise(run_train, tmp_path):
    common = ["model.dropout=0.1", "trainer.max_steps=8", "trainer.val_check_interval=4"]
    _, full = run_train("full", *common)
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        run_train("crashed", *common, "+callbacks.fail._target_=tests.test_train.FailAtStep",
                  "+callbacks.fail.step=6")
    crashed = torch.load(tmp_path / "crashed" / "checkpoints" / "interrupted.ckpt",
                         weights_only=True)
    assert crashed["global_step"] == 6  # two steps past the last validation's checkpoint
    _, resumed = run_train("resumed", *common, f"ckpt_path={tmp_path / 'crashed'}")
    a = weights(full / "checkpoints" / "last.ckpt")
    b = weights(resumed / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_writes_its_metrics_and_returns_the_optimized_one(run_train):
    """What a sweeper optimises: `optimized_metric` is one of the run's final metrics (the last
    validation's included), also written to metrics.json; a name the run lacks is an error."""
    from bipe.errors import ConfigError
    from tests.conftest import compose_train
    from training.run import optimized_value

    metrics, run_dir = run_train("tuned", "optimized_metric=val/loss")
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["global_step"] == 6 and saved["seed"] == 0
    assert saved["metrics"]["val/loss"] == pytest.approx(metrics["val/loss"])
    assert {"eval/ppl_1x", "val/ppl"} <= set(saved["metrics"])
    cfg = compose_train(["optimized_metric=val/loss"])
    assert optimized_value(cfg, metrics) == pytest.approx(metrics["val/loss"])
    assert optimized_value(compose_train([]), metrics) is None
    with pytest.raises(ConfigError, match="optimized_metric=val/acc is not a metric of this run"):
        optimized_value(compose_train(["optimized_metric=val/acc"]), metrics)


def test_logger_tensorboard_writes_the_runs_metrics_as_event_files(run_train):
    """logger=tensorboard: <run>/tensorboard/events.out.tfevents.* holds the training loss at
    every step, each validation's val/loss and the end-of-run perplexities, as metrics.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, run_dir = run_train("tb", "logger=tensorboard")
    # Two files: the end-of-run metrics come after Lightning closed the first at fit's end.
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "tensorboard" / "hparams.yaml").is_file()
    scalars = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in scalars.Scalars("train/loss")] == list(range(6))
    assert [e.step for e in scalars.Scalars("val/loss")][:2] == [2, 5]  # after steps 3 and 6
    assert "hp_metric" not in scalars.Tags()["scalars"]
    final = scalars.Scalars("eval/ppl_2x")[-1].value
    assert final == pytest.approx(metrics["eval/ppl_2x"], rel=1e-5)


@pytest.mark.slow
def test_compiled_and_plain_checkpoints_load_into_each_other(run_train):
    """compile=true trains the same model under torch.compile: its checkpoint has the plain
    parameter names and resumes uncompiled, and the other way round."""
    import torch

    compiled, c_dir = run_train("compiled", "compile=true", "pe=bipe_alibi")
    plain, p_dir = run_train("plain", "compile=false", "pe=bipe_alibi")
    c_state, p_state = (weights(d / "checkpoints" / "last.ckpt") for d in (c_dir, p_dir))
    assert set(c_state) == set(p_state) and not any("_orig_mod" in k for k in c_state)
    for name in p_state:
        torch.testing.assert_close(c_state[name], p_state[name], rtol=0, atol=1e-4)
    _, resumed = run_train("resumed", "compile=false", "pe=bipe_alibi", "trainer.max_steps=8",
                           f"ckpt_path={c_dir}")
    _, resumed_c = run_train("resumed_c", "compile=true", "pe=bipe_alibi", "trainer.max_steps=8",
                             f"ckpt_path={p_dir}")
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] \
        == torch.load(resumed_c / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] \
        == 8
