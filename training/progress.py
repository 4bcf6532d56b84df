"""How a run shows its progress: `StepProgressBar`, Lightning's rich bar labelled for step-based
training, for a terminal; `ProgressLog`, plain log lines, for a run whose stdout is a file."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from torch import Tensor

from training.throughput import TokenThroughput

log = logging.getLogger(__name__)


class StepProgressBar(RichProgressBar):
    """`RichProgressBar` whose training bar reads "Training" instead of "Epoch 0/-2", without the
    logger's version number (`v_num`) among the metrics.

    Runs are measured in optimizer steps over an infinite loader, so the epoch count (and
    Lightning's `max_epochs - 1` with `max_epochs=-1`) means nothing here.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Training':{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule
                    ) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def clock(seconds: float) -> str:
    """`seconds` as H:MM:SS, the way the lines read at a glance."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta_seconds(step: int, max_steps: int, start_step: int, elapsed: float) -> float | None:
    """Seconds left at this process's pace (`start_step`: where it started, so a resumed run is
    not credited with the steps of the run it resumes); None before its first step."""
    done = step - start_step
    if done <= 0:
        return None
    return elapsed / done * max(max_steps - step, 0)


def log_to_files(logger: logging.Logger, message: str) -> None:
    """`message` at INFO into the root logger's file handlers only (Hydra's `train.log`), for
    lines the console already shows in another form."""
    if not logger.isEnabledFor(logging.INFO):
        return
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


class ProgressLog(L.Callback):
    """One log line every `every_n_steps` optimizer steps (and at the last step) and one after
    every validation, so a run whose stdout is a file (Slurm, nohup, `> file`), where the rich
    bar draws nothing, can still be followed there and in the run's `train.log`.

    A step line: step/max_steps, the mean training loss of the steps since the previous step line
    (the first process's share when several train), tokens per second over the run so far (with
    `TokenThroughput` on), elapsed time and the ETA; a validation line: step, `val/loss`,
    elapsed and ETA. Elapsed and ETA count this process only (a resumed run starts its clock
    again). Nothing is logged as a metric, so loggers see the same values with or without it.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) \
                or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive number of "
                             "optimizer steps")
        self.every_n_steps = every_n_steps
        self.console = True
        self._start_time = 0.0
        self._start_step = 0
        self._last_step = 0
        # Kept as tensors until a line is written: reading one every batch would make the GPU
        # wait for the CPU.
        self._loss_sum: Tensor | float = 0.0  # per-step losses since the previous step line
        self._loss_steps = 0
        self._step_loss: Tensor | float = 0.0  # the micro-batches of the step in progress

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time = time.monotonic()
        self._start_step = self._last_step = trainer.global_step
        self._loss_sum, self._loss_steps, self._step_loss = 0.0, 0, 0.0
        # In a terminal the bar already shows these numbers and lines printed under it would
        # scroll it: there the lines go to train.log only (the least noise). Without a bar, or
        # with stdout a file, they go to the console and train.log.
        bar = trainer.progress_bar_callback
        self.console = not (sys.stdout.isatty() and bar is not None and bar.is_enabled)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # Lightning divides each micro-batch's loss by their number
            self._step_loss = self._step_loss + loss.detach()
        step = trainer.global_step
        if step == self._last_step:  # mid-accumulation: the optimizer has not stepped yet
            return
        self._last_step = step
        self._loss_sum += self._step_loss
        self._loss_steps += 1
        self._step_loss = 0.0
        if step % self.every_n_steps and step < trainer.max_steps:
            return
        fields = []
        if self._loss_steps:
            fields.append(f"train/loss {float(self._loss_sum) / self._loss_steps:.4f}")
        throughput = next((c for c in trainer.callbacks if isinstance(c, TokenThroughput)), None)
        if throughput is not None and throughput.total_tokens:
            fields.append(f"{throughput.tokens_per_sec:,.0f} tok/s")
        self._loss_sum, self._loss_steps = 0.0, 0
        self._emit(trainer, fields)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        self._emit(trainer, ["validation"] + ([] if val is None else [f"val/loss {val:.4f}"]))

    def _emit(self, trainer: L.Trainer, fields: list[str]) -> None:
        if not trainer.is_global_zero:
            return
        step, total = trainer.global_step, trainer.max_steps
        elapsed = time.monotonic() - self._start_time
        eta = eta_seconds(step, total, self._start_step, elapsed)
        line = " | ".join([f"step {step}/{total}", *fields, f"elapsed {clock(elapsed)}",
                           f"ETA {'?' if eta is None else clock(eta)}"])
        if self.console:
            log.info(line)
        else:
            log_to_files(log, line)
