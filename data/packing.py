"""Packing into the on-disk cache: flat token/boundary streams per split, atomic and verified.

Layout of one packed corpus, `<cache_dir>/packed/<source>-<key>/`:

* `<split>.ids`      - all token ids of the split, documents joined by the end-of-document token
                       (uint16 when the vocabulary fits in 16 bits, else uint32), raw little-endian
* `<split>.boundary` - uint8 0/1 per token, 1 = the token ends its segment (the end-of-document
                       token always does)
* `tokenizer.json`   - the tokenizer that produced the ids (the folder is self-contained)
* `meta.json`        - key material, per-split token/document counts, dtype, checksums (of the
                       split files and tokenizer.json), and block-size-independent statistics;
                       written last

`key` is a hash of (source fingerprint, segmenter identity, tokenizer identity,
`PACK_VERSION`); see `LMDataModule` for what each part contains. Block size is not part of the
key: blocks are cut from the flat streams when loading, so one cache serves every block size.

Writing is atomic: everything goes into a temporary sibling folder `.tmp-<name>-...`, files and
folder are fsynced, then the folder is renamed into place. A run killed mid-write leaves only a
`.tmp-*` folder, which no reader ever opens and the next builder removes. Concurrent builders
(e.g. a Hydra multirun) serialise on a lock file (`filelock`), and a losing rename is harmless.
A write that fails on a full or read-only disk raises an `OSError` naming the cache folder.

Loading verifies: meta.json parses and has this version and key, every file exists with exactly
`tokens * itemsize` bytes (catches truncation), and a checksum matches (catches corruption):
blake2b of the whole file up to 64 MiB, above that of 64 evenly spaced 1 MiB samples plus the
size (cheap on huge corpora, still catches truncation and most corruption). Any failure is logged
as a warning and the folder is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from bipe.errors import DataError, name_file
from bipe.io import fsync_dir, make_temp_dir

log = logging.getLogger(__name__)

PACK_VERSION = 1  # bump when the layout or packing rules change
FULL_HASH_LIMIT = 64 << 20
SAMPLE_COUNT = 64
SAMPLE_BYTES = 1 << 20


def ids_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits in 16 bits, else uint32 (explicit byte order:
    the files are portable and meta.json records the exact dtype string)."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def cache_key(material: dict[str, Any]) -> str:
    """20-hex-digit hash of JSON-able key material (sorted keys, so order does not matter)."""
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(blob.encode(), digest_size=10).hexdigest()


def file_checksum(path: Path, size: int) -> str:
    """blake2b of the file (<= 64 MiB) or of its size plus 64 evenly spaced 1 MiB samples."""
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLE_COUNT - 1)
            for i in range(SAMPLE_COUNT):
                f.seek(int(i * step))
                h.update(f.read(SAMPLE_BYTES))
    return ("full:" if size <= FULL_HASH_LIMIT else "sampled:") + h.hexdigest()


class SplitWriter:
    """Streams documents of one split into `<split>.ids` / `<split>.boundary`."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype) -> None:
        self.split = split
        self.dtype = dtype
        self.ids_path = folder / f"{split}.ids"
        self.boundary_path = folder / f"{split}.boundary"
        self._ids = open(self.ids_path, "wb")  # noqa: SIM115 - closed in close()
        self._boundary = open(self.boundary_path, "wb")  # noqa: SIM115
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray, boundary: np.ndarray, eod_id: int) -> None:
        """Append one document's content tokens plus its end-of-document token."""
        ids_out = np.empty(len(ids) + 1, dtype=self.dtype)
        ids_out[:-1] = ids
        ids_out[-1] = eod_id
        b_out = np.empty(len(ids) + 1, dtype=np.uint8)
        b_out[:-1] = boundary
        b_out[-1] = 1
        self._ids.write(ids_out.tobytes())
        self._boundary.write(b_out.tobytes())
        self.tokens += len(ids_out)
        self.documents += 1

    def close(self) -> dict[str, Any]:
        """Flush, fsync and close; returns this split's metadata."""
        for f in (self._ids, self._boundary):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "ids_file": self.ids_path.name,
            "boundary_file": self.boundary_path.name,
            "ids_checksum": file_checksum(self.ids_path, self.tokens * self.dtype.itemsize),
            "boundary_checksum": file_checksum(self.boundary_path, self.tokens),
        }

    def abort(self) -> None:
        """Close without caring about the files (the temp folder is removed by the caller)."""
        for f in (self._ids, self._boundary):
            with contextlib.suppress(OSError):
                f.close()


@dataclass
class PackedCorpus:
    """A verified cache folder: metadata plus lazily opened memmaps per split."""

    path: Path
    meta: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def split_meta(self, split: str) -> dict[str, Any]:
        return self.meta["splits"][split]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N] uint16/uint32, boundary [N] bool) as read-only memmaps."""
        m = self.split_meta(split)
        n = m["tokens"]
        ids = np.memmap(self.path / m["ids_file"], dtype=self.dtype, mode="r", shape=(n,))
        boundary = np.memmap(self.path / m["boundary_file"], dtype=np.bool_, mode="r", shape=(n,))
        return ids, boundary


def verify(path: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """(meta, '') for a valid cache folder, else (None, why it is not usable)."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None, "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"meta.json is unreadable ({e})"
    if not isinstance(meta, dict) or meta.get("pack_version") != PACK_VERSION:
        return None, "meta.json has another pack version"
    if meta.get("key") != key:
        return None, "meta.json belongs to another key"
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        return None, "tokenizer.json is missing"
    try:
        if file_checksum(tok_path, tok_path.stat().st_size) != meta["tokenizer_checksum"]:
            return None, "tokenizer.json checksum mismatch (corrupted)"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, m in meta["splits"].items():
            for file_key, sum_key, nbytes in (
                ("ids_file", "ids_checksum", m["tokens"] * itemsize),
                ("boundary_file", "boundary_checksum", m["tokens"]),
            ):
                f = path / m[file_key]
                if not f.is_file():
                    return None, f"{f.name} is missing"
                size = f.stat().st_size
                if size != nbytes:
                    return None, f"{f.name} has {size} bytes, expected {nbytes} (truncated?)"
                if file_checksum(f, size) != m[sum_key]:
                    return None, f"{f.name} checksum mismatch (corrupted)"
            if m["tokens"] < 2:
                return None, f"split {split} has fewer than 2 tokens"
    except (KeyError, TypeError, ValueError, OSError) as e:
        return None, f"meta.json is incomplete ({type(e).__name__}: {e})"
    return meta, ""


