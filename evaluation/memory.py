"""Peak memory of a block of work: CUDA allocator statistics, or sampled RSS on CPU."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@dataclass
class PeakMemory:
    """Bytes above the level at entry (`peak_bytes`); set when the `with` block ends."""

    peak_bytes: int = 0

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


@contextmanager
def track_peak_memory(device: torch.device | str = "cpu", interval_s: float = 0.002):
    """`with track_peak_memory(dev) as m: ...` then `m.peak_mib`.

    On CUDA this is the allocator's exact peak. On CPU torch keeps no allocator statistics, so a
    thread samples the resident set size every `interval_s`; short spikes between samples can be
    missed, which makes the CPU figure a lower bound.
    """
    result = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        return
    if not os.path.exists("/proc/self/statm"):
        yield result  # no cheap RSS source on this platform: report 0
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result.peak_bytes = peak[0] - base
