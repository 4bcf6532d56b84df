"""`StepProgressBar`: Lightning's rich progress bar, labelled for step-based training."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


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
