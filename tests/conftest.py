"""Shared fixtures: an offline, W&B-free session, a small corpus, and tiny in-process runs.

Every run here uses `experiment=smoke` (2 layers, hidden 32, 32-token blocks, a few steps) on a
`text_files` corpus written once per session, so a run takes a few seconds and the packed data
cache is built once and shared.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Before anything imports datasets or wandb: no network, no W&B runs (a test that wants an
# offline W&B run sets WANDB_MODE itself, in a subprocess).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["BIPE_ROOT"] = str(ROOT)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from evaluation.config import register_eval_configs  # noqa: E402
from training.config import register_configs  # noqa: E402

register_configs()  # the schemas train.py and eval.py register before Hydra composes
register_eval_configs()

CONF = ROOT / "conf"
from tests.helpers import WORDS  # noqa: E402


def write_corpus(folder: Path, documents: int = 10, sentences: int = 150, seed: int = 0) -> str:
    """Small English-like documents (sentences of a 24-word vocabulary); returns their glob."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        lines = []
        for i in range(sentences):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
            lines.append(" ".join(words).capitalize() + "." + ("\n" if i % 5 == 4 else " "))
        (folder / f"doc{d}.txt").write_text("".join(lines))
    return str(folder / "*.txt")


def _results_snapshot() -> dict[str, int]:
    folder = ROOT / "results"
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


@pytest.fixture(scope="session", autouse=True)
def results_stay_untouched():
    """No test writes into the repository's `results/` (study records are data under version
    control: a test run that left one there once made CI skip the runs it meant to test)."""
    before = _results_snapshot()
    yield
    after = _results_snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (f"tests wrote into {ROOT / 'results'}: {changed[:5]}; give the run "
                         "study.results_dir=<tmp folder>")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Glob of a ~100 KB text corpus shared by the session."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tokenizer():
    """A 300-token byte-level BPE trained on a few English-like lines (saved-model tests)."""
    from data.tokenizer import train_bpe
    from tests.helpers import TEXTS

    return train_bpe(TEXTS, 300)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One packed-data cache for the session (built by the first run, reused after)."""
    return str(tmp_path_factory.mktemp("cache"))


def smoke_overrides(corpus: str, cache_dir: str) -> list[str]:
    """Overrides for a seconds-long run on the test corpus."""
    return ["experiment=smoke", "data=text_files", f"data.glob={corpus}",
            f"paths.cache_dir={cache_dir}"]


def compose_train(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """`conf/train.yaml` composed with `overrides`, as `train.py` would get it.

    With `output_dir`, `paths.output_dir` points there (Hydra's run dir is not set in-process).
    """
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def run_train(corpus: str, cache_dir: str, tmp_path: Path):
    """`run_train(name, *overrides)` trains in-process in `tmp_path/name`; returns
    `(metrics, run_dir)`."""
    from train import train

    def run(name: str, *overrides: str) -> tuple[dict, Path]:
        run_dir = tmp_path / name
        cfg = compose_train([*smoke_overrides(corpus, cache_dir), *overrides], run_dir)
        return train(cfg), run_dir

    return run
