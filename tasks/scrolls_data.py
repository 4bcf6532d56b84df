"""SCROLLS data and scoring (`task=scrolls`, Shaham et al. 2022; the task: `tasks.scrolls`).

Records are in the published SCROLLS format: `id`, `input`, `output` (a set with several
references repeats the id, one output per row). They come from local JSON files
(`task.data_files: {train: ..., validation: ...}`) or, with network, from the Hub
(`tau/scrolls`, config = `task.subset`).

Sequence. `input` (tokenized with the pretrained checkpoint's tokenizer, truncated to exactly
`task.max_input_tokens` tokens: `end` keeps the beginning, `middle` keeps the first and last
halves) + `task.separator` + `output` + end-of-document. The loss covers the output and the
end-of-document token only; the output is never cut. Segments come from the checkpoint's own
segmenter (its `data` config), on the input and the output separately; the separator's last token
closes the input's last segment, the end-of-document token the output's.

Training draws rows uniformly: global batch k = `random.Random(f"train/{seed}/{k}")`, so it is a
function of (seed, k) and resumes exactly (`BatchStream`). Scoring: greedy KV-cached generation
from `input + separator` until end-of-document or `task.max_new_tokens`, decoded and scored
against every reference of the id with the subset's metric (`tasks.scrolls_metrics`).
Validation scores the first `task.n_val` ids of the validation split; the end-of-run test scores
all of them (SCROLLS' test outputs are not public).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bipe.errors import ConfigError, DataError, first_line
from data.batches import BatchStream, trainer_layout
from data.config import DataConfig
from data.segment import Segmenter, configured_separator_ids
from data.sources import OFFLINE_HINT, offline_reason
from data.tokenizer import DocumentEncoder
from models import generate
from tasks.example import EncodedExample
from tasks.generated import FixedExamples, collate
from tasks.scrolls_metrics import score

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ScrollsExample:
    """One id: its input and every reference output."""

    id: str
    input: str
    outputs: tuple[str, ...]


def load_split(cfg: Mapping[str, Any], split: str) -> list[ScrollsExample]:
    """The examples of one split, grouped by id in first-seen order."""
    import datasets  # lazy: a 2-second import, only when SCROLLS data is read

    try:
        if cfg["data_files"] is not None:
            records = datasets.load_dataset("json", data_files={split: cfg["data_files"][split]},
                                            split=split)
        else:
            reason = offline_reason()
            if reason is not None:
                raise DataError(f"task=scrolls reads {cfg['hf_path']} from the Hugging Face Hub, "
                                f"but {reason}; point task.data_files at local files in the "
                                f"SCROLLS format ({OFFLINE_HINT})")
            records = datasets.load_dataset(cfg["hf_path"], cfg["subset"], split=split)
    except (DataError, ConfigError):
        raise
    except Exception as e:  # a bad file, a missing field: one line
        raise DataError(f"task=scrolls: reading the {split} split failed: "
                        f"{first_line(e)}") from e
    grouped: OrderedDict[str, tuple[str, list[str]]] = OrderedDict()
    for r in records:
        if not all(isinstance(r.get(k), str) for k in ("id", "input", "output")):
            raise DataError(f"task=scrolls: {split} records need string fields id, input and "
                            f"output (got {sorted(r)})")
        entry = grouped.setdefault(r["id"], (r["input"], []))
        entry[1].append(r["output"])
    if not grouped:
        raise DataError(f"task=scrolls: the {split} split is empty")
    return [ScrollsExample(i, text, tuple(outs)) for i, (text, outs) in grouped.items()]


class ScrollsEncoder:
    """Input + separator + output as token ids, flags and loss mask (module docstring)."""

    def __init__(self, tok: Tokenizer, data_cfg: DataConfig, eod_id: int,
                 max_input_tokens: int, truncate: str, separator: str) -> None:
        self.encoder = DocumentEncoder(tok)
        self.segmenter = Segmenter(data_cfg, tok)
        self.eod_id = eod_id
        self.max_input_tokens = max_input_tokens
        self.truncate = truncate
        self.separator = np.asarray(tok.encode(separator, add_special_tokens=False).ids,
                                    dtype=np.int64)
        if len(self.separator) == 0:
            raise ConfigError("task.separator encodes to no tokens")

    def _segmented(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids, starts = self.encoder.encode_many([text])[0]
        flags = self.segmenter.boundaries(text, ids, starts)
        return ids.astype(np.int64), np.asarray(flags, dtype=bool)

    def prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Truncated input + separator: (ids, flags); the separator closes a segment."""
        ids, flags = self._segmented(text)
        n = self.max_input_tokens
        if len(ids) > n:
            if self.truncate == "end":
                keep = np.arange(n)
            else:
                head = (n + 1) // 2
                keep = np.concatenate([np.arange(head), np.arange(len(ids) - (n - head),
                                                                  len(ids))])
            ids, flags = ids[keep], flags[keep]
        sep_flags = np.zeros(len(self.separator), dtype=bool)
        sep_flags[-1] = True
        return np.concatenate([ids, self.separator]), np.concatenate([flags, sep_flags])

    def example(self, text: str, output: str, index: int) -> EncodedExample:
        """The training/evaluation sequence; `extras`: prompt_len and the id's index."""
        p_ids, p_flags = self.prompt(text)
        a_ids, a_flags = self._segmented(output)
        a_ids = np.concatenate([a_ids, [self.eod_id]])
        a_flags = np.concatenate([a_flags, [True]])
        ids = np.concatenate([p_ids, a_ids])
        return EncodedExample(
            ids=tuple(int(i) for i in ids),
            boundary=tuple(bool(b) for b in np.concatenate([p_flags, a_flags])),
            scored=(False,) * len(p_ids) + (True,) * len(a_ids),
            extras={"prompt_len": len(p_ids), "index": index})


