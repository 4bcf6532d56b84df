"""`InterruptedCheckpoint`: save where training stopped when it stops on Ctrl-C or an error."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class InterruptedCheckpoint(L.Callback):
    """Writes `dirpath/interrupted.ckpt` when `fit` raises (KeyboardInterrupt included).

    Resuming from it is exact like from any other checkpoint: the optimizer state is that of
    the last completed step, and the data and dropout of the step that was cut short are a
    function of the step number, so they are replayed identically. Unlike Lightning's
    `OnExceptionCheckpoint`, its presence does not make a fresh `fit` look for a checkpoint
    to resume from: only `ckpt_path=` resumes.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted"):
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet
        trainer.save_checkpoint(self.path)
        log.warning("training stopped at step %d (%s); saved %s, resume with ckpt_path=%s",
                    trainer.global_step, type(exception).__name__, self.path, self.path)
