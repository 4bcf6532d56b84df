"""Bad input through the real command line: one `error:` line naming the problem, status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def train_cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_bad_model_shape_exits_2_with_one_line_before_any_data_work(tmp_path):
    # hidden 100 / 4 heads = head size 25: odd, and RoPE rotates pairs of dimensions.
    result = train_cli("model.hidden_size=100", f"paths.cache_dir={tmp_path / 'cache'}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result)) == 1 and "model.hidden_size" in error_lines(result)[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()  # failed before touching the data
    # The run folder says why it holds nothing else.
    assert error_lines(result)[0] in (tmp_path / "run" / "train.log").read_text()


def test_unknown_encoding_lists_the_valid_ones(tmp_path):
    result = train_cli("pe=bipe_rop", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "bipe_rope" in result.stderr and "alibi" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("args", "needle"), [
    (["model.n_heads=3"], "model.hidden_size=128 is not divisible by model.n_heads=3"),
    (["data.block_size=1"], "data.block_size"),
    (["+optim.lrr=0.1"], "optim.lrr"),
    (["ckpt_path=/no/such/run.ckpt"], "ckpt_path=/no/such/run.ckpt does not exist"),
    (["init_from=CORRUPT"], "cannot be read"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu' needs a package"),
])
def test_bad_input_exits_2_with_one_error_line(args, needle, tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    args = [a.replace("CORRUPT", str(corrupt)) for a in args]
    result = train_cli(*args, f"paths.cache_dir={tmp_path / 'cache'}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result)) == 1 and needle in error_lines(result)[0]
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_misspelled_override_is_refused_naming_the_key(tmp_path):
    result = train_cli("optim.lrr=0.1", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0 and "optim.lrr" in result.stderr
