"""The token streams an evaluation scores: the checkpoint's own corpus or another one, tokenized
with the checkpoint's tokenizer and segmented by the corpus's own segmenter.

`train` is the checkpoint's training corpus: when its tokenizer is the one training trained (and
the corpus is unchanged), the packed cache training built is reused as is. Any other name is a
corpus of `conf/data/` (composed by Hydra), packed with the checkpoint's tokenizer, whose file is
content-addressed so every evaluation of that checkpoint shares one cache.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from bipe.errors import ConfigError
from bipe.io import atomic_write_text
from data import LMDataModule
from evaluation.checkpoints import LoadedModel

CONF = Path(__file__).resolve().parents[1] / "conf"


def tokenizer_file(tokenizer_json: str, cache_dir: Path) -> Path:
    """The checkpoint's tokenizer as a file (content-addressed, written atomically)."""
    digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]
    path = cache_dir / "tokenizers" / f"ckpt-{digest}.json"
    if not path.exists():
        atomic_write_text(path, tokenizer_json)
    return path


def corpus_config(name: str, cache_dir: Path) -> dict[str, Any]:
    """The `data` config of corpus `name` (`conf/data/<name>.yaml`), composed by Hydra."""
    # Inside eval.py Hydra is initialized with conf/; called from Python it is not.
    initialized = GlobalHydra.instance().is_initialized()
    context = nullcontext() if initialized else initialize_config_dir(str(CONF),
                                                                      version_base="1.3")
    try:
        with context:
            cfg = compose(config_name=f"data/{name}")
    except MissingConfigException:
        valid = ["train"] + sorted(p.stem for p in (CONF / "data").glob("*.yaml")
                                   if p.stem != "synthetic")
        raise ConfigError(f"eval.datasets has {name!r}, which is not a corpus; choose from "
                          f"{valid}") from None
    data = cfg.data
    if "segmenter" not in data:
        raise ConfigError(f"eval.datasets has {name!r}, which holds no text (a task's data)")
    data.cache_dir = str(cache_dir)
    return OmegaConf.to_container(data, resolve=True)


def stream_datamodule(name: str, lm: LoadedModel, cache_dir: Path) -> LMDataModule:
    """The prepared data module of dataset `name` for checkpoint `lm` (module docstring)."""
    run_data = lm.meta["run_config"]["data"]
    if name == "train" and not (run_data.get("tokenizer") or {}).get("path"):
        dm = LMDataModule({**run_data, "cache_dir": str(cache_dir)}, seed=0)
        dm.setup("test")
        if dm.tokenizer.to_str() == lm.meta["tokenizer"]:
            return dm  # the training cache itself
    data = dict(run_data) if name == "train" else corpus_config(name, cache_dir)
    data["cache_dir"] = str(cache_dir)
    # The checkpoint's tokenizer, and its end-of-document token (e.g. `</s>` for LLaMA).
    own = run_data.get("tokenizer", {})
    data["tokenizer"] = {**data.get("tokenizer", {}),
                         "path": str(tokenizer_file(lm.meta["tokenizer"], cache_dir))}
    if own.get("eod_token"):
        data["tokenizer"]["eod_token"] = own["eod_token"]
    dm = LMDataModule(data, seed=0)
    dm.setup("test")
    return dm


def load_stream(lm: LoadedModel, name: str, split: str, max_tokens: int | None,
                cache_dir: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`(ids, boundary, separator_ids)` of a dataset's split, the first `max_tokens + 1` tokens."""
    key = f"{name}:{split}"
    if key not in lm.streams:
        dm = stream_datamodule(name, lm, cache_dir)
        ids, boundary = dm.split_arrays(split)
        n = len(ids) if max_tokens is None else min(len(ids), max_tokens + 1)
        lm.streams[key] = (np.asarray(ids[:n]), np.asarray(boundary[:n], dtype=bool),
                           list(dm.separator_ids))
    return lm.streams[key]
