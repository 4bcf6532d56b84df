"""eval.py end to end on tiny checkpoints made by train.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from tests.conftest import CONF


def compose_eval(overrides: list[str], out: Path, cache_dir: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.cache_dir = cache_dir
    return cfg


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, corpus, cache_dir):
    from tests.conftest import compose_train, smoke_overrides
    from train import train

    sweep = tmp_path_factory.mktemp("sweep")
    for pe in ("rope", "bipe_alibi"):
        train(compose_train([*smoke_overrides(corpus, cache_dir), f"pe={pe}"], sweep / pe))
    return sweep


def test_eval_writes_every_output_and_matches_a_hand_computed_block(two_runs, cache_dir,
                                                                    tmp_path):
    from eval import evaluate
    from evaluation.checkpoints import LoadedModel
    from evaluation.streams import load_stream
    from models import Transformer

    out = tmp_path / "eval"
    cfg = compose_eval([f"sweep_dir={two_runs}", "eval.max_tokens=32", "eval.lengths=[1,2]",
                        "eval.datasets=[train]", "eval.lm_infinite.enabled=both",
                        "logger=none"], out, cache_dir)  # no logger: must not crash at the end
    packed = sorted(p.name for p in (Path(cache_dir) / "packed").iterdir() if p.is_dir())
    evaluate(cfg)
    # The checkpoints' own corpus is read from the cache training built: no second cache.
    assert sorted(p.name for p in (Path(cache_dir) / "packed").iterdir() if p.is_dir()) == packed
    for name in ("results.json", "ppl_vs_length.csv", "ppl_vs_length.png",
                 "nll_by_position.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    rows = results["perplexity"]
    # 2 models x 2 lengths x (plain, LM-Infinite)
    assert {(r["model"], r["length"]) for r in rows} == {
        (m, n) for m in ("rope", "rope+lminf", "bipe_alibi", "bipe_alibi+lminf")
        for n in (32, 64)}
    # By hand: the first 32-token block of the test split, scored by the rope checkpoint.
    ckpt = two_runs / "rope" / "checkpoints" / "last.ckpt"
    model = Transformer.from_pretrained(ckpt)
    meta = model.meta
    lm = LoadedModel("rope", ckpt, model, None, meta, 32)
    ids, boundary, _ = load_stream(lm, "train", "test", 32, Path(cache_dir))
    x, y = torch.tensor(ids[:32].astype(np.int64)), torch.tensor(ids[1:33].astype(np.int64))
    with torch.no_grad():
        nll = F.cross_entropy(model(x[None], torch.tensor(boundary[:32])[None])[0], y)
    row = next(r for r in rows if r["model"] == "rope" and r["length"] == 32)
    assert row["tokens"] == 32
    assert row["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_missing_checkpoint_is_one_clear_error(tmp_path, cache_dir):
    from bipe.errors import CheckpointError, ConfigError
    from eval import evaluate

    with pytest.raises(ConfigError, match="ckpt_path=PATH"):
        evaluate(compose_eval([], tmp_path / "e1", cache_dir))
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(compose_eval([f"ckpt={tmp_path / 'nope.ckpt'}"], tmp_path / "e2", cache_dir))


def test_eval_of_a_run_folder_logs_each_length_and_joins_the_runs_wandb_group(
        two_runs, cache_dir, tmp_path, monkeypatch, caplog):
    """`eval.py ckpt_path=RUN`: a log line per model, dataset and length, and its W&B run in the
    group the training run recorded in wandb_run.json (a stand-in wandb records the call)."""
    import logging
    import shutil
    import sys
    from types import SimpleNamespace

    from eval import evaluate

    run = tmp_path / "run"
    shutil.copytree(two_runs / "rope", run)
    (run / "wandb_run.json").write_text(json.dumps({"id": "a1", "group": "2026-01-02_03-04-05"}))
    inits = []
    fake = SimpleNamespace(
        run=None, init=lambda **kw: inits.append(kw) or SimpleNamespace(log=lambda *a: None),
        finish=lambda **kw: None, Table=lambda **kw: None, Image=lambda *a: None,
        plot=SimpleNamespace(line_series=lambda **kw: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_eval([f"ckpt_path={run}", "eval.max_tokens=64", "eval.lengths=[1,2]",
                        "eval.datasets=[train]"], tmp_path / "eval", cache_dir)
    with caplog.at_level(logging.INFO, logger="evaluation.runner"):
        evaluate(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "evaluation.runner"]
    for length, multiple in ((32, 1), (64, 2)):
        assert any(line.startswith("rope ") and " train " in line and
                   f"len {length:6d} ({multiple}x)  ppl " in line for line in lines), lines
    assert len(inits) == 1 and inits[0]["job_type"] == "eval"
    assert inits[0]["group"] == "2026-01-02_03-04-05"


def test_the_eval_wandb_group_is_the_one_its_training_runs_share(tmp_path, caplog):
    """The configured group wins, then a sweep's; else the group recorded by the checkpoints'
    training runs when they all share one, and none (saying why) when they do not."""
    from bipe.errors import ConfigError
    from evaluation.wandb_runs import eval_group, sweep_group

    def ckpt(name: str, record: dict | str | None) -> Path:
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        if record is not None:
            text = record if isinstance(record, str) else json.dumps(record)
            (run / "wandb_run.json").write_text(text)
        return run / "checkpoints" / "last.ckpt"

    a, b = ckpt("a", {"group": "g1"}), ckpt("b", {"id": "x", "group": "g1"})
    other, single, plain = ckpt("c", {"group": "g2"}), ckpt("d", {"group": None}), ckpt("e", None)
    assert eval_group(None, None, [a]) == eval_group(None, None, [a, b, a]) == "g1"
    assert eval_group("mine", tmp_path / "sweep", [a]) == "mine"
    assert eval_group(None, tmp_path / "sweep", [other]) == sweep_group(tmp_path / "sweep")
    with caplog.at_level("INFO", logger="evaluation.wandb_runs"):
        for checkpoints, why in (([a, other], "different W&B groups (g1, g2)"),
                                 ([a, plain], "has no wandb_run.json"),
                                 ([single], "in no W&B group")):
            caplog.clear()
            assert eval_group(None, None, checkpoints) is None
            assert why in caplog.text
    with pytest.raises(ConfigError, match=r"f/wandb_run.json is not a W&B run record"):
        eval_group(None, None, [ckpt("f", "{not json")])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rope", "alibi", "bipe_rope", "bipe_alibi"])
@pytest.mark.parametrize("lm_infinite", [False, True])
def test_16k_token_forward_of_a_tiny_model(name, lm_infinite):
    from bipe import AttentionOptions, LMInfinite
    from evaluation import perplexity_at_length
    from tests.helpers import tiny_model

    model = tiny_model(name, train_len=64)
    model.attention = AttentionOptions(
        chunk_size=1024, lm_infinite=LMInfinite(10, 64, 64) if lm_infinite else None)
    g = np.random.default_rng(0)
    ids, boundary = g.integers(0, 61, 16385), g.random(16385) < 0.05
    res = perplexity_at_length(model, ids, boundary, 16384)
    assert res.tokens == 16384 and math.isfinite(res.ppl)


def _seed_rows(values: dict[str, list[float]], lengths=(32, 64)) -> list[dict]:
    rows = []
    for group, ppls in values.items():
        for seed, ppl in enumerate(ppls):
            for i, length in enumerate(lengths):
                rows.append({"model": f"{group}#s{seed}", "group": group, "seed": seed,
                             "pe": group, "dataset": "train", "lm_infinite": False,
                             "length": length, "multiple": i + 1.0, "train_length": 32,
                             "ppl": ppl * (i + 1)})
    return rows


def test_the_perplexity_table_reports_seeds_with_mean_and_interval():
    """Rows of one group (the seeds of a sweep cell) become `mean ± 95% interval`."""
    from evaluation.perplexity import format_ppl_table, summarize_ppl

    rows = _seed_rows({"rope": [10.0, 12.0, 14.0], "alibi": [20.0]})
    summary = {(r["group"], r["length"]): r for r in summarize_ppl(rows)}
    rope = summary["rope", 32]
    assert rope["ppl_mean"] == pytest.approx(12.0) and rope["ppl_std"] == pytest.approx(2.0)
    assert rope["ppl_ci95"] == pytest.approx(4.3027 * 2 / math.sqrt(3), rel=1e-4)
    assert rope["seeds"] == 3 and summary["rope", 64]["ppl_mean"] == pytest.approx(24.0)
    assert summary["alibi", 32]["seeds"] == 1 and math.isnan(summary["alibi", 32]["ppl_ci95"])
    table = format_ppl_table(rows).splitlines()
    assert "mean ± 95% interval over seeds" in table[0]
    rope_line = next(line for line in table if line.startswith("rope "))
    assert rope_line.split()[1] == "3" and "12.00 ± 4.97" in rope_line
    assert "20.00" in next(line for line in table if line.startswith("alibi "))


def test_checkpoints_of_one_sweep_cell_share_a_group_and_others_do_not(tmp_path):
    """Run folders whose overrides differ only in `seed` are one group; a checkpoint of the same
    encoding and seed from elsewhere is not folded into it."""
    import yaml

    from evaluation.checkpoints import group_labels

    paths, metas = [], []
    for n, (pe, seed, hidden) in enumerate([("rope", 0, 32), ("rope", 1, 32), ("rope", 0, 64),
                                            ("alibi", 0, 32)]):
        job = tmp_path / f"{n}_job"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            [f"pe={pe}", f"model.hidden_size={hidden}", f"seed={seed}"]))
        paths.append(job / "checkpoints" / "last.ckpt")
        metas.append({"model_config": {"pe": {"name": pe}}, "run_config": {"seed": seed}})
    names = group_labels(paths, metas, [])
    assert names[0] == ("rope,hidden_size=32#s0", "rope,hidden_size=32")
    assert names[1] == ("rope,hidden_size=32#s1", "rope,hidden_size=32")
    assert names[2] == ("rope,hidden_size=64", "rope,hidden_size=64")
    assert names[3] == ("alibi,hidden_size=32", "alibi,hidden_size=32")
    # Same label and seed twice (e.g. a base model and its fine-tune): separate groups.
    twice = group_labels(paths[:1] * 2, metas[:1] * 2, ["rope", "rope"])
    assert twice[0] == ("rope", "rope") and twice[1][0] == twice[1][1] != "rope"


def test_a_sweep_job_that_did_not_finish_is_named_and_not_evaluated(tmp_path, capsys):
    from evaluation.checkpoints import find_checkpoints

    for name, finished in (("0_pe=rope", True), ("1_pe=alibi", False)):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / "checkpoints").mkdir()
        (job / "checkpoints" / "last.ckpt").write_bytes(b"")  # not read: only found
        if finished:
            (job / "metrics.json").write_text("{}")
    found = find_checkpoints(OmegaConf.create({"sweep_dir": str(tmp_path), "ckpts": None}))
    assert found == [("sweep_dir", tmp_path / "0_pe=rope" / "checkpoints" / "last.ckpt")]
    assert f"unfinished: {tmp_path / '1_pe=alibi'} has no metrics.json" in capsys.readouterr().err
