"""SyntheticDataModule: generated tasks (arithmetic, Bi-NFA) behind the LMDataModule interface.

Same surface as `data.LMDataModule` (`tokenizer`, `eod_id`, `stats`, `start_batch`, an infinite
deterministic `train_dataloader()`), plus `pad_id`, `val_names` and `score(model, batch)`.

Training. Examples are generated on the fly: global batch k is drawn from
`random.Random(f"train/{seed}/{k}")`, so it is a function of (seed, k) only and
`dm.start_batch = k` resumes at batch k without replaying anything (with `num_workers = W`,
worker w makes batches k = start + w, start + w + W, ... which the DataLoader returns in order).
A drawn example whose question (arithmetic: the prompt; Bi-NFA: the whole sequence) is in an
evaluation or test set is redrawn, as Feng et al. keep their test set out of training.

Evaluation. `val_dataloader()` is a list of loaders, one per setting, named in `val_names`
(arithmetic `ops_N, ops_N+1, ...`; Bi-NFA `seg_M, seg_2M, ...`); each holds `n_val` fixed examples
drawn from `random.Random(f"val/{val_seed}/{name}")`, independent of the training seed and of the
other settings, so every run of a sweep is scored on the same examples. `test_dataloader()` is the
same with `test/` in place of `val/` (disjoint draws for the final numbers).

Batches. Dicts of `input_ids` long [B, T], `targets` long [B, T] (-100 = not scored), `boundary`
bool [B, T], `length` long [B] (real input tokens) and the task's extras, long [B]: arithmetic
`prompt_len`, `answer_id`, `operators`; Bi-NFA `segments`. Rows are right-padded to the batch's
longest with `<pad>`, target -100 and boundary False: a causal model never lets a real token see
padding, and padding never gets a loss.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from bipe.errors import ConfigError
from data.batches import BatchStream, trainer_layout
from tasks.example import IGNORE_INDEX, EncodedExample

if TYPE_CHECKING:
    from tasks.base import GeneratedTask

log = logging.getLogger(__name__)


def build_tokenizer(vocab: Sequence[str], special: Sequence[str]) -> Tokenizer:
    """WordLevel tokenizer over `vocab` (id = index), split on whitespace; unknown -> `<pad>`."""
    # WordLevel needs an unknown token; the task vocabularies have none of their own, and an
    # unknown word can only come from hand-typed text, so it maps to padding.
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # `Whitespace` would split `<bos>`
    tok.add_special_tokens(list(special))
    return tok


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids/targets long [B, T], boundary bool [B, T], extras long [B]."""
    B, T = len(examples), max(e.input_length for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    boundary = torch.zeros(B, T, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        scored = torch.tensor(e.scored[1:], dtype=torch.bool)
        n = e.input_length
        input_ids[i, :n] = ids[:-1]
        targets[i, :n] = torch.where(scored, ids[1:], IGNORE_INDEX)
        boundary[i, :n] = torch.tensor(e.boundary[:-1], dtype=torch.bool)
    batch = {"input_ids": input_ids, "targets": targets, "boundary": boundary,
             "length": torch.tensor([e.input_length for e in examples], dtype=torch.long)}
    for key in examples[0].extras:
        batch[key] = torch.tensor([e.extras[key] for e in examples], dtype=torch.long)
    return batch


class ExampleBatches(BatchStream):
    """Infinite stream of training batches; batch k depends only on (seed, k)."""

    batch_size_key = "task.batch_size"

    def __init__(self, task: GeneratedTask, batch_size: int, seed: int,
                 held_out: frozenset[tuple[int, ...]], start_batch: int = 0) -> None:
        self.task = task
        self.batch_size = batch_size
        self.seed = seed
        self.held_out = held_out
        self.start_batch = start_batch

    def examples(self, k: int) -> list[EncodedExample]:
        """The examples of global batch k, none of them in an evaluation set."""
        rng = random.Random(f"train/{self.seed}/{k}")
        out = []
        while len(out) < self.batch_size:
            example = self.task.train_example(rng)
            if self.task.key(example) not in self.held_out:
                out.append(example)
        return out

    def rows(self, k: int) -> list[EncodedExample]:
        """The examples of global batch k."""
        return self.examples(k)

    def collate(self, rows: list[EncodedExample]) -> dict[str, Tensor]:
        """Right-padded to the longest of `rows` (see `collate`)."""
        return collate(rows, self.task.pad_id)



class FixedExamples(Dataset):
    """A fixed list of examples (one evaluation setting)."""

    def __init__(self, examples: list[EncodedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> EncodedExample:
        return self.examples[i]


class SyntheticDataModule(L.LightningDataModule):
    """The data of a generated task (arithmetic, Bi-NFA); see the module docstring."""

    def __init__(self, task: GeneratedTask, seed: int = 0) -> None:
        """`task`: a generated task (`tasks.get_task("arithmetic")(cfg)`)."""
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} must be a non-negative integer")
        if not hasattr(task, "train_example"):
            raise ConfigError(f"task.name={task.name!r} does not generate its examples; a "
                              "generated task (arithmetic, bi_nfa) is needed here")
        self.task = task
        self.cfg = task.plain_config()
        self.seed = seed
        self.start_batch = 0
        self.task_name: str = self.task.name
        self.tokenizer: Tokenizer = build_tokenizer(self.task.vocab, self.task.vocab[:3])
        self.pad_id: int = self.task.pad_id
        self.eod_id: int = self.task.eod_id
        self.val_names: list[str] = [s.name for s in self.task.eval_settings()]
        self._sets: dict[str, list[FixedExamples]] = {}
        self._held_out: frozenset[tuple[int, ...]] | None = None
        self.stats: dict[str, Any] = {
            "vocab_size": len(self.task.vocab),
            "eod_id": self.eod_id,
            "pad_id": self.pad_id,
            "batch_size": self.cfg["batch_size"],
            "n_val": self.cfg["n_val"],
            **self.task.stats(),
        }

    # -- Lightning hooks -------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Nothing to download or cache: everything is generated."""

    def setup(self, stage: str | None = None) -> None:
        """Draw the evaluation and test sets (idempotent, about a second at most)."""
        if self._held_out is not None:
            return
        for split in ("val", "test"):
            self._sets[split] = [
                FixedExamples([s.draw(rng) for _ in range(self.cfg["n_val"])])
                for s in self.task.eval_settings()
                for rng in [random.Random(f"{split}/{self.cfg['val_seed']}/{s.name}")]
            ]
        self._held_out = frozenset(self.task.key(e) for sets in self._sets.values()
                                   for d in sets for e in d.examples)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints so that a resume on another task config is noticed."""
        return {"task": dict(self.cfg), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when resuming from a checkpoint trained on another task config."""
        old = state_dict.get("task")
        if old and old != self.cfg:
            log.warning("resuming on a different task config: checkpoint %s, now %s", old,
                        self.cfg)

    # -- loaders ---------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Infinite, deterministic: batch k = f(seed, k), starting at `self.start_batch`."""
        self.setup()
        data = ExampleBatches(self.task, self.cfg["batch_size"], self.seed, self._held_out,
                            self.start_batch).shard(*trainer_layout(self))
        workers = self.cfg["num_workers"]
        return DataLoader(data, batch_size=None, num_workers=workers,
                          persistent_workers=workers > 0)

    def _loaders(self, split: str) -> list[DataLoader]:
        self.setup()
        return [DataLoader(d, batch_size=self.cfg["eval_batch_size"], shuffle=False,
                           collate_fn=partial(collate, pad_id=self.pad_id))
                for d in self._sets[split]]

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation setting, in the order of `val_names`."""
        return self._loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """Like `val_dataloader`, on separately drawn examples."""
        return self._loaders("test")

    # -- metrics ---------------------------------------------------------------------------------

    def score(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        """The task's metrics on one evaluation batch (sums and counts, to add over batches)."""
        return self.task.score(model, batch)
