"""LMDataModule: builds or reuses the packed cache and serves blocks of (ids, boundary).

Blocks. A split is one flat token stream. Block i covers inputs `[i*T, (i+1)*T)`; a window of
T+1 tokens gives `input_ids = w[:-1]`, `targets = w[1:]`, `boundary` = the flags of the inputs,
so consecutive blocks overlap by exactly one token and every token after the first is a target
exactly once. Positions (intra/inter) restart at every block; that is the model's job.

Training: `train_dataloader()` is infinite and deterministic. Global batch k takes block indices
`perm_e[j*B:(j+1)*B]` with `e = k // batches_per_epoch`, `j = k % batches_per_epoch` and
`perm_e` a permutation of all training blocks drawn from `numpy.random.default_rng((seed, e))`
(the last `n_blocks % B` blocks of each permutation are skipped, differently each epoch).
Batch k is thus a function of (seed, k) only; setting `dm.start_batch = k` before
`train_dataloader()` resumes at batch k without replaying anything. With `num_workers = W > 0`
worker w produces batches k = start + w, start + w + W, ... and the DataLoader returns them
round-robin, i.e. in order; workers are seeded from the loader's seeded generator.

Validation/test: fixed blocks in stream order, no shuffle. The tail that does not fill a block
is a last, padded block (padding: input = end-of-document id, target = -100, boundary False) and
the number of blocks is padded up to a multiple of the batch size with fully padded blocks, so
every batch has the same shape [B, T] and every token is scored exactly once. Only the last batch
holds padding and it always holds at least one real block; average the loss over scored tokens
(targets != -100), not over batches.

Cache key = hash of: source fingerprint (cheap: package version and file sizes/mtimes, or the hub
dataset identity and caps), segmenter identity (name, options, rule version), tokenizer identity
(the given tokenizer.json's content hash, or "trained BPE, vocab size, training version", since a
trained BPE is a deterministic function of the training split the source fingerprint already
pins), and the pack version. A warm start computes it without reading the corpus.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from bipe.errors import ConfigError, DataError

from .batches import BlockDataset, SplitStream, TextBatches, trainer_layout
from .config import SPLITS, DataConfig, canonical_split
from .encode import ParallelEncoder, pack_workers
from .packing import (
    PACK_VERSION,
    PackedCorpus,
    SplitWriter,
    cache_key,
    file_checksum,
    ids_dtype,
    load_or_build,
    segment_lengths,
    segment_stats,
    segments_per_block,
)
from .segment import Segmenter, configured_separator_ids
from .sources import Source, make_source
from .streaming import StreamingBatches
from .tokenizer import (
    TOKENIZER_VERSION,
    eod_id_of,
    file_hash,
    load_tokenizer_file,
    tokenizer_path_or_error,
    train_or_load_cached,
)

log = logging.getLogger(__name__)



def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random in a DataLoader worker from torch's per-worker seed (itself seeded).
    Workers ignore Ctrl-C: the main process decides when to stop (after the current step) and
    shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class LMDataModule(L.LightningDataModule):
    """Packed language-modelling data with segment boundaries; see the module docstring."""

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__()
        self.cfg: DataConfig = cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} must be a non-negative integer")
        self.seed = seed
        self.start_batch = 0
        self.tokenizer: Tokenizer | None = None
        self.eod_id: int | None = None
        self.stats: dict[str, Any] = {}
        self.cache_key: str | None = None
        self.built_cache = False  # True when this instance (re)built the packed cache
        self._packed: PackedCorpus | None = None
        self._streams: dict[str, SplitStream] = {}
        self._separator_ids: list[int] | None = None

    # -- Lightning hooks -------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the packed cache if needed (Lightning calls this on one process)."""
        self._ensure_packed()

    def setup(self, stage: str | None = None) -> None:
        """Open (building if needed) the cache; fill tokenizer, eod_id and stats. Idempotent.
        For `fit`, also check that the training split holds a batch: Lightning asks for the
        training loader only after the sanity validation, too late to report a bad block size."""
        if self._packed is None:
            self._ensure_packed()
        if stage == "fit" and not self.cfg.streaming:
            self.train_dataset()

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints so a resume on different data is noticed."""
        return {"cache_key": self.cache_key, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when resuming from a checkpoint that was trained on other data."""
        old = state_dict.get("cache_key")
        if old and self.cache_key and old != self.cache_key:
            log.warning(
                "resuming on different data: checkpoint cache key %s, now %s", old, self.cache_key
            )

    # -- cache -----------------------------------------------------------------------------------

    def _tokenizer_identity(self) -> dict[str, Any]:
        tcfg = self.cfg.tokenizer
        if tcfg.path:
            path = tokenizer_path_or_error(tcfg.path)
            return {"file": file_hash(path), "eod_token": tcfg.eod_token}
        return {"trained_bpe": tcfg.vocab_size, "version": TOKENIZER_VERSION,
                "eod_token": tcfg.eod_token}

    def _ensure_packed(self) -> None:
        if self._packed is not None:
            return
        t0 = time.perf_counter()
        cfg = self.cfg
        source = make_source(cfg)
        material = {
            "pack_version": PACK_VERSION,
            "source": source.fingerprint(),
            "segmenter": Segmenter.identity(cfg),
            "tokenizer": self._tokenizer_identity(),
        }
        key = cache_key(material)
        root = Path(cfg.cache_root) / "packed"
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"data.cache_dir={cfg.cache_dir!r}: cannot create {root}: {e}") from e
        packed, built = load_or_build(root, cfg.name, key, material,
                                      lambda tmp: self._build(tmp, source))
        self._packed, self.built_cache, self.cache_key = packed, built, key
        self.tokenizer = load_tokenizer_file(packed.path / "tokenizer.json", "packed cache")
        self.eod_id = int(packed.meta["eod_id"])
        self._streams = {s: SplitStream(packed.path, packed.split_meta(s), packed.meta["dtype"])
                         for s in SPLITS}
        self.stats = self._block_stats(packed.meta)
        log.info(
            "data %s (%s): %s in %.2fs from %s", cfg.name, cfg.segmenter,
            "built" if built else "cache reused", time.perf_counter() - t0, packed.path,
        )
        log.info("data stats: %s", self.stats)

    def _build(self, tmp: Path, source: Source) -> dict[str, Any]:
        """Read, tokenize, segment and write every split into `tmp`; returns the metadata."""
        cfg = self.cfg
        t0 = time.perf_counter()
        corpus = source.load()
        train_texts = [d.text for d in corpus.splits["train"]]
        if not train_texts:
            raise DataError(f"data={cfg.name}: the training split is empty (no documents)")
        t_load = time.perf_counter()
        if cfg.tokenizer.path:
            tok = load_tokenizer_file(tokenizer_path_or_error(cfg.tokenizer.path))
            eod_source = f"data.tokenizer.path={cfg.tokenizer.path!r}"
        else:
            tok = train_or_load_cached(train_texts, cfg.tokenizer.vocab_size, cfg.cache_root,
                                       cfg.tokenizer.eod_token)
            eod_source = "the trained tokenizer"
        eod = eod_id_of(tok, cfg.tokenizer.eod_token, eod_source)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = ids_dtype(vocab)
        t_tok = time.perf_counter()
        workers = pack_workers(cfg)
        splits_meta: dict[str, Any] = {}
        seg_stats: dict[str, Any] = {}
        empty_after_tokenizing = 0
        with ParallelEncoder(cfg, tok, workers) as encoder:
            # One stream over every split, in order: the workers run ahead into validation and
            # test while this process writes the training split.
            encoded = encoder.encode([d.text for split in SPLITS for d in corpus.splits[split]])
            for split in SPLITS:
                writer = SplitWriter(tmp, split, dtype)
                try:
                    for ids, flags in itertools.islice(encoded, len(corpus.splits[split])):
                        if len(ids) == 0:
                            empty_after_tokenizing += 1
                            continue
                        writer.add(ids, flags, eod)
                except BaseException:
                    writer.abort()
                    raise
                splits_meta[split] = writer.close()
                if writer.documents == 0:
                    raise DataError(f"data={cfg.name}: the {split} split has no documents")
                boundary = np.fromfile(tmp / splits_meta[split]["boundary_file"], np.bool_)
                seg_stats[split] = segment_stats(boundary)
        tok_path = tmp / "tokenizer.json"
        tok.save(str(tok_path))
        with open(tok_path, "rb+") as f:
            os.fsync(f.fileno())
        t_end = time.perf_counter()
        log.info(
            "built %s cache: load %.1fs, tokenizer %.1fs, tokenize+segment+write %.1fs "
            "(%d process(es))", cfg.name, t_load - t0, t_tok - t_load, t_end - t_tok, workers,
        )
        return {
            "dtype": dtype.str,
            "vocab_size": vocab,
            "eod_id": eod,
            "tokenizer_checksum": file_checksum(tok_path, tok_path.stat().st_size),
            "splits": splits_meta,
            "segment_stats": seg_stats,
            "source_stats": {
                **corpus.stats,
                "skipped_empty_documents": corpus.stats.get("skipped_empty_documents", 0)
                + empty_after_tokenizing,
            },
            "build_seconds": round(t_end - t0, 3),
        }

    def _block_stats(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Flat JSON-able statistics; train split unless prefixed with the split name."""
        t = self.cfg.block_size
        train = self._streams["train"]
        stats: dict[str, Any] = {
            "vocab_size": int(meta["vocab_size"]),
            "eod_id": int(meta["eod_id"]),
            "block_size": t,
            "tokens": int(meta["splits"]["train"]["tokens"]),
            "documents": int(meta["splits"]["train"]["documents"]),
        }
        stats.update(meta["segment_stats"]["train"])
        per_block = segments_per_block(train.boundary, t)
        stats["train_blocks"] = int(len(per_block))
        stats["batches_per_epoch"] = int(len(per_block) // self.cfg.batch_size)
        # Streaming: training reads the whole split; these train figures describe the cached
        # sample (which also sets the segment counts a BiPE checkpoint records).
        stats["train_streaming"] = self.cfg.streaming
        has_blocks = len(per_block) > 0
        stats["segments_per_block_mean"] = round(float(per_block.mean()), 3) if has_blocks else 0.0
        stats["max_segments_per_block"] = int(per_block.max()) if has_blocks else 0
        stats["segments_longer_than_block"] = int((segment_lengths(train.boundary) > t).sum())
        for split in ("validation", "test"):
            stats[f"{split}_tokens"] = int(meta["splits"][split]["tokens"])
            stats[f"{split}_documents"] = int(meta["splits"][split]["documents"])
            stats[f"{split}_segments"] = int(meta["segment_stats"][split]["segments"])
        for k, v in meta["source_stats"].items():
            stats[k] = int(v)
        return stats

    # -- access ----------------------------------------------------------------------------------

    def _stream(self, split: str) -> SplitStream:
        if self._packed is None:
            self.setup()
        return self._streams[canonical_split(split)]

    @property
    def cache_path(self) -> Path:
        """The packed cache folder in use (after setup)."""
        if self._packed is None:
            self.setup()
        assert self._packed is not None
        return self._packed.path

    @property
    def separator_ids(self) -> list[int]:
        """Ids of the tokens matching `data.separators` (for boundaries_from_separators)."""
        if self._separator_ids is None:
            if self.tokenizer is None:
                self.setup()
            assert self.tokenizer is not None
            self._separator_ids = configured_separator_ids(self.tokenizer, self.cfg).tolist()
        return self._separator_ids

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], boundary bool [N]) read-only memmaps of a whole split."""
        s = self._stream(split)
        return s.ids, s.boundary

    def _pin(self) -> bool:
        return torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory

    def _loader_kwargs(self) -> dict[str, Any]:
        nw = self.cfg.num_workers
        return {
            "num_workers": nw,
            "pin_memory": self._pin(),
            "worker_init_fn": _seed_worker if nw > 0 else None,
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_dataset(self) -> TextBatches:
        """The infinite batch stream, starting at `self.start_batch`."""
        if isinstance(self.start_batch, bool) or not isinstance(self.start_batch, int) or \
                self.start_batch < 0:
            raise ConfigError(f"start_batch={self.start_batch!r} must be a non-negative integer")
        ds = TextBatches(self._stream("train"), self.cfg.block_size, self.cfg.batch_size,
                          self.seed, self.start_batch)
        if ds.batches_per_epoch == 0:
            raise DataError(
                f"the training split has {len(ds.stream)} tokens = {ds.n_blocks} block(s) of "
                f"data.block_size={self.cfg.block_size}, fewer than data.batch_size="
                f"{self.cfg.batch_size}; lower data.block_size or data.batch_size, or add data"
            )
        return ds

    def train_dataloader(self) -> DataLoader:
        """Infinite, deterministic: batch k is a function of (seed, k); starts at start_batch;
        under a trainer, this process's share of each global batch (`BatchStream`)."""
        if self.cfg.streaming:  # the whole Hugging Face train split (data/streaming.py)
            stream = StreamingBatches(self.cfg, self.tokenizer.to_str(), self._eod(), self.seed,
                                      self.start_batch).shard(*trainer_layout(self))
            return DataLoader(stream, batch_size=None, **self._loader_kwargs())
        ds = self.train_dataset().shard(*trainer_layout(self))
        return DataLoader(ds, batch_size=None, **self._loader_kwargs())

    def _eval_loader(self, split: str) -> DataLoader:
        ds = BlockDataset(self._stream(split), self.cfg.block_size, self._eod(), pad_last=True,
                          pad_to_multiple=self.cfg.batch_size)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, drop_last=False,
                          persistent_workers=self.cfg.num_workers > 0, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """Fixed blocks of block_size, same-size batches, padded targets = -100."""
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        """Like val_dataloader on the test split."""
        return self._eval_loader("test")

    def _eod(self) -> int:
        if self.eod_id is None:
            self.setup()
        assert self.eod_id is not None
        return self.eod_id
