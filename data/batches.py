"""Batches of packed text: one split as a flat stream, the infinite training stream, fixed blocks.

A split is one flat token stream (`SplitStream`). Block i covers inputs `[i*T, (i+1)*T)`; a
window of T+1 tokens gives `input_ids = w[:-1]`, `targets = w[1:]`, `boundary` = the flags of
the inputs, so consecutive blocks overlap by exactly one token and every token after the first is
a target exactly once. `BatchStream` is the contract of every infinite training stream of the
project (text, streamed text, generated tasks): what global batch k holds is a function of k
alone, and it is cut into equal shares across devices and accumulation steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from bipe.errors import ConfigError

IGNORE_INDEX = -100


class SplitStream:
    """One split's flat (ids, boundary) streams; memmaps open lazily in each process."""

    def __init__(self, folder: Path, meta: dict[str, Any], dtype: str) -> None:
        self.folder = folder
        self.tokens = int(meta["tokens"])
        self.ids_file = meta["ids_file"]
        self.boundary_file = meta["boundary_file"]
        self.dtype = dtype
        self._ids: np.ndarray | None = None
        self._boundary: np.ndarray | None = None

    def __len__(self) -> int:
        return self.tokens

    @property
    def ids(self) -> np.ndarray:
        """uint16/uint32 [N] read-only memmap."""
        if self._ids is None:
            self._ids = np.memmap(self.folder / self.ids_file, dtype=np.dtype(self.dtype),
                                  mode="r", shape=(self.tokens,))
        return self._ids

    @property
    def boundary(self) -> np.ndarray:
        """bool [N] read-only memmap."""
        if self._boundary is None:
            self._boundary = np.memmap(self.folder / self.boundary_file, dtype=np.bool_,
                                       mode="r", shape=(self.tokens,))
        return self._boundary

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers: send paths, not the mapped data.
        state = self.__dict__.copy()
        state["_ids"] = state["_boundary"] = None
        return state


def windows(stream: SplitStream, starts: np.ndarray, length: int) -> dict[str, torch.Tensor]:
    """Batch of full blocks: input_ids/targets long [B, T], boundary bool [B, T]."""
    offsets = starts[:, None] + np.arange(length + 1)
    w = np.asarray(stream.ids[offsets], dtype=np.int64)
    b = np.asarray(stream.boundary[offsets[:, :-1]], dtype=bool)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(w[:, :-1])),
        "targets": torch.from_numpy(np.ascontiguousarray(w[:, 1:])),
        "boundary": torch.from_numpy(b),
    }


def trainer_layout(datamodule: L.LightningDataModule) -> tuple[int, int, int]:
    """(world size, global rank, gradient accumulation) of the trainer the datamodule is attached
    to; (1, 0, 1) without one."""
    trainer = datamodule.trainer
    if trainer is None:
        return 1, 0, 1
    return trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches


