"""`data=python_code`: the running interpreter's standard library, one document per file."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from bipe.errors import DataError

from .base import Corpus, Document, FileReader, Source, hash_split, stat_fingerprint

SKIP_DIRS_PYTHON = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                              "__pycache__"})


class PythonCodeSource(Source):
    """The interpreter's standard-library `*.py` files without test suites."""

    def _root(self) -> Path:
        root = Path(self.cfg.stdlib_path or sysconfig.get_paths()["stdlib"]).expanduser()
        if not root.is_dir():
            key = "data.stdlib_path" if self.cfg.stdlib_path else "sysconfig stdlib path"
            raise DataError(f"{key}: no such directory {root}")
        return root

    def _files(self) -> list[Path]:
        root = self._root()
        out: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            # Prune in place so os.walk never descends into test suites or installed packages.
            dirnames[:] = sorted(
                d for d in dirnames if d not in SKIP_DIRS_PYTHON and not d.startswith(".")
            )
            out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
        if not out:
            raise DataError(f"no *.py files under {root} (data.stdlib_path)")
        return out

    def fingerprint(self) -> dict[str, Any]:
        root = self._root()
        return {
            "source": "python_code",
            "python": sys.version.split()[0],
            "files": stat_fingerprint(self._files(), root),
            "validation_fraction": self.cfg.validation_fraction,
            "test_fraction": self.cfg.test_fraction,
        }

    def load(self) -> Corpus:
        root = self._root()
        reader = FileReader()
        docs: list[Document] = []
        for path in self._files():
            rel = path.relative_to(root).as_posix()
            text = reader.read(path, rel)
            if text is not None and reader.keep(text):
                docs.append(Document(rel, text))
        if not docs:
            raise DataError(f"no readable *.py files under {root}")
        return Corpus(
            hash_split(docs, self.cfg.validation_fraction, self.cfg.test_fraction,
                       f"python_code ({root})"),
            reader.stats,
        )
