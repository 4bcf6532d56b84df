"""`data=pg19` / `data=pile`: Hugging Face datasets, streamed and capped; fails at once offline."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bipe.errors import ConfigError, DataError, first_line

from ..config import SPLITS
from .base import Corpus, Document, FileReader, Source, stat_fingerprint

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "offline corpora: data=shakespeare, data=python_code; for a local copy use "
    "data=text_files data.glob='/path/to/*.jsonl' (or *.txt)"
)
_TRUTHY = {"1", "true", "yes", "on"}


def offline_reason(timeout: float = 2.0) -> str | None:
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
                split: stat_fingerprint([Path(f) for f in _as_list(files)], None)
                for split, files in sorted(cfg.hf_data_files.items())},
        }

    def _local(self) -> bool:
        """Local files through a `datasets` builder (`hf_path: json`, `hf_data_files`)."""
        return self.cfg.hf_data_files is not None

    def open_split(self, split: str) -> Any:
        """The `datasets` streaming IterableDataset of one of our splits (DataError offline)."""
        cfg = self.cfg
        if not self._local():
            reason = offline_reason()
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
                raise DataError(
                    f"data={cfg.name}: loading {self._path()} split {hf_split!r} failed: "
                    f"{first_line(e)}; {OFFLINE_HINT}"
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
