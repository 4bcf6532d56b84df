"""Stopping a run so that it resumes exactly: Ctrl-C and SIGTERM finish the current step and
write `checkpoints/interrupted.ckpt`; an error saves the last completed step as well.

A resumed run must log the same metrics at the same steps and write the same checkpoints as an
uninterrupted one, not only end with the same weights. Lightning's loops restart from counters
(batches ready / started / processed / completed, optimizer steps, the logging step) that are
only consistent at the points where Lightning itself saves; a checkpoint written from the middle
of a step holds a batch counted as ready but not completed, and the resumed run then validates,
checkpoints and logs one step early. So:

* The first SIGINT or SIGTERM only asks to stop. The run finishes the step (and its validation,
  when one is due), then saves at the start of the next step, where every counter is settled,
  and leaves with `TrainingStopped` (`train.py` exits with 128 + the signal number: 130, 143).
  A second Ctrl-C stops at once. In multi-process training the processes agree at every step
  boundary, so they all stop at the same one.
* Whatever stops the run (an error, a second Ctrl-C), the checkpoint describes the last
  completed optimizer step: `normalize_loops` rewrites the loop counters to that step, as the
  step's own end would have left them. The training data then replays from that step (the
  loader is a function of the step; `LanguageModel.on_load_checkpoint`), and a validation due at
  that step that had not finished runs again in full.

Like Lightning's `OnExceptionCheckpoint` it writes on failure, but its presence does not make a
fresh `fit` look for a checkpoint to resume from: only `ckpt_path=` resumes.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L

from bipe.errors import environment_cause

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on a signal; the checkpoint to resume from has been written."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"; resume with ckpt_path={path}" if path else ""
        super().__init__(f"stopped by {name} at step {step}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by the signal


def _set_progress(tracker: dict[str, int], n: int) -> None:
    for key in ("ready", "started", "processed", "completed"):
        if key in tracker:
            tracker[key] = n


def _settle(tree: Any) -> None:
    """Every progress tracker under `tree` back to its completed count (optimizer and scheduler
    progress: a call that was cut short did not happen)."""
    if isinstance(tree, dict):
        if "completed" in tree and "ready" in tree:
            _set_progress(tree, tree["completed"])
        for value in tree.values():
            _settle(value)


def normalize_loops(loops: dict[str, Any], *, step: int, batches: int, validated: bool,
                    validation_due: bool) -> None:
    """Rewrite a checkpoint's `loops` entry (in place) to the end of optimizer step `step`,
    `batches` training batches in.

    `validated`: the validation due at `step` has run to its end (nothing to redo).
    `validation_due`: a validation falls on `step` but did not finish; it runs again in full
    after the resume. (Lightning skips the validation of the step it resumes at, assuming it
    ran, and counts that step's logging step on the way; the counters below are what it expects
    in each case.)
    """
    fit = loops["fit_loop"]
    _settle(fit)
    progress = fit["epoch_loop.batch_progress"]
    # `current` counts within the epoch; shift it by as much as `total` moves.
    shift = progress["total"]["completed"] - batches
    _set_progress(progress["current"], max(0, progress["current"]["completed"] - shift))
    _set_progress(progress["total"], batches)
    # The logging step: Lightning adds one when it skips the validation at the resume step.
    fit["epoch_loop.state_dict"]["_batches_that_stepped"] = (
        step - 1 if validated or validation_due else step)
    if validation_due:
        # Mark the validation as started but not one batch done: the resumed run goes back and
        # runs all of it (Lightning's "restarted mid-evaluation").
        val = fit["epoch_loop.val_loop.batch_progress"]
        done = val["total"]["completed"] - val["current"]["completed"]
        _set_progress(val["current"], 0)
        _set_progress(val["total"], done)
        for tracker in (val["current"], val["total"]):
            tracker["ready"] += 1
            tracker["started"] += 1


class InterruptedCheckpoint(L.Callback):
    """Writes `dirpath/interrupted.ckpt` when training stops early; see the module docstring."""

    def __init__(self, dirpath: str, filename: str = "interrupted"):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.requested: int | None = None  # the signal that asked to stop
        self.validated_at = -1  # global step of the last validation that ran to its end
        self._saving: dict[str, Any] | None = None  # how to normalize the checkpoint being saved
        self._previous: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested is None:
            self.requested = signum
            log.warning("received %s: stopping after the current step and saving %s "
                        "(Ctrl-C again to stop at once)", signal.Signals(signum).name, self.path)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in on_fit_start: Lightning installs its SIGTERM handler (which stops in the
        # middle of a validation) after on_fit_start, and would call it besides this one.
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:  # else Lightning restored its own
                signal.signal(signum, handler)
        self._previous.clear()

    # -- where the run is ----------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step

    def _validation_falls_on(self, trainer: L.Trainer, batches: int) -> bool:
        every = trainer.val_check_batch
        return (batches > 0 and trainer.enable_validation and isinstance(every, int)
                and batches % every == 0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        asked = self.requested is not None
        if trainer.world_size > 1:  # every process stops at the same step
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if not asked or trainer.global_step == 0:
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        if batches % trainer.accumulate_grad_batches:
            return  # mid-accumulation: stop at the optimizer step
        self.save(trainer)
        raise TrainingStopped(self.requested or signal.SIGINT, trainer.global_step, self.path)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Resuming at a step whose validation ran (or was not due): stopping again right away
        # must not ask for that validation a second time.
        val = checkpoint.get("loops", {}).get("fit_loop", {}).get(
            "epoch_loop.val_loop.batch_progress", {}).get("total", {})
        if not (val and val["started"] == val["ready"] and val["processed"] == val["started"] - 1):
            self.validated_at = int(checkpoint.get("global_step", -1))

    # -- saving --------------------------------------------------------------------------------
    def save(self, trainer: L.Trainer) -> None:
        """Write the checkpoint of the last completed optimizer step."""
        step = trainer.global_step
        batches = step * trainer.accumulate_grad_batches
        due = self._validation_falls_on(trainer, batches)
        validated = self.validated_at == step
        self._saving = {"step": step, "batches": batches, "validated": validated,
                        "validation_due": due and not validated}
        try:
            trainer.save_checkpoint(self.path)
        finally:
            self._saving = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._saving is not None and "loops" in checkpoint:
            normalize_loops(checkpoint["loops"], **self._saving)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, TrainingStopped) or trainer.global_step == 0:
            return  # saved already / nothing trained yet
        try:
            self.save(trainer)
        except Exception as exc:
            # e.g. the full disk that stopped the run, which torch.save may report as a
            # RuntimeError over the OSError: let the run's own error be the one reported
            fault = exc if isinstance(exc, OSError) else environment_cause(exc)
            if fault is None:
                raise
            log.warning("training stopped at step %d (%s); could not save %s either: %s",
                        trainer.global_step, type(exception).__name__, self.path, fault)
            return
        log.warning("training stopped at step %d (%s); saved %s, resume with ckpt_path=%s",
                    trainer.global_step, type(exception).__name__, self.path, self.path)
