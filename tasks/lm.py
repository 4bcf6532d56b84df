"""`task=lm`: language modelling on a text corpus (the `data` config group): next-token loss,
perplexity against length at the end of a run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bipe.errors import ConfigError
from bipe.io import atomic_write_text
from data.config import DataConfig
from tasks.base import Task, TaskConfig, register

log = logging.getLogger(__name__)


@dataclass
class LMTaskConfig(TaskConfig):
    """`task.*` of `task=lm`: nothing but the name; the corpus is the `data` group."""

    name: str = "lm"


@register
class LanguageModelling(Task):
    """Next-token prediction on packed text blocks (`data.LMDataModule`)."""

    name = "lm"
    config = LMTaskConfig
    trains = "language_model"
    main_metric = "ppl"

    def check_data(self, data: Mapping[str, Any]) -> int:
        if "segmenter" not in data:  # conf/data/synthetic.yaml: a generated task's data node
            raise ConfigError("data=synthetic only serves a task that brings its own data "
                              "(arithmetic, bi_nfa, scrolls); choose a corpus (data=shakespeare, "
                              "python_code, ...) for task=lm")
        return DataConfig.from_dict(data).block_size  # raises ConfigError naming data.*

    def datamodule(self, run: Any, start_meta: Mapping[str, Any] | None,
                   output_dir: Path) -> Any:
        """The prepared `LMDataModule` (cache built or reused, tokenizer loaded).

        Starting from a checkpoint, the data must be tokenized by its tokenizer, or the
        embeddings would mean other tokens: if the configured data yields a different one, it is
        re-packed with the checkpoint's (saved to `output_dir/tokenizer.json`).
        """
        # lazy: the data module imports torch and Lightning; config checks must not wait for them
        from data import LMDataModule

        data_cfg = dict(run["data"])
        seed = int(run["seed"])
        dm = LMDataModule(data_cfg, seed=seed)
        dm.prepare_data()
        dm.setup("fit")
        tokenizer_json = start_meta["tokenizer"] if start_meta else None
        if tokenizer_json is None or dm.tokenizer.to_str() == tokenizer_json:
            return dm
        if data_cfg["tokenizer"].get("path"):
            raise ConfigError(f"data.tokenizer.path={data_cfg['tokenizer']['path']} differs from "
                              "the tokenizer of the checkpoint this run starts from; set it to "
                              "null to use the checkpoint's tokenizer")
        path = atomic_write_text(output_dir / "tokenizer.json", tokenizer_json)
        log.warning("data=%s trains a different tokenizer than the checkpoint's; re-packing the "
                    "data with the checkpoint's tokenizer (%s)", data_cfg["name"], path)
        data_cfg["tokenizer"] = {**data_cfg["tokenizer"], "path": str(path)}
        dm = LMDataModule(data_cfg, seed=seed)
        dm.prepare_data()
        dm.setup("fit")
        return dm
