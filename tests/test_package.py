"""`bipe` is a library of its own: its wheel holds `bipe` and nothing else, installs into a fresh
virtual environment (torch from the system), and imports from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_wheel_installs_bipe_alone_and_imports_outside_the_repository(tmp_path):
    # Build from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "bipe", src / "bipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", src)
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(dist), "-q"],
                   check=True, env=env, timeout=300)
    (wheel,) = dist.glob("bipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"bipe", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert "bipe/encoding.py" in names and "bipe/config.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    assert b"Requires-Dist: torch" in metadata  # its only dependency

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    python = venv / "bin" / "python"
    # --no-deps: torch comes from the system site-packages (the venv's own older setuptools
    # would otherwise make pip re-resolve torch's build requirements, which needs the network).
    subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--no-deps", "-q",
                    str(wheel)], check=True, env=env, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import bipe, torch\n"
            "from bipe import PositionalEncoding, PEConfig, bilevel_ids\n"
            "pe = PositionalEncoding(PEConfig.named('bipe_rope', max_positions=16), 32, 4)\n"
            "intra, inter = bilevel_ids(torch.tensor([[0, 0, 1, 0, 1]], dtype=torch.bool))\n"
            "print(bipe.__file__)\n"
            "print(intra.tolist(), inter.tolist())\n")
    out = subprocess.run([str(python), "-c", code], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout.splitlines()
    assert Path(out[0]).is_relative_to(venv) and not Path(out[0]).is_relative_to(ROOT)
    assert out[1] == "[[0, 1, 2, 0, 1]] [[0, 0, 0, 1, 1]]"


def test_the_readme_example_of_the_encodings_in_your_own_model_runs(capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Use the encodings in your own model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{name} (2, 16, 64) (2, 4, 16, 16)"
                       for name in ("rope", "alibi", "bipe_rope", "bipe_alibi")]
