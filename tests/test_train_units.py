"""The training pieces on their own: schedule, loss, optimizer groups, W&B mode, the job wrapper."""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bipe.attention import AttentionOptions, choose_kernel
from bipe.errors import ConfigError
from evaluation.wandb_runs import api_key_configured, resolve_mode
from models import ModelConfig
from training.config import OptimConfig
from training.job import EXIT_USAGE, run_job
from training.module import LanguageModel, batch_seed, next_token_loss
from training.schedule import SCHEDULES, lr_multiplier


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_warms_up_linearly_then_decays_to_the_floor(schedule):
    kw = dict(max_steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    warm = [lr_multiplier(s, **kw) for s in range(11)]
    assert warm == pytest.approx([(s + 1) / 11 for s in range(10)] + [1.0])
    decay = [lr_multiplier(s, **kw) for s in range(10, 140)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # never rises
    end = 1.0 if schedule == "constant" else 0.1
    assert decay[90] == pytest.approx(end) and decay[-1] == pytest.approx(end)  # floor stays


def test_schedule_shapes_at_mid_decay():
    kw = dict(max_steps=110, warmup_steps=10, min_lr_ratio=0.0)
    assert lr_multiplier(60, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(35, schedule="cosine", **kw) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(35, schedule="linear", **kw) == pytest.approx(0.75)
    assert lr_multiplier(35, schedule="polynomial", power=2.0, **kw) == pytest.approx(0.5625)
    assert lr_multiplier(35, schedule="polynomial", power=1.0, **kw) == pytest.approx(
        lr_multiplier(35, schedule="linear", **kw))


def test_loss_is_summed_cross_entropy_over_scored_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    targets[0, 0] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :3] = False  # e.g. a prompt that is not scored
    total, count = next_token_loss(logits, targets, mask)
    keep = (targets != -100) & mask
    assert int(count) == int(keep.sum()) == 6
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    cfg = ModelConfig.from_dict({"vocab_size": 50, "n_layers": 1, "hidden_size": 16,
                                 "n_heads": 2, "pe": {"name": "bipe_rope",
                                                      "absolute": {"type": "learned",
                                                                   "index": "intra",
                                                                   "max_positions": 8},
                                                      "relative": {"type": "rope",
                                                                   "index": "inter"}}})
    module = LanguageModel(cfg, OptimConfig(weight_decay=0.3), max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decayed["weight_decay"] == 0.3 and plain["weight_decay"] == 0.0
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"embed.weight", "lm_head.weight", "pe.absolute.table.weight"} <= decayed_names
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert plain["params"] and all(p.dim() < 2 for p in plain["params"])  # RMSNorm weights
    assert len(decayed["params"]) + len(plain["params"]) == len(list(module.parameters()))

    # optim.pe_weight_decay: the positional table gets a group (and decay) of its own.
    module = LanguageModel(cfg, OptimConfig(weight_decay=0.3, pe_weight_decay=0.0), max_steps=10)
    decayed, plain, pe = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert pe["weight_decay"] == 0.0
    assert [names[id(p)] for p in pe["params"]] == ["pe.absolute.table.weight"]
    assert "pe.absolute.table.weight" not in {names[id(p)] for p in decayed["params"]}


def test_batch_seed_differs_per_batch_and_run():
    seeds = {batch_seed(s, k) for s in range(3) for k in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)
    assert batch_seed(0, 5) == batch_seed(0, 5)


def test_wandb_mode_environment_beats_config_beats_auto(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("online") == "online"
    assert resolve_mode(None) == "offline"  # no key anywhere
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert api_key_configured() and resolve_mode(None) == "online"
    (tmp_path / "netrc").write_text("machine example.com login u password p\n")
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online"
    with pytest.raises(ConfigError, match="logger.mode"):
        resolve_mode("sometimes")


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording `finish` calls."""
    calls = []
    fake = types.SimpleNamespace(run=object(), finish=lambda exit_code=0: calls.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def test_run_job_finishes_wandb_after_success_and_failure(fake_wandb):
    assert run_job(lambda cfg: 42, None) == 42

    def crash(cfg):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_job(crash, None)
    assert fake_wandb == [0, 1]


def test_each_job_of_a_reused_worker_logs_its_attention_kernel(fake_wandb, caplog):
    caplog.set_level(logging.INFO, logger="bipe.attention")

    def job(cfg):  # the kernel is logged once per kind, at its first use in a process
        for _ in range(2):
            choose_kernel(AttentionOptions(), None, device=torch.device("cpu"),
                          needs_grad=True, length=8)

    run_job(job, None)
    run_job(job, None)  # a sweep's second job in the same process: its train.log names it too
    assert caplog.messages.count("attention kernel: sdpa causal") == 2


def test_run_job_turns_a_bipe_error_into_one_line_and_status_2(fake_wandb, capsys):
    def bad(cfg):
        raise ConfigError("model.hidden_size=100 is wrong\nsecond line")

    with pytest.raises(SystemExit) as exit_info:
        run_job(bad, None)
    assert exit_info.value.code == EXIT_USAGE == 2
    assert capsys.readouterr().err == "error: model.hidden_size=100 is wrong\n"
    assert fake_wandb == [1]
