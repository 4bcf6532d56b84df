"""Section 6: throughput of each data-pipeline stage, and the reload time of a warm cache.

Each stage is timed on its own over the same documents (every split of the configured corpus),
with its inputs prepared beforehand, exactly as `LMDataModule` runs it:

* tokenization: `DocumentEncoder.encode_many` (ids + character offsets of every token);
* segmentation: `Segmenter.boundaries` per document (Punkt sentences + newlines by default),
  given the ids and offsets;
* packing: `SplitWriter.add` per document into a temporary folder, `close()` (fsync, checksums)
  and the segment statistics, as `LMDataModule._build` does;
* end to end: `LMDataModule._build` itself with `data.pack_workers` = 1 and 2 (tokenizing and
  segmenting over a process pool), the tokenizer already trained.

MB/s = UTF-8 bytes of the input text (10^6 bytes = 1 MB) over the stage's median time. The
reload time is `LMDataModule(cfg).setup()` on a warm cache, timed inside a fresh interpreter
(imports excluded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import SectionResult, Table, fmt
from bench.settings import Profile
from bench.timing import interleave, median, spread
from data import LMDataModule
from data.config import DataConfig
from data.packing import SplitWriter, ids_dtype, segment_stats
from data.segment import Segmenter
from data.sources import make_source
from data.tokenizer import DocumentEncoder, eod_id_of, train_or_load_cached

ROOT = Path(__file__).resolve().parent.parent

RELOAD_SCRIPT = """
import json, sys, time
from data import LMDataModule
from data.config import DataConfig
cfg = DataConfig.from_dict(json.loads(sys.argv[1]))
t0 = time.perf_counter()
dm = LMDataModule(cfg)
dm.setup()
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "built": dm.built_cache,
                  "tokens": dm.stats["tokens"]}))