class BatchStream(IterableDataset):
    """An infinite stream of micro-batches; what each one holds is a function of its index alone.

    Global batch k (`batch_size` rows) is `self.batch(k)`. One optimizer step consumes it, split
    across `world_size` processes and `accumulate` micro-batches each: this process's micro-batch
    m is part `(m % accumulate) * world_size + rank` of global batch `m // accumulate`, one of
    `world_size * accumulate` equal, disjoint row slices (`self.micro_batch(m)`). So the global
    batch, the data order and every loss curve stay the same whatever the device count and
    accumulation, and `start_batch = global_step * accumulate` resumes exactly. DataLoader workers
    take every `num_workers`-th micro-batch, so the order is the same with any worker count.
    Subclasses define `batch(k)` and `batch_size`, or `rows(k)` and `collate(rows)`.
    """

    start_batch: int = 0
    world_size: int = 1
    rank: int = 0
    accumulate: int = 1
    batch_size: int = 1
    batch_size_key = "data.batch_size"  # named in errors

    def shard(self, world_size: int = 1, rank: int = 0, accumulate: int = 1) -> BatchStream:
        """Serve process `rank` of `world_size`, each accumulating `accumulate` micro-batches per
        step; ConfigError unless `data.batch_size` splits evenly."""
        parts = world_size * accumulate
        if self.batch_size % parts:
            raise ConfigError(
                f"{self.batch_size_key}={self.batch_size} (the global batch) does not split into "
                f"{world_size} device(s) x {accumulate} accumulation step(s); choose a multiple "
                f"of {parts}")
        self.world_size, self.rank, self.accumulate = world_size, rank, accumulate
        return self

    def micro_batch(self, m: int) -> dict[str, torch.Tensor]:
        """This process's micro-batch m (see the class docstring)."""
        k, a = divmod(m, self.accumulate)
        parts = self.world_size * self.accumulate
        if parts == 1:
            return self.batch(k)
        size = self.batch_size // parts
        part = a * self.world_size + self.rank
        return self.collate(self.rows(k)[part * size : (part + 1) * size])

    def rows(self, k: int) -> Any:
        """Abstract: the rows of global batch k (a subclass defines it, with `collate`)."""
        raise NotImplementedError(f"{type(self).__name__} must define rows(k)")

    def collate(self, rows: Any) -> dict[str, torch.Tensor]:
        """Abstract: one batch of tensors from some rows of a global batch."""
        raise NotImplementedError(f"{type(self).__name__} must define collate(rows)")

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Global batch k, whole."""
        return self.collate(self.rows(k))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        m = self.start_batch + (info.id if info is not None else 0)
        step = info.num_workers if info is not None else 1
        while True:
            yield self.micro_batch(m)
            m += step


class TextBatches(BatchStream):
    """The infinite stream of training batches of packed text; batch k depends only on (seed, k):
    a permutation of the training blocks per epoch, drawn from (seed, epoch)."""

    def __init__(self, stream: SplitStream, block_size: int, batch_size: int, seed: int,
                 start_batch: int = 0) -> None:
        self.stream = stream
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.n_blocks = (len(stream) - 1) // block_size
        self.batches_per_epoch = self.n_blocks // batch_size
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 [n_blocks]: the block order of `epoch` (cached for the current epoch)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def block_indices(self, k: int) -> np.ndarray:
        """int64 [B]: indices of the training blocks in global batch k."""
        epoch, j = divmod(k, self.batches_per_epoch)
        return self.permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]

    def rows(self, k: int) -> np.ndarray:
        """int64 [B]: start offsets of the blocks of global batch k."""
        return self.block_indices(k) * self.block_size

    def collate(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """input_ids/targets long [b, T], boundary bool [b, T] for the blocks starting at rows."""
        return windows(self.stream, rows, self.block_size)



class BlockDataset(Dataset):
    """Fixed, non-overlapping blocks of `length` inputs over one split (optionally padded)."""

    def __init__(self, stream: SplitStream, length: int, pad_id: int, pad_last: bool = False,
                 pad_to_multiple: int = 1) -> None:
        self.stream = stream
        self.length = length
        self.pad_id = pad_id
        scored = len(stream) - 1  # every token but the first is a target
        self.full_blocks = scored // length
        self.tail = scored - self.full_blocks * length if pad_last else 0
        self.real_blocks = self.full_blocks + (1 if self.tail else 0)
        self.n_items = math.ceil(self.real_blocks / pad_to_multiple) * pad_to_multiple
        self.scored_tokens = self.full_blocks * length + self.tail

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n_items:
            raise IndexError(i)
        t = self.length
        if i < self.full_blocks:
            batch = windows(self.stream, np.asarray([i * t]), t)
            return {k: v[0] for k, v in batch.items()}
        inputs = torch.full((t,), self.pad_id, dtype=torch.long)
        targets = torch.full((t,), IGNORE_INDEX, dtype=torch.long)
        boundary = torch.zeros(t, dtype=torch.bool)
        if i < self.real_blocks:  # the partial tail block
            a, m = i * t, self.tail
            ids = np.asarray(self.stream.ids[a : a + m + 1], dtype=np.int64)
            inputs[:m] = torch.from_numpy(ids[:-1])
            targets[:m] = torch.from_numpy(ids[1:])
            boundary[:m] = torch.from_numpy(np.array(self.stream.boundary[a : a + m], dtype=bool))
        return {"input_ids": inputs, "targets": targets, "boundary": boundary}
