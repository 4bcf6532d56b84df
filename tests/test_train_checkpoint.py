"""Checkpoints: atomic writes, clear errors for bad files, resume/init_from compatibility."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

import models.checkpoint as checkpoint_module
from bipe.errors import CheckpointError, ConfigError
from models.checkpoint import CHECKPOINT_KEY, load_checkpoint, to_plain
from training.checkpoint_io import AtomicCheckpointIO


class NotAllowed:
    """A class `weights_only=True` refuses to unpickle."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, cache_dir) -> Path:
    """A run folder with checkpoints at step 4 (val_check_interval 4)."""
    from tests.conftest import compose_train
    from train import train

    run_dir = tmp_path_factory.mktemp("trained")
    cfg = compose_train(["experiment=smoke", "data=text_files", f"data.glob={corpus}",
                         f"paths.cache_dir={cache_dir}", "trainer.max_steps=4",
                         "trainer.val_check_interval=4"], run_dir)
    train(cfg)
    return run_dir


def test_a_crash_while_writing_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "v": 1}, path)

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 partial bytes")
        raise KeyboardInterrupt  # as if the run were stopped mid-write

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "v": 2}, path)
    assert torch.load(path, weights_only=True)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign", "pickled_class"])
def test_a_bad_file_is_a_checkpoint_error_naming_it(damage, trained, tmp_path):
    path = tmp_path / "bad.ckpt"
    good = trained / "checkpoints" / "last.ckpt"
    if damage == "truncate":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":  # a readable torch file that this project did not write
        torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    else:
        path.write_bytes(pickle.dumps({"x": NotAllowed()}, protocol=2))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, key="ckpt_path")


def test_a_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"init_from=.*nope\.ckpt does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt", key="init_from")
    with pytest.raises(CheckpointError, match="folder without checkpoints/last.ckpt"):
        load_checkpoint(tmp_path, key="ckpt_path")


def test_resume_from_a_folder_ignores_a_stray_partial_file(trained, run_train, tmp_path):
    # A run killed while writing leaves a temp file beside the last complete checkpoint.
    folder = tmp_path / "killed"
    shutil.copytree(trained, folder)
    ckpt_dir = folder / "checkpoints"
    (ckpt_dir / ".last.ckpt.12345.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    _, resumed = run_train("resumed", f"ckpt_path={folder}", "trainer.max_steps=8",
                           "trainer.val_check_interval=4")
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_resume_with_another_model_is_refused(trained, run_train):
    with pytest.raises(ConfigError, match=r"model\.hidden_size=32 .* gives 64"):
        run_train("other", f"ckpt_path={trained}", "model.hidden_size=64")


def test_init_from_with_mismatched_shapes_names_the_parameter(trained, run_train):
    with pytest.raises(CheckpointError, match=r"init_from=.*embed\.weight has shape"):
        run_train("wide", f"init_from={trained / 'checkpoints' / 'last.ckpt'}",
                  "model.hidden_size=64")


def test_checkpoint_metadata_is_plain_python(trained):
    meta = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert set(meta) >= {"format_version", "model_config", "tokenizer", "data_stats",
                         "run_config", "global_step"}
    assert to_plain(meta) == meta  # nothing but dict/list/str/int/float/bool/None
    assert meta["run_config"]["trainer"]["max_steps"] == 4


def test_init_from_on_other_text_keeps_the_checkpoints_tokenizer(trained, run_train, tmp_path):
    from tests.conftest import write_corpus

    other = write_corpus(tmp_path / "other", documents=6, seed=7)
    _, tuned = run_train("tuned", f"init_from={trained}", f"data.glob={other}",
                         "trainer.max_steps=2", "trainer.val_check_interval=2")
    source = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    new = torch.load(tuned / "checkpoints" / "last.ckpt", weights_only=True)
    # The new corpus trains another tokenizer; the run re-packed it with the checkpoint's.
    assert (tuned / "tokenizer.json").exists()
    assert new[CHECKPOINT_KEY]["tokenizer"] == source[CHECKPOINT_KEY]["tokenizer"]
