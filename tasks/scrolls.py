"""`task=scrolls`: fine-tune a pretrained text checkpoint on one SCROLLS set and score its greedy
answers with the set's official metric (Shaham et al. 2022; data and scoring in
`tasks.scrolls_data`, metrics in `tasks.scrolls_metrics`).

The model, encoding, tokenizer and segmenter are the pretrained checkpoint's (`init_from`): the
run's `data` node only names the task (conf/data/synthetic.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bipe.errors import ConfigError
from tasks.base import Task, TaskConfig, check_int, register
from tasks.scrolls_metrics import SUBSET_METRIC

SUBSETS = tuple(SUBSET_METRIC)
TRUNCATE = ("end", "middle")


@dataclass
class ScrollsConfig(TaskConfig):
    """`task.*` of `task=scrolls` (conf/task/scrolls.yaml says what each key does)."""

    name: str = "scrolls"
    subset: str = "qasper"
    data_files: Any = None  # {train: ..., validation: ...} (a mapping); None: the Hub
    hf_path: str = "tau/scrolls"
    max_input_tokens: int = 8192  # the paper fine-tunes at 8,192 tokens
    truncate: str = "end"
    separator: str = "\n\nAnswer:\n"
    max_new_tokens: int = 64
    batch_size: int = 4
    eval_batch_size: int = 8
    n_val: int = 64  # ids scored at each validation (the end-of-run test scores every id)
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise ConfigError(f"task.subset={self.subset!r} is not a SCROLLS set; choose one of "
                              f"{', '.join(SUBSETS)}")
        if self.truncate not in TRUNCATE:
            raise ConfigError(f"task.truncate={self.truncate!r}; choose one of {TRUNCATE}")
        for key, lo in (("max_input_tokens", 1), ("max_new_tokens", 1), ("batch_size", 1),
                        ("eval_batch_size", 1), ("n_val", 1), ("num_workers", 0)):
            check_int(f"task.{key}", getattr(self, key), lo)
        files = self.data_files
        if files is not None and (not isinstance(files, Mapping)
                                  or not {"train", "validation"} <= set(files)):
            raise ConfigError(f"task.data_files={files!r} must map train and validation to files "
                              "in the SCROLLS format (id, input, output)")
        if not isinstance(self.separator, str) or not self.separator:
            raise ConfigError("task.separator must be a non-empty string")


@register
class ScrollsTask(Task):
    """One SCROLLS set, scored by greedy KV-cached answers (module docstring)."""

    name = "scrolls"
    config = ScrollsConfig
    main_metric = "score"

    def check_data(self, data: Mapping[str, Any]) -> int:
        if data.get("name") != self.name:
            raise ConfigError(f"task=scrolls reads its own data, but data={data.get('name')} "
                              "was chosen; drop the data= override")
        return check_int("data.block_size", data.get("block_size"), 2)

    def datamodule(self, run: Any, start_meta: Mapping[str, Any] | None,
                   output_dir: Path) -> Any:
        """`ScrollsDataModule` with the pretrained checkpoint's tokenizer and segmenter."""
        # lazy: the data module imports torch, Lightning and datasets
        from tasks.scrolls_data import ScrollsDataModule

        if not start_meta:
            raise ConfigError("task=scrolls fine-tunes a pretrained language model: set "
                              "init_from=<checkpoint or run folder of a text run>")
        # The pretraining corpus config (its segmenter): a text run's own, or the one a SCROLLS
        # run recorded from the text run it started from.
        text_data = start_meta.get("data_stats", {}).get("text_data") or \
            start_meta["run_config"]["data"]
        if "segmenter" not in text_data:
            raise ConfigError(f"init_from={run['init_from']} was not trained on text (its data "
                              f"is {text_data.get('name')!r}); SCROLLS needs a language-model "
                              "checkpoint")
        return ScrollsDataModule(self.plain_config(), start_meta["tokenizer"], text_data,
                                 seed=int(run["seed"]))
