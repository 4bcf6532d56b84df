"""Run a function in a fresh process forked from a warm server, and read its peak memory.

CPU torch keeps no allocator statistics, and a process's peak resident set size
(`getrusage(RUSAGE_SELF).ru_maxrss`) only ever grows, so every measurement that reports peak
memory runs in its own process. Starting a Python interpreter and importing torch costs seconds,
so the processes are forked from a `multiprocessing` forkserver that has imported torch and the
project once (the server itself never runs a torch kernel, so forking it is safe). A child's
figure is `ru_maxrss` at the end minus its resident set size just before the measured call (after
the model and inputs exist and a small warm-up call has run): exact page-level peak, no sampling.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import resource
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PRELOAD = ["torch", "bipe", "models", "bench.long_context"]


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Isolated:
    """`with Isolated() as iso: iso.call(fn, *args)` runs `fn` in a fresh child process each
    time and returns its result, or raises `ChildFailed` when the child dies (e.g. killed for
    memory)."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._pool: cf.ProcessPoolExecutor | None = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=self._ctx,
                                                max_tasks_per_child=1)
        return self._pool

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return self._executor().submit(fn, *args).result()
        except BrokenProcessPool as e:
            self.close()
            raise ChildFailed("the child process died (killed for memory?)") from e

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChildFailed(RuntimeError):
    """A measurement's process died without a result."""
