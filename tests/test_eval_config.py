"""eval.py checks its config as strictly as train.py: a bad value is one line naming the key,
a misspelled key fails at composition, and the command exits with status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

import eval  # noqa: F401  (registers the evaluation schema, as the command does)
from bipe.errors import ConfigError
from evaluation.config import validate_eval_config
from tests.conftest import CONF, ROOT


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt_path=x", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = "out"  # Hydra's run folder, which compose() alone does not set
    return cfg


@pytest.mark.parametrize(("override", "key"), [
    ("eval.lengths=[0]", "eval.lengths"),
    ("eval.lengths=[-1]", "eval.lengths"),
    ("eval.lengths=[]", "eval.lengths"),
    ("eval.protocol=foo", "eval.protocol"),
    ("device=tpu", "device"),
    ("eval.batch_tokens=0", "eval.batch_tokens"),
    ("eval.precision=fp8", "eval.precision"),
    ("eval.passkey.depths=[1.5]", "eval.passkey.depths"),
    ("eval.lm_infinite.enabled=sometimes", "eval.lm_infinite.enabled"),
    ("+eval.foo=1", "eval.foo"),
])
def test_a_bad_value_is_one_line_naming_its_key(override, key):
    with pytest.raises(ConfigError) as info:
        validate_eval_config(composed(override))
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message


@pytest.mark.parametrize("override", ["eval.lengths=abc", "eval.max_tokens=many",
                                      "eval.lenghts=[1]"])
def test_a_mistyped_or_unknown_key_fails_at_composition(override):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        composed(override)


def test_the_defaults_pass():
    checked = validate_eval_config(composed())
    assert checked.eval.precision == "32" and checked.eval.protocol == "blocks"


@pytest.mark.slow
@pytest.mark.parametrize(("override", "needle"), [("eval.precision=fp8", "eval.precision"),
                                                  ("eval.lengths=abc", "eval.lengths"),
                                                  ("+eval.foo=1", "eval.foo")])
def test_the_command_exits_2_with_one_error_line(override, needle, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt_path={tmp_path}",
                             override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.stderr
