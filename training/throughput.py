"""`TokenThroughput`: training tokens per second, logged as `train/tokens_per_sec`."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L


class TokenThroughput(L.Callback):
    """Tokens per second over the last `window` training batches (data loading included,
    validation excluded), plus run totals in `total_tokens` and `train_seconds`.

    A token is one input position (`input_ids.numel()`), whether or not it is scored; with
    several processes, each process's batch counts `world_size` times (they are equal shares).
    """

    def __init__(self, window: int = 20):
        self.window = window
        self._batches: deque[tuple[float, int]] = deque(maxlen=window)  # (end time, tokens)
        self._last_end: float | None = None
        self.total_tokens = 0
        self.train_seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._last_end is None:  # first batch, or first after validation
            self._last_end = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        tokens = int(batch["input_ids"].numel()) * trainer.world_size  # every process's share
        now = time.perf_counter()
        assert self._last_end is not None
        self.train_seconds += now - self._last_end
        self.total_tokens += tokens
        self._batches.append((now - self._last_end, tokens))
        self._last_end = now
        seconds = sum(s for s, _ in self._batches)
        if seconds > 0:
            rate = sum(n for _, n in self._batches) / seconds
            pl_module.log("train/tokens_per_sec", rate, on_step=True)
            pl_module.log("tok/s", rate, on_step=True, prog_bar=True, logger=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the gap spent validating is not training time

    @property
    def tokens_per_sec(self) -> float:
        """Mean training throughput over the whole run so far."""
        return self.total_tokens / self.train_seconds if self.train_seconds else 0.0
