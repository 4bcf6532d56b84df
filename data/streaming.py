"""Pretraining on a whole Hugging Face corpus without downloading it first (`data.streaming=true`).

With `data=pg19` or `data=pile` the packed cache holds a capped sample (`data.max_*`): the
tokenizer is trained on it and validation/test come from it. `data.streaming=true` additionally
makes training read the *whole* train split as a `datasets` streaming dataset:

* Order: `IterableDataset.shuffle(seed=seed, buffer_size=data.shuffle_buffer)`, with
  `set_epoch(e)` for epoch e, so the document order is a function of (seed, epoch).
* Sharding: processes split the stream with `datasets.distributed.split_dataset_by_node`
  (whole files when their count divides by the process count, else every world_size-th
  document), and inside a process `datasets` gives each DataLoader worker its own files, so no
  document is read twice and no reader downloads what it does not use. A worker left without a
  file (`data.num_workers` above the files per process) is a one-line error.
* Work in the reader: documents are tokenized (`DocumentEncoder`) and segmented (`Segmenter`,
  the same rules as the cache) in the DataLoader worker that reads them, then packed like the
  cache (each document followed by the end-of-document token, whose flag closes the segment)
  into blocks of `block_size + 1` tokens that overlap by one.
* Batches: each process makes micro-batches of `batch_size / (processes x accumulation)` blocks
  (the global batch semantics of `BatchStream`); with W workers, worker w makes the process's
  micro-batches w, w + W, ...
* Resume: micro-batch m of a process is the m-th it makes from its own documents, so
  `start_batch = global_step x accumulation` resumes exactly by replaying (reading and tokenizing,
  not training) the micro-batches before it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import get_worker_info

from bipe.errors import ConfigError

from .batches import BatchStream
from .config import DataConfig
from .segment import Segmenter
from .sources import FileReader, HubSource
from .tokenizer import DocumentEncoder


class StreamingBatches(BatchStream):
    """Infinite micro-batches of `input_ids`/`targets` long `[b, T]`, `boundary` bool `[b, T]`.

    A `BatchStream` for its global-batch contract (`shard`), but its micro-batches come from
    reading the stream in order, not from an index, so it has its own `__iter__`.
    """

    def __init__(self, cfg: DataConfig, tokenizer_json: str, eod_id: int, seed: int,
                 start_batch: int = 0) -> None:
        self.cfg = cfg
        self.tokenizer_json = tokenizer_json
        self.eod_id = eod_id
        self.seed = seed
        self.start_batch = start_batch
        self.batch_size = cfg.batch_size

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.world_size * self.accumulate)

    def documents(self) -> Iterator[str]:
        """Texts of this process's (and, inside a DataLoader worker, this worker's) share, epoch
        after epoch, each epoch shuffled anew."""
        from datasets.distributed import split_dataset_by_node

        source = HubSource(self.cfg)
        stream = source.open_split("train").shuffle(seed=self.seed,
                                                     buffer_size=self.cfg.shuffle_buffer)
        if self.world_size > 1:
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        epoch = 0
        while True:
            stream.set_epoch(epoch)
            mine = 0
            for _, text in source.texts(stream, FileReader()):
                mine += 1
                yield text
            if not mine:
                info = get_worker_info()
                where = f"process {self.rank}" + (f", loader worker {info.id}" if info else "")
                raise ConfigError(
                    f"data={self.cfg.name}: {where} got no document of the streamed train split "
                    f"({stream.num_shards} file(s) for {info.num_workers if info else 1} "
                    "worker(s)); set data.num_workers to at most the files per process, or "
                    "check data.hf_data_files / data.subset")
            epoch += 1

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 [T + 1], boundary bool [T + 1]) windows packed from this reader's share."""
        tok = Tokenizer.from_str(self.tokenizer_json)
        encoder, segmenter = DocumentEncoder(tok), Segmenter(self.cfg, tok)
        T = self.cfg.block_size
        ids_buf: list[np.ndarray] = []
        flags_buf: list[np.ndarray] = []
        held = 0
        for text in self.documents():
            ids, starts = encoder.encode_many([text])[0]
            if len(ids) == 0:
                continue
            flags = segmenter.boundaries(text, ids, starts)
            ids_buf += [ids.astype(np.int64), np.array([self.eod_id], dtype=np.int64)]
            flags_buf += [np.asarray(flags, dtype=bool), np.array([True])]
            held += len(ids) + 1
            if held < T + 1:
                continue
            ids_all, flags_all = np.concatenate(ids_buf), np.concatenate(flags_buf)
            n = (len(ids_all) - 1) // T  # full windows; the last token of one starts the next
            for j in range(n):
                yield ids_all[j * T : j * T + T + 1], flags_all[j * T : j * T + T + 1]
            ids_buf, flags_buf = [ids_all[n * T :]], [flags_all[n * T :]]
            held = len(ids_buf[0])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        b = self.micro_batch_size
        windows = self.blocks()
        m = worker  # this worker makes the process's micro-batches worker, worker + W, ...
        while True:
            rows = [next(windows) for _ in range(b)]
            if m >= self.start_batch:
                w = np.stack([r[0] for r in rows])
                f = np.stack([r[1] for r in rows])
                yield {"input_ids": torch.from_numpy(np.ascontiguousarray(w[:, :-1])),
                       "targets": torch.from_numpy(np.ascontiguousarray(w[:, 1:])),
                       "boundary": torch.from_numpy(np.ascontiguousarray(f[:, :-1]))}
            m += workers
