"""Documents to (ids, boundary flags), in parallel: tokenizing and segmenting over a process pool.

Punkt sentence splitting is pure Python and the tokenizer's batch encoding uses a thread pool,
so the two ran one after the other in one process before; here groups of documents go to
`data.pack_workers` processes (forked, each with its own tokenizer and segmenter) and come back
in order, so the packed cache is byte for byte the serial one (a test compares the files).
The workers ignore Ctrl-C: the terminal sends it to them too, and each would print a traceback;
the main process stops (`KeyboardInterrupt`) and terminates them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .config import DataConfig
from .segment import Segmenter
from .tokenizer import DocumentEncoder

# Documents go to the workers in groups of about this many characters: a few per worker at
# least (a Shakespeare play is ~140k), so the last group does not leave the others idle.
GROUP_CHARS = 1 << 17
Encoded = tuple[np.ndarray, np.ndarray]  # (ids uint32 [n], boundary bool [n]); n = 0: empty

_WORKER: tuple[DocumentEncoder, Segmenter] | None = None


def pack_workers(cfg: DataConfig) -> int:
    """`data.pack_workers`, or for null the CPUs this process may use (at most 8)."""
    if cfg.pack_workers is not None:
        return cfg.pack_workers
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, usable or 1))


def _encode(texts: Sequence[str], encoder: DocumentEncoder, segmenter: Segmenter
            ) -> list[Encoded]:
    out = []
    for text, (ids, starts) in zip(texts, encoder.encode_many(texts), strict=True):
        flags = segmenter.boundaries(text, ids, starts) if len(ids) else np.zeros(0, bool)
        out.append((ids, np.asarray(flags, dtype=bool)))
    return out


def _init_worker(cfg: DataConfig, tokenizer_json: str) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker the pool starts again later, too
    tok = Tokenizer.from_str(tokenizer_json)
    _WORKER = (DocumentEncoder(tok), Segmenter(cfg, tok))


def _encode_in_worker(texts: Sequence[str]) -> list[Encoded]:
    assert _WORKER is not None
    return _encode(texts, *_WORKER)


def groups(texts: Sequence[str], chars: int | None = None) -> Iterator[Sequence[str]]:
    """Consecutive runs of documents of about `chars` (default `GROUP_CHARS`) characters, at
    least one document each."""
    chars = GROUP_CHARS if chars is None else chars
    i = 0
    while i < len(texts):
        j, n = i, 0
        while j < len(texts) and (j == i or n < chars):
            n += len(texts[j])
            j += 1
        yield texts[i:j]
        i = j


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process (main thread only; elsewhere no change), so that processes
    forked meanwhile start ignoring it; the previous handler back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ParallelEncoder:
    """`encode(texts)` yields `(ids, flags)` per document, in order, from `workers` processes
    (in this process when `workers` is 1). Use as a context manager."""

    def __init__(self, cfg: DataConfig, tok: Tokenizer, workers: int) -> None:
        self.workers = workers
        self.local = (DocumentEncoder(tok), Segmenter(cfg, tok))
        self.pool: Any = None
        if workers > 1:
            # fork: the workers inherit the loaded Punkt model; the tokenizer's own threads are
            # not used across the fork (each worker starts one from the JSON)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            with _sigint_ignored():  # from the fork on, before _init_worker runs
                self.pool = mp.get_context("fork").Pool(
                    workers, initializer=_init_worker, initargs=(cfg, tok.to_str()))

    def encode(self, texts: Sequence[str]) -> Iterator[Encoded]:
        if self.pool is None:
            for group in groups(texts):
                yield from _encode(group, *self.local)
            return
        for encoded in self.pool.imap(_encode_in_worker, list(groups(texts)), chunksize=1):
            yield from encoded

    def __enter__(self) -> ParallelEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] is not None else self.pool.close()
            self.pool.join()
