"""LMDataModule on small synthetic corpora: cache reuse, determinism, resume, blocks, stats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from data import LMDataModule  # noqa: E402

WORDS = ["the", "king", "is", "dead", "long", "live", "queen", "of", "all", "things", "that",
         "were", "and", "are"]


def write_corpus(root: Path, n_files: int = 12, seed: int = 0) -> str:
    """Text files with sentences and lines; returns a glob for them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(30):
            sentences = []
            for _ in range(rng.integers(1, 3)):  # one or two sentences per line
                words = rng.choice(WORDS, size=rng.integers(2, 12))
                sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
            lines.append(" ".join(sentences))
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root / "*.txt")


def make_cfg(tmp_path: Path, **overrides) -> dict:
    cfg = {
        "name": "text_files",
        "glob": write_corpus(tmp_path / "corpus") if "glob" not in overrides else None,
        "segmenter": "lines",
        "block_size": 16,
        "batch_size": 4,
        "num_workers": 0,
        "tokenizer": {"vocab_size": 300},
        "cache_dir": str(tmp_path / "cache"),
        "validation_fraction": 0.15,
        "test_fraction": 0.15,
    }
    cfg.update(overrides)
    return cfg


def ready(cfg: dict, seed: int = 0) -> LMDataModule:
    dm = LMDataModule(cfg, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("loader ended early")


def same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_batch_format(tmp_path):
    dm = ready(make_cfg(tmp_path))
    batch = take(dm.train_dataloader(), 1)[0]
    assert set(batch) == {"input_ids", "targets", "boundary"}
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert batch["targets"].dtype == torch.long and batch["boundary"].dtype == torch.bool
    # targets are the inputs shifted by one inside each window
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert dm.tokenizer.token_to_id("<|endoftext|>") == dm.eod_id
    assert isinstance(dm.tokenizer.to_str(), str)
    ids, boundary = dm.split_arrays("train")
    assert ids.dtype == np.uint16 and boundary[ids == dm.eod_id].all()  # eod closes a segment
    assert boundary[-1] and ids[-1] == dm.eod_id


def test_cache_is_reused_without_touching_the_corpus(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    dm1 = ready(cfg)
    assert dm1.built_cache
    first = take(dm1.train_dataloader(), 3)

    def boom(*args, **kwargs):
        raise AssertionError("the corpus was read or tokenized again")

    monkeypatch.setattr("data.sources.text_files.TextFilesSource.load", boom)
    monkeypatch.setattr("data.datamodule.ParallelEncoder", boom)
    monkeypatch.setattr("data.tokenizer.train_bpe", boom)
    dm2 = ready(cfg)
    assert not dm2.built_cache and dm2.cache_path == dm1.cache_path
    assert same(first, take(dm2.train_dataloader(), 3))
    assert dm2.stats == dm1.stats


def test_seed_determinism_and_resume(tmp_path):
    cfg = make_cfg(tmp_path)
    dm = ready(cfg, seed=0)
    bpe = dm.stats["batches_per_epoch"]
    assert bpe >= 2
    run = take(dm.train_dataloader(), bpe + 3)
    assert same(run, take(ready(cfg, seed=0).train_dataloader(), bpe + 3))
    assert not same(run[:2], take(ready(cfg, seed=1).train_dataloader(), 2))
    for k in (1, bpe, bpe + 2):  # inside the first epoch and across the epoch boundary
        dm_k = ready(cfg, seed=0)
        dm_k.start_batch = k
        assert same(run[k : k + 1], take(dm_k.train_dataloader(), 1))
    # within an epoch no block repeats; the next epoch uses another order
    ds = dm.train_dataset()
    epoch0 = np.concatenate([ds.block_indices(k) for k in range(bpe)])
    epoch1 = np.concatenate([ds.block_indices(k) for k in range(bpe, 2 * bpe)])
    assert len(set(epoch0.tolist())) == bpe * 4
    assert not np.array_equal(epoch0, epoch1)


def test_workers_keep_batch_order(tmp_path):
    cfg = make_cfg(tmp_path)
    base = take(ready(cfg).train_dataloader(), 5)
    dm = ready({**cfg, "num_workers": 2})
    dm.start_batch = 0
    assert same(base, take(dm.train_dataloader(), 5))


def test_val_batches_same_shape_and_every_token_scored_once(tmp_path):
    dm = ready(make_cfg(tmp_path, block_size=7, batch_size=3))
    ids, boundary = dm.split_arrays("validation")
    inputs, targets, flags = [], [], []
    for batch in dm.val_dataloader():
        assert batch["input_ids"].shape == (3, 7)
        keep = batch["targets"] != -100
        assert keep.any()  # no batch is entirely padding
        inputs.append(batch["input_ids"][keep])
        targets.append(batch["targets"][keep])
        flags.append(batch["boundary"][keep])
    assert torch.cat(targets).tolist() == ids[1:].astype(np.int64).tolist()
    assert torch.cat(inputs).tolist() == ids[:-1].astype(np.int64).tolist()
    assert torch.cat(flags).tolist() == boundary[:-1].tolist()
    assert len(list(dm.test_dataloader())) >= 1


def test_stats_on_hand_made_corpus(tmp_path):
    # vocab 257 = 256 bytes + <|endoftext|>: no merges, one token per ASCII character
    train = tmp_path / "train"
    train.mkdir()
    (train / "a.txt").write_text("aaaa\nbb\ncccccc\n")
    (train / "b.txt").write_text("dddddddddd\ne\n")
    (tmp_path / "v.txt").write_text("xy\nz\n")
    dm = ready(make_cfg(tmp_path, glob=None, train_glob=str(train / "*.txt"),
                        validation_glob=str(tmp_path / "v.txt"), block_size=4,
                        tokenizer={"vocab_size": 257}))
    ids, boundary = dm.split_arrays("train")
    assert len(ids) == 30  # 15 + 13 characters, plus one end-of-document token each
    # segments: "aaaa\n" | "bb\n" | "cccccc\n<eod>" | "dddddddddd\n" | "e\n<eod>"
    assert np.flatnonzero(boundary).tolist() == [4, 7, 15, 26, 29]
    s = dm.stats
    assert (s["tokens"], s["documents"], s["segments"]) == (30, 2, 5)
    assert s["tokens_per_segment_mean"] == 6.0
    assert (s["tokens_per_segment_p50"], s["tokens_per_segment_max"]) == (5, 11)
    # blocks of 4 inputs: [0,4) [4,8) ... 7 blocks; segments starting in each: 1 2 1 1 1 1 2
    assert s["train_blocks"] == 7
    assert s["max_segments_per_block"] == 2
    assert s["segments_per_block_mean"] == round(9 / 7, 3)
    assert s["segments_longer_than_block"] == 3
    assert (s["validation_tokens"], s["test_tokens"]) == (6, 6)  # test = validation files
    assert all(isinstance(v, (int, float)) for v in s.values())


def test_ids_identical_for_every_segmenter(tmp_path):
    base = make_cfg(tmp_path)
    arrays = {}
    for kind in ("lines", "punkt", "separators", "fixed", "none"):
        dm = ready({**base, "segmenter": kind, "segment_length": 8})
        ids, boundary = dm.split_arrays("train")
        arrays[kind] = (np.array(ids), np.array(boundary))
    ref_ids = arrays["lines"][0]
    for ids, _ in arrays.values():
        assert np.array_equal(ids, ref_ids)
    counts = {k: int(b.sum()) for k, (_, b) in arrays.items()}
    assert counts["none"] == int((ref_ids == 0).sum())  # only end-of-document tokens
    assert counts["punkt"] > counts["lines"] > counts["none"]


@pytest.mark.parametrize("segmenter", ["punkt", "lines"])
def test_the_parallel_cache_is_the_serial_cache_byte_for_byte(tmp_path, segmenter,
                                                              monkeypatch):
    """Tokenizing and segmenting in worker processes packs the same bytes as one process (the
    documents go out in many small groups, so the workers' answers interleave)."""
    monkeypatch.setattr("data.encode.GROUP_CHARS", 3000)
    glob = write_corpus(tmp_path / "corpus", n_files=30)
    folders = []
    for workers in (1, 3):
        cfg = make_cfg(tmp_path, glob=glob, segmenter=segmenter, pack_workers=workers,
                       cache_dir=str(tmp_path / f"cache{workers}"))
        folders.append(ready(cfg).cache_path)
    serial, parallel = folders
    assert serial.name == parallel.name  # one cache key: the worker count is not in it
    files = sorted(p.name for p in serial.iterdir())
    assert files == sorted(p.name for p in parallel.iterdir())
    for name in files:
        if name == "meta.json":  # holds the build time; the rest must agree
            a, b = (json.loads((f / name).read_text()) for f in folders)
            for meta in (a, b):
                meta.pop("build_seconds"), meta.pop("created")
            assert a == b
        else:
            assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name
