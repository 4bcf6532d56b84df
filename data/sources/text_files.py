"""`data=text_files`: local `.txt` (one document per file) and `.jsonl` (one per line) files."""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bipe.errors import ConfigError, DataError

from .base import Corpus, Document, FileReader, Source, hash_split, stat_fingerprint

log = logging.getLogger(__name__)


def expand_glob(pattern: str, key: str) -> list[Path]:
    """Files matching `pattern` (recursive `**`; a directory means its .txt/.jsonl files)."""
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        matches = [
            p for ext in ("txt", "jsonl")
            for p in globlib.glob(os.path.join(expanded, "**", f"*.{ext}"), recursive=True)
        ]
        if not matches:
            raise DataError(f"{key}={pattern!r} is a directory without .txt or .jsonl files")
    elif not globlib.has_magic(expanded):
        if not os.path.exists(expanded):
            raise DataError(f"{key}={pattern!r}: no such file or directory")
        matches = [expanded]
    else:
        matches = globlib.glob(expanded, recursive=True)
        if not matches:
            raise DataError(
                f"{key}={pattern!r} matched no files; check the path (it is relative to the "
                f"working directory {os.getcwd()}) or use an absolute path"
            )
    files = sorted({Path(p).resolve() for p in matches if os.path.isfile(p)})
    if not files:
        raise DataError(f"{key}={pattern!r} matched only directories, no files")
    return files


class TextFilesSource(Source):
    """Local `.txt` (one document per file) and `.jsonl` (one per line) files."""

    def _globs(self) -> dict[str, str]:
        cfg = self.cfg
        if cfg.train_glob or cfg.validation_glob or cfg.test_glob:
            if not cfg.train_glob:
                raise ConfigError("data.validation_glob/test_glob given without data.train_glob")
            if not cfg.validation_glob:
                raise ConfigError(
                    "data.train_glob needs data.validation_glob too (or use one data.glob "
                    "with a hash split)"
                )
            return {"train": cfg.train_glob, "validation": cfg.validation_glob,
                    "test": cfg.test_glob or cfg.validation_glob}
        if not cfg.glob:
            raise ConfigError(
                "data=text_files needs data.glob='/path/to/*.txt' (or data.train_glob and "
                "data.validation_glob)"
            )
        return {"all": cfg.glob}

    def _matched(self) -> dict[str, list[Path]]:
        key_of = {"all": "data.glob", "train": "data.train_glob",
                  "validation": "data.validation_glob", "test": "data.test_glob"}
        globs = self._globs()
        if "test" in globs and self.cfg.test_glob is None:
            key_of["test"] = "data.validation_glob"
        return {s: expand_glob(g, key_of[s]) for s, g in globs.items()}

    def fingerprint(self) -> dict[str, Any]:
        matched = self._matched()
        return {
            "source": "text_files",
            "files": {s: stat_fingerprint(files, None) for s, files in matched.items()},
            "text_key": self.cfg.text_key,
            "validation_fraction": self.cfg.validation_fraction,
            "test_fraction": self.cfg.test_fraction,
        }

    def _documents(self, files: list[Path], reader: FileReader) -> list[Document]:
        docs: list[Document] = []
        for path in files:
            text = reader.read(path, str(path))
            if text is None:
                continue
            if path.suffix.lower() == ".jsonl":
                docs.extend(self._jsonl(path, text, reader))
            elif reader.keep(text):
                docs.append(Document(str(path), text))
        return docs

    def _jsonl(self, path: Path, text: str, reader: FileReader) -> Iterator[Document]:
        key = self.cfg.text_key
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("%s:%d: not valid JSON (%s); line skipped", path, lineno, e.msg)
                reader.stats["skipped_jsonl_lines"] += 1
                continue
            if not isinstance(record, dict) or key not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else "none"
                raise DataError(
                    f"{path}:{lineno}: no field data.text_key={key!r} (fields: {keys}); set "
                    "data.text_key to the field that holds the text"
                )
            value = record[key]
            if not isinstance(value, str):
                log.warning("%s:%d: field %r is not a string; line skipped", path, lineno, key)
                reader.stats["skipped_jsonl_lines"] += 1
                continue
            if reader.keep(value):
                yield Document(f"{path}:{lineno}", value)

    def load(self) -> Corpus:
        reader = FileReader()
        matched = self._matched()
        if "all" in matched:
            docs = self._documents(matched["all"], reader)
            if not docs:
                raise DataError(
                    f"data.glob={self.cfg.glob!r} matched {len(matched['all'])} file(s) but no "
                    "text (all empty or binary); point it at .txt or .jsonl files"
                )
            splits = hash_split(docs, self.cfg.validation_fraction, self.cfg.test_fraction,
                                f"data.glob={self.cfg.glob!r}")
        else:
            splits = {}
            for split, files in matched.items():
                splits[split] = self._documents(files, reader)
                if not splits[split]:
                    key = "data.validation_glob" if split == "validation" else f"data.{split}_glob"
                    raise DataError(f"{key} matched no text (all files empty or binary)")
        return Corpus(splits, reader.stats)