class TrainRows(BatchStream):
    """Global batch k: `batch_size` rows drawn by `Random(f"train/{seed}/{k}")`."""

    batch_size_key = "task.batch_size"

    def __init__(self, rows: list[tuple[int, int]], examples: list[ScrollsExample],
                 encoder: ScrollsEncoder, batch_size: int, seed: int, start_batch: int) -> None:
        self.all_rows, self.examples, self.encoder = rows, examples, encoder
        self.batch_size, self.seed, self.start_batch = batch_size, seed, start_batch

    def rows(self, k: int) -> list[tuple[int, int]]:
        rng = random.Random(f"train/{self.seed}/{k}")
        return [self.all_rows[rng.randrange(len(self.all_rows))] for _ in range(self.batch_size)]

    def collate(self, rows: list[tuple[int, int]]) -> dict[str, Tensor]:
        encoded = [self.encoder.example(self.examples[i].input, self.examples[i].outputs[j], i)
                   for i, j in rows]
        return collate(encoded, self.encoder.eod_id)


class ScrollsDataModule(L.LightningDataModule):
    """SCROLLS data behind the surface `train.py` uses for tasks (see `SyntheticDataModule`)."""

    def __init__(self, cfg: Mapping[str, Any], tokenizer_json: str, data_cfg: Mapping[str, Any],
                 seed: int = 0) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.task_name = "scrolls"
        self.test_split = "validation"  # what test_dataloader scores (test outputs are hidden)
        self.subset: str = self.cfg["subset"]
        self.seed = seed
        self.start_batch = 0
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        data = DataConfig.from_dict({**data_cfg, "block_size": max(2, data_cfg["block_size"])})
        eod = self.tokenizer.token_to_id(data.tokenizer.eod_token)
        if eod is None:
            raise ConfigError(f"the checkpoint's tokenizer has no {data.tokenizer.eod_token!r}")
        self.eod_id = self.pad_id = eod
        self.separator_ids = configured_separator_ids(self.tokenizer, data).tolist()
        self.encoder = ScrollsEncoder(self.tokenizer, data, eod, self.cfg["max_input_tokens"],
                                      self.cfg["truncate"], self.cfg["separator"])
        self.val_names = [self.subset]
        self.train: list[ScrollsExample] = load_split(self.cfg, "train")
        self.validation: list[ScrollsExample] = load_split(self.cfg, "validation")
        self._encoded = [self.encoder.example(e.input, e.outputs[0], i)
                         for i, e in enumerate(self.validation)]
        segments = [e.segments() for e in self._encoded]
        self.stats: dict[str, Any] = {
            "vocab_size": self.tokenizer.get_vocab_size(), "eod_id": eod, "subset": self.subset,
            "train_ids": len(self.train), "validation_ids": len(self.validation),
            "max_input_tokens": self.cfg["max_input_tokens"],
            "max_segments_per_block": max(segments),
            "segments_per_block_mean": round(sum(segments) / len(segments), 3),
            # the pretraining corpus config (segmenter, separators): a checkpoint fine-tuned
            # here can start another SCROLLS run
            "text_data": dict(data_cfg)}
        log.info("scrolls/%s: %d train ids (%d rows), %d validation ids", self.subset,
                 len(self.train), sum(len(e.outputs) for e in self.train), len(self.validation))

    def setup(self, stage: str | None = None) -> None:
        """Everything is loaded in the constructor."""

    def train_dataloader(self) -> DataLoader:
        rows = [(i, j) for i, e in enumerate(self.train) for j in range(len(e.outputs))]
        data = TrainRows(rows, self.train, self.encoder, self.cfg["batch_size"], self.seed,
                         self.start_batch).shard(*trainer_layout(self))
        return DataLoader(data, batch_size=None, num_workers=self.cfg["num_workers"])

    def _loader(self, n: int | None) -> DataLoader:
        return DataLoader(FixedExamples(self._encoded[:n]), batch_size=self.cfg["eval_batch_size"],
                          shuffle=False, collate_fn=partial(collate, pad_id=self.pad_id))

    def val_dataloader(self) -> list[DataLoader]:
        """The first `task.n_val` validation ids."""
        return [self._loader(self.cfg["n_val"])]

    def test_dataloader(self) -> list[DataLoader]:
        """Every validation id."""
        return [self._loader(None)]

    def state_dict(self) -> dict[str, Any]:
        return {"task": dict(self.cfg), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the data order is a function of (seed, batch)."""

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, Tensor]) -> list[str]:
        """Greedy KV-cached answers for a batch, decoded (up to end-of-document)."""
        was_training = model.training
        model.eval()
        try:
            out = generate(model, batch["input_ids"], batch["boundary"],
                           max_new_tokens=self.cfg["max_new_tokens"],
                           separator_ids=self.separator_ids, eos_id=self.eod_id,
                           prompt_lengths=batch["prompt_len"])
        finally:
            model.train(was_training)
        answers = []
        for row, p in zip(out.tolist(), batch["prompt_len"].tolist(), strict=True):
            new = row[p : p + self.cfg["max_new_tokens"]]
            if self.eod_id in new:
                new = new[: new.index(self.eod_id)]
            answers.append(self.tokenizer.decode(new).strip())
        return answers

    def score(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        """The subset's metric (as a fraction) summed over the batch, and the count."""
        answers = self.predict(model, batch)
        total = sum(score(self.subset, a, self.validation[i].outputs) / 100
                    for a, i in zip(answers, batch["index"].tolist(), strict=True))
        return {"score": total / max(len(answers), 1), "score_sum": total,
                "count": float(len(answers))}

