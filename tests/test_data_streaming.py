"""data.streaming: the whole train split read as a `datasets` streaming dataset (local JSON here,
the Hugging Face Hub in real use), shuffled with a seed, sharded without overlap, packed like the
cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bipe.errors import ConfigError
from data import DataConfig
from data.streaming import StreamingBatches
from tests.conftest import WORDS
from tests.test_data_pipeline import ready

N_DOCS = 24


def write_jsonl(path: Path, docs: int, seed: int, first: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for d in range(first, first + docs):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))).capitalize() + "."
                     for _ in range(rng.integers(4, 12))]
        lines.append(json.dumps({"text": f"Document {d}. " + " ".join(sentences)}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    files = {split: write_jsonl(root / f"{split}.jsonl", n, seed)
             for split, n, seed in (("validation", 4, 1), ("test", 4, 2))}
    half = N_DOCS // 2  # the train split as two files (shards), like a real hub dataset
    files["train"] = [write_jsonl(root / f"train-{i}.jsonl", half, 3 + i, first=i * half)
                      for i in range(2)]
    return {"name": "pg19", "hf_path": "json", "hf_data_files": files, "streaming": True,
            "shuffle_buffer": 8, "max_train_documents": 6, "segmenter": "punkt",
            "block_size": 16, "batch_size": 4, "tokenizer": {"vocab_size": 300},
            "cache_dir": str(root / "cache")}


def take(stream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_streaming_batches_are_seeded_resumable_and_packed_like_the_cache(cfg):
    dm = ready(cfg)
    assert dm.stats["train_streaming"] is True and dm.stats["documents"] == 6  # the capped sample
    loader = dm.train_dataloader()
    first = take(loader, 12)
    for b in first:
        assert b["input_ids"].shape == (4, 16) and b["boundary"].dtype == torch.bool
        assert (b["input_ids"][:, 1:] == b["targets"][:, :-1]).all()  # shifted by one
    again = take(ready(cfg).train_dataloader(), 12)
    assert all((a[k] == b[k]).all() for a, b in zip(first, again, strict=True) for k in a)
    other = take(ready(cfg, seed=1).train_dataloader(), 1)[0]
    assert not (other["input_ids"] == first[0]["input_ids"]).all()  # another shuffle
    resumed = ready(cfg)
    resumed.start_batch = 5
    assert (take(resumed.train_dataloader(), 1)[0]["input_ids"] == first[5]["input_ids"]).all()
    # Documents beyond the capped sample (the first 6 records, "Document 0" to "5") are read:
    # the whole split streams.
    tok = dm.tokenizer
    text = tok.decode(np.concatenate([b["input_ids"].flatten().numpy() for b in first]).tolist())
    numbers = {int(w.split(".")[0]) for w in text.split("Document ")[1:]}
    assert max(numbers) >= 6, numbers
    eod = dm.eod_id
    for b in first:  # the end-of-document token closes a segment, as in the cache
        assert b["boundary"][b["input_ids"] == eod].all()


def test_processes_read_disjoint_documents(cfg):
    dm = ready(cfg)
    config = DataConfig.from_dict(cfg)
    seen = []
    for rank in range(2):
        stream = StreamingBatches(config, dm.tokenizer.to_str(), dm.eod_id, seed=0).shard(2, rank)
        docs = list(zip(range(N_DOCS // 2), stream.documents(), strict=False))  # one epoch
        seen.append({d.split(".")[0] for _, d in docs})
    assert len(seen[0]) == len(seen[1]) == N_DOCS // 2 and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == N_DOCS  # together: every document, each once


def test_streaming_needs_a_hub_source(cfg):
    with pytest.raises(ConfigError, match="data.streaming=true"):
        DataConfig.from_dict({"name": "shakespeare", "streaming": True})


@pytest.mark.parametrize(("subset", "kept"), [("ArXiv", {"a0", "a1"}), (None, {"a0", "a1", "g0"})])
def test_pile_subset_filters_by_pile_set_name_and_null_keeps_all(tmp_path, subset, kept):
    from data.sources import FileReader, HubSource

    records = [("a0", "ArXiv"), ("g0", "Github"), ("a1", "ArXiv")]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": m}}) + "\n"
                            for t, m in records))
    config = DataConfig.from_dict({"name": "pile", "subset": subset, "hf_path": "json",
                                   "hf_data_files": {"train": str(path)},
                                   "cache_dir": str(tmp_path / "cache")})
    source = HubSource(config)
    assert {t for _, t in source.texts(source.open_split("train"), FileReader())} == kept


def test_loader_workers_tokenize_their_own_files(cfg):
    """Two DataLoader workers: each reads, tokenizes and packs the documents of its own file;
    more workers than files is a one-line error, not a silent stall."""
    dm = ready({**cfg, "num_workers": 2})
    batches = take(dm.train_dataloader(), 6)
    assert all(b["input_ids"].shape == (4, 16) for b in batches)
    tok = dm.tokenizer
    for worker in range(2):  # batches alternate between workers; worker w has file w only
        text = tok.decode(np.concatenate(
            [b["input_ids"].flatten().numpy() for b in batches[worker::2]]).tolist())
        numbers = {int(w.split(".")[0]) for w in text.split("Document ")[1:]}
        assert numbers and all(n // (N_DOCS // 2) == worker for n in numbers), (worker, numbers)
    with pytest.raises(ConfigError, match="data.num_workers"):
        take(ready({**cfg, "num_workers": 3}).train_dataloader(), 6)