@contextlib.contextmanager
def _lock(lock_path: Path) -> Iterator[None]:
    """Hold the exclusive lock `lock_path` (waiting for it): builders of one cache take turns,
    so a corpus is tokenized once, on every platform (`filelock`: flock, or msvcrt on
    Windows)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire()
    except OSError as e:  # e.g. a read-only cache folder; filelock's OSError names no file
        name_file(e, lock_path)
        raise
    try:
        yield
    finally:
        lock.release()


def _discard(path: Path, why: str) -> None:
    """Move an unusable cache folder out of the way (rename first: readers never see half of it)."""
    log.warning("cache folder %s is unusable: %s; rebuilding it", path, why)
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


BuildFn = Callable[[Path], dict[str, Any]]


def load_or_build(root: Path, name: str, key: str, material: dict[str, Any],
                  build: BuildFn) -> tuple[PackedCorpus, bool]:
    """(the verified cache folder `root/name-key`, whether it was built now).

    `build(tmp_folder)` writes the split files and tokenizer.json into `tmp_folder` and returns
    the metadata (splits, dtype, stats); this function adds the key, writes meta.json last,
    fsyncs and renames the folder into place.
    """
    final = root / f"{name}-{key}"
    meta, why = verify(final, key) if final.exists() else (None, "")
    if meta is not None:
        return PackedCorpus(final, meta), False
    with _lock(root / f".{name}-{key}.lock"):
        if final.exists():  # another process may have finished while we waited for the lock
            meta, why = verify(final, key)
            if meta is not None:
                return PackedCorpus(final, meta), False
            _discard(final, why)
        for stale in root.glob(f".tmp-{name}-{key}-*"):
            # We hold the lock, so no live builder owns these: leftovers of a killed run.
            log.warning("removing %s, a partial cache folder left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = make_temp_dir(root, f".tmp-{name}-{key}-")
        try:
            meta = build(tmp)
            meta.update({"pack_version": PACK_VERSION, "key": key, "key_material": material,
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            with open(tmp / "meta.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(root)
        except BaseException as e:  # Ctrl-C included: no partial folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            name_file(e, final)  # writes to open files raise OSErrors that name none
            raise
    meta, why = verify(final, key)
    if meta is None:  # pragma: no cover - only on a broken filesystem
        raise DataError(f"cache folder {final} failed verification right after writing: {why}")
    return PackedCorpus(final, meta), True


# -- statistics ---------------------------------------------------------------------------------


def segment_lengths(boundary: np.ndarray) -> np.ndarray:
    """int64 [S]: tokens per segment of a flat stream whose last token is a boundary."""
    ends = np.flatnonzero(np.asarray(boundary, dtype=bool))
    if len(ends) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.diff(ends, prepend=-1).astype(np.int64)


def segment_stats(boundary: np.ndarray, prefix: str = "") -> dict[str, float | int]:
    """Segment count and tokens-per-segment mean/p50/p90/p99/max (percentiles are observed
    lengths, not interpolated)."""
    lengths = segment_lengths(boundary)
    out: dict[str, float | int] = {f"{prefix}segments": int(len(lengths))}
    if len(lengths) == 0:
        return out
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="inverted_cdf")
    out.update({
        f"{prefix}tokens_per_segment_mean": round(float(lengths.mean()), 3),
        f"{prefix}tokens_per_segment_p50": int(p50),
        f"{prefix}tokens_per_segment_p90": int(p90),
        f"{prefix}tokens_per_segment_p99": int(p99),
        f"{prefix}tokens_per_segment_max": int(lengths.max()),
    })
    return out


def segments_per_block(boundary: np.ndarray, block_size: int) -> np.ndarray:
    """int64 [n_blocks]: segments the model sees in each training block of `block_size` inputs.

    Block i has inputs [i*T, (i+1)*T) (targets shifted by one, so n_blocks = (N-1) // T). Positions
    restart at every block, so the first input starts a segment and every boundary among the
    first T-1 inputs starts another: count = 1 + boundaries in inputs[0:T-1] = max inter + 1.
    """
    t = block_size
    n_blocks = (len(boundary) - 1) // t
    if n_blocks <= 0:
        return np.zeros(0, dtype=np.int64)
    out = np.empty(n_blocks, dtype=np.int64)
    rows = max(1, (16 << 20) // t)  # bound temporary memory on big corpora
    for a in range(0, n_blocks, rows):
        b = min(n_blocks, a + rows)
        view = np.asarray(boundary[a * t : b * t]).reshape(b - a, t)
        out[a:b] = view[:, : t - 1].sum(axis=1, dtype=np.int64) + 1
    return out
