"""The YaRN fine-tuning stage: model from the checkpoint, scaling filled in, and carried along."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from bipe.errors import ConfigError
from models import Transformer
from models.checkpoint import load_checkpoint
from tests.conftest import CONF

YARN = ["finetune.model_from_checkpoint=true", "finetune.block_size_factor=2",
        "pe.relative.scaling={type: yarn, factor: 2, original_max_position: null}",
        "optim.lr=2e-5", "optim.weight_decay=0.0"]


@pytest.mark.parametrize("pe", ["rope", "bipe_rope"])
def test_yarn_finetune_takes_the_checkpoints_model_and_its_checkpoint_carries_the_scaling(
        pe, run_train, tmp_path):
    _, base = run_train(f"base_{pe}", f"pe={pe}")
    base_meta = load_checkpoint(base / "checkpoints" / "last.ckpt")["bipe"]
    # pe=alibi on the command line: the checkpoint's encoding wins, only the scaling is taken.
    metrics, tuned = run_train(f"yarn_{pe}", f"init_from={base}", "pe=alibi", *YARN)
    model = Transformer.from_pretrained(tuned / "checkpoints" / "last.ckpt")
    meta = model.meta
    scaling = meta["model_config"]["pe"]["relative"]["scaling"]
    original = 32 if pe == "rope" else base_meta["data_stats"]["max_segments_per_block"]
    assert meta["model_config"]["pe"]["name"] == pe
    assert scaling == {"type": "yarn", "factor": 2, "original_max_position": original}
    assert meta["run_config"]["data"]["block_size"] == 64  # 2 x the checkpoint's 32
    assert model.config.pe.relative.scaling == scaling  # rebuilt scaled, nothing passed
    assert {k: v for k, v in meta["model_config"].items() if k != "pe"} == {
        k: v for k, v in base_meta["model_config"].items() if k != "pe"}
    assert metrics["eval/ppl_1x"] is not None

    # eval.py: the base model as saved and YaRN-scaled at inference, the fine-tuned one as saved.
    from evaluation.checkpoints import load_models

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"ckpts=[{base},{tuned}]", "eval.rope_scaling={type: yarn, factor: 2}",
            f"paths.output_dir={tmp_path / 'eval'}"])
    loaded = load_models(cfg, "cpu")
    labels = [m.label for m in loaded]
    assert labels[:2] == [pe, f"{pe}+yarn2"] and len(labels) == 3
    assert loaded[0].model.config.pe.relative.scaling is None
    assert loaded[1].model.config.pe.relative.scaling == scaling  # same fill-in rule
    assert loaded[2].model.config.pe.relative.scaling == scaling


def test_finetune_needs_a_checkpoint_and_a_rotary_encoding(run_train):
    with pytest.raises(ConfigError, match="init_from="):
        run_train("no_ckpt", *YARN)
    _, base = run_train("base_alibi", "pe=alibi")
    with pytest.raises(ConfigError, match="pe.relative.scaling scales RoPE"):
        run_train("alibi_yarn", f"init_from={base}", *YARN)