"""


def reload_seconds(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run `LMDataModule(cfg).setup()` in a fresh interpreter; its own timing of that call."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(cfg)], env=env,
                         capture_output=True, text=True, check=False, cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"reload subprocess failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_data(profile: Profile) -> SectionResult:
    """Section 6."""
    res = SectionResult("data", "6. Data pipeline")
    cfg = DataConfig.from_dict(dict(profile.data_cfg))
    # Warm (or build) the packed cache first: the reload below needs it, and it trains/caches
    # the tokenizer the stages use.
    t0 = time.perf_counter()
    dm = LMDataModule(cfg)
    dm.setup()
    warm_s = time.perf_counter() - t0
    built = dm.built_cache
    corpus = make_source(cfg).load()
    docs = [d.text for split in corpus.splits.values() for d in split]
    train_texts = [d.text for d in corpus.splits["train"]]
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    tok = train_or_load_cached(train_texts, cfg.tokenizer.vocab_size, cfg.cache_root,
                               cfg.tokenizer.eod_token)
    eod = eod_id_of(tok, cfg.tokenizer.eod_token, "the tokenizer")
    dtype = ids_dtype(tok.get_vocab_size(with_added_tokens=True))
    encoder = DocumentEncoder(tok)
    segmenter = Segmenter(cfg, tok)
    encoded = encoder.encode_many(docs)
    boundaries = [segmenter.boundaries(t, ids, st) for t, (ids, st) in
                  zip(docs, encoded, strict=True)]
    n_tokens = sum(len(ids) for ids, _ in encoded)

    def tokenize() -> None:
        encoder.encode_many(docs)

    def segment() -> None:
        for text, (ids, starts) in zip(docs, encoded, strict=True):
            segmenter.boundaries(text, ids, starts)

    def pack() -> None:
        with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
            writer = SplitWriter(Path(tmp), "train", dtype)
            for (ids, _), b in zip(encoded, boundaries, strict=True):
                writer.add(ids, b, eod)
            meta = writer.close()
            segment_stats(np.fromfile(Path(tmp) / meta["boundary_file"], dtype=np.bool_))

    stages = {"segmentation": segment, "tokenization": tokenize, "packing": pack}
    samples = interleave(stages, warmup=1, reps=profile.data_reps)
    table = Table(f"{cfg.name} corpus ({cfg.segmenter} segmenter, BPE vocab "
                  f"{cfg.tokenizer.vocab_size}): {len(docs)} documents, {n_bytes / 1e6:.2f} MB, "
                  f"{n_tokens:,} tokens", ["stage", "median s", "MB/s", "tokens/s"])
    total = 0.0
    for name in stages:
        m = median(samples[name])
        total += m
        res.records.append({"stage": name, "bytes": n_bytes, "tokens": n_tokens,
                            "samples_s": samples[name], "median_s": m,
                            "median_mb_per_s": n_bytes / 1e6 / m,
                            "median_tokens_per_s": n_tokens / m})
        table.add(name, fmt(m, 3), fmt(n_bytes / 1e6 / m, 3), fmt(n_tokens / m, 3))
    table.add("**all three**", fmt(total, 3), fmt(n_bytes / 1e6 / total, 3),
              fmt(n_tokens / total, 3))
    res.records.append({"stage": "all three", "bytes": n_bytes, "median_s": total,
                        "median_mb_per_s": n_bytes / 1e6 / total})
    res.tables.append(table)

    # End to end: what a new cache costs once the tokenizer is trained (read the corpus,
    # tokenize and segment over `pack_workers` processes, write and fsync the split files).
    def build(workers: int) -> Callable[[], None]:
        module = LMDataModule(dataclasses.replace(cfg, pack_workers=workers))
        source = make_source(module.cfg)

        def call() -> None:
            with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
                module._build(Path(tmp), source)

        return call

    builds = interleave({str(w): build(w) for w in profile.data_workers}, warmup=0,
                        reps=profile.data_reps)
    serial = median(builds[str(profile.data_workers[0])])
    e2e = Table("end to end: a new packed cache (tokenizer already trained)",
                ["processes", "median s", "MB/s", f"× {profile.data_workers[0]} process(es)",
                 "spread"])
    for w in profile.data_workers:
        m = median(builds[str(w)])
        res.records.append({"stage": "end to end", "workers": w, "bytes": n_bytes,
                            "samples_s": builds[str(w)], "median_s": m,
                            "median_mb_per_s": n_bytes / 1e6 / m, "speedup": serial / m,
                            "spread": spread(builds[str(w)])})
        e2e.add(w, fmt(m, 3), fmt(n_bytes / 1e6 / m, 3), fmt(serial / m, 3) + "×",
                fmt(spread(builds[str(w)]), 2))
    res.tables.append(e2e)

    plain = _plain(cfg)
    reloads = [reload_seconds(plain) for _ in range(profile.reload_reps)]
    rs = [r["seconds"] for r in reloads]
    reload_table = Table("warm-cache reload", ["what", "median s", "samples"])
    reload_table.add("LMDataModule(cfg).setup(), fresh interpreter", fmt(median(rs), 3),
                     len(rs))
    res.records.append({"stage": "reload", "samples_s": rs, "median_s": median(rs),
                        "rebuilt": any(r["built"] for r in reloads)})
    res.tables.append(reload_table)
    res.notes += [
        f"median of {profile.data_reps} runs per stage after one warm-up run, stages "
        "interleaved; MB = 10^6 UTF-8 bytes of input text; each stage's inputs are prepared "
        "beforehand, so stage times add up to the pipeline's",
        f"reload: median of {profile.reload_reps} fresh interpreters, timing only the setup() "
        "call (interpreter start and imports excluded); setup verifies the cache's checksums",
        f"cache: {cfg.cache_root} ({'built by this run in' if built else 'already warm; first'} "
        f"setup() here took {warm_s:.1f} s)",
        f"end to end: median of {profile.data_reps} builds per process count, alternating; "
        "each reads the corpus, loads the cached tokenizer, tokenizes and segments every "
        "document (in `data.pack_workers` processes) and writes and fsyncs the split files "
        "into a temporary folder, as a cache miss does",
        "targets (issues 7, 16): at least 2 MB/s end to end on 2 cores; reload under a second",
    ]
    return res


def _plain(cfg: DataConfig) -> dict[str, Any]:
    """A JSON-able dict that `DataConfig.from_dict` turns back into `cfg`."""
    out = dataclasses.asdict(cfg)
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    out["hf_splits"] = dict(cfg.hf_splits)
    return out
