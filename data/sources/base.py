"""What every source shares: documents, the corpus, the source interface, reading files with
the bad-file rules, and the hash split (see `data.sources` for the rules)."""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bipe.errors import DataError

from ..config import SPLITS, DataConfig

log = logging.getLogger(__name__)

BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One document: a stable name (for splitting and messages) and its text."""

    name: str
    text: str


@dataclass
class Corpus:
    """Documents per split plus counters of what was skipped or repaired on the way."""

    splits: dict[str, list[Document]]
    stats: dict[str, int] = field(default_factory=dict)


class Source(ABC):
    """A corpus: cheap `fingerprint()` for the cache key, `load()` for the documents."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the raw data and split rule; must not read file contents."""

    @abstractmethod
    def load(self) -> Corpus:
        """Read all documents and assign them to splits."""


class FileReader:
    """Reads text files with the binary / invalid-UTF-8 rules of the module docstring."""

    def __init__(self) -> None:
        self.stats = {
            "invalid_utf8_replacements": 0,
            "skipped_binary_files": 0,
            "skipped_empty_documents": 0,
            "skipped_jsonl_lines": 0,
        }

    def read(self, path: Path, label: str) -> str | None:
        """Text of `path`, or None for a binary file (warned and counted)."""
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from e
        if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
            log.warning("skipping binary file %s (NUL byte in the first 8 KiB)", path)
            self.stats["skipped_binary_files"] += 1
            return None
        text = raw.decode("utf-8", errors="replace")
        # Replacement characters that were already in the file as valid UTF-8 don't count.
        replaced = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        if replaced:
            log.warning(
                "%s: %d invalid UTF-8 byte sequence(s) replaced by U+FFFD", label, replaced
            )
            self.stats["invalid_utf8_replacements"] += replaced
        if text.startswith("\ufeff"):
            text = text[1:]
        return text.replace("\r\n", "\n")

    def keep(self, text: str) -> bool:
        """False (and counted) for an empty or whitespace-only document."""
        if text.strip():
            return True
        self.stats["skipped_empty_documents"] += 1
        return False


def stat_fingerprint(paths: Iterable[Path], root: Path | None) -> str:
    """Hash of (relative path, size, mtime_ns) of each file: changes when any file changes."""
    h = hashlib.blake2b(digest_size=16)
    n = 0
    for p in paths:
        st = p.stat()
        rel = os.path.relpath(p, root) if root is not None else str(p)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        n += 1
    return f"{n}:{h.hexdigest()}"


def unit_hash(name: str) -> float:
    """Deterministic uniform number in [0, 1) from a document name (for hash splits)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def hash_split(docs: list[Document], validation_fraction: float, test_fraction: float,
               what: str) -> dict[str, list[Document]]:
    """Split by `unit_hash(doc.name)`; empty validation/test splits borrow the lowest-hash docs."""
    keyed = sorted(((unit_hash(d.name), d) for d in docs), key=lambda x: (x[0], x[1].name))
    splits: dict[str, list[tuple[float, Document]]] = {s: [] for s in SPLITS}
    for u, d in keyed:
        if u < validation_fraction:
            splits["validation"].append((u, d))
        elif u < validation_fraction + test_fraction:
            splits["test"].append((u, d))
        else:
            splits["train"].append((u, d))
    for split in ("validation", "test"):
        if not splits[split]:
            if len(splits["train"]) < 2:
                raise DataError(
                    f"{what} gives {len(docs)} document(s); a train/validation/test split needs "
                    "at least 3 (add files, or give data.train_glob and data.validation_glob)"
                )
            splits[split].append(splits["train"].pop(0))  # train is sorted by u
    return {s: [d for _, d in v] for s, v in splits.items()}
