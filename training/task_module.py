"""`TaskModel`: training on a synthetic task, scored per test length by loss and task metrics.

A synthetic task (`tasks.generated`, `task=arithmetic | bi_nfa`) has one evaluation set per
setting (`ops_4, ops_5, ...` or `seg_8, seg_16, ...`), served as a list of validation loaders.
`TaskModel` is the `LanguageModel` (same loss, optimizer, schedule and checkpoints) with a
validation that keeps the settings apart: per setting it adds the summed loss and the task's
sums and counts over batches (`tasks.scoring.RATES`), and logs `val/<setting>/loss` and
`val/<setting>/<rate>`. `val/loss` is the first (in-distribution) setting's loss, so checkpoint
selection never looks at the extrapolation sets. `evaluate_task` scores the test sets the same way
at the end of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tasks import get_task
from tasks.scoring import add_sums, rates
from training.config import RunSettings
from training.module import LanguageModel, Report, next_token_loss

Scorer = Callable[[nn.Module, dict[str, Tensor]], dict[str, float]]


class TaskScores:
    """Per-setting sums over batches: the summed loss, scored tokens, and the task's counts."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.sums: list[dict[str, float]] = [{} for _ in self.names]

    def reset(self) -> None:
        self.sums = [{} for _ in self.names]

    def add(self, index: int, loss_sum: float, tokens: int, scores: Mapping[str, float]) -> None:
        """Add one batch of setting `index`."""
        add_sums(self.sums[index], {"loss_sum": loss_sum, "loss_tokens": tokens, **scores})

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Replace every sum by `reduce_sum` of it (an all-reduce across processes)."""
        keys = sorted({k for s in self.sums for k in s})
        if not keys:
            return
        table = torch.tensor([[s.get(k, 0.0) for k in keys] for s in self.sums],
                             dtype=torch.float64)
        table = reduce_sum(table).cpu()
        self.sums = [dict(zip(keys, row.tolist(), strict=True)) for row in table]

    def summary(self) -> dict[str, dict[str, float]]:
        """`{setting: {"loss": mean per scored token, <rate>: ..., <sums>: ...}}`; settings with
        no batches are left out."""
        out = {}
        for name, sums in zip(self.names, self.sums, strict=True):
            if not sums:
                continue
            tokens = sums.get("loss_tokens", 0.0)
            loss = sums["loss_sum"] / tokens if tokens else float("nan")
            out[name] = {"loss": loss, **rates(sums), **sums}
        return out


def score_batch(model: nn.Module, batch: dict[str, Tensor], score: Scorer
                ) -> tuple[float, int, dict[str, float]]:
    """(summed loss, scored tokens, task scores) of one evaluation batch; `model` in eval mode."""
    logits = model(batch["input_ids"], batch.get("boundary"))
    total, count = next_token_loss(logits, batch["targets"], batch.get("loss_mask"))
    return float(total), int(count), score(model, batch)


class TaskModel(LanguageModel):
    """`LanguageModel` whose validation is a list of loaders, one per setting in `val_names`.

    `score(model, batch)` returns the task's sums and counts for one batch (the datamodule's
    `score`); `main_metric` is the rate shown in the progress bar (`val/<main_metric>`, of the
    first setting).
    """

    def __init__(self, *args: Any, val_names: Sequence[str], score: Scorer, main_metric: str,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_names = list(val_names)
        self.score = score
        self.main_metric = main_metric
        self.scores = TaskScores(self.val_names)

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any], **kwargs: Any) -> TaskModel:
        """A TaskModel from a checkpoint's `"bipe"` entry; its task (from the run config) gives
        the settings, the scorer and the headline metric unless `kwargs` do."""
        task_cfg = (meta.get("run_config") or {}).get("task") or {}
        task = get_task(task_cfg.get("name"))(task_cfg)
        if "val_names" not in kwargs and hasattr(task, "eval_settings"):
            kwargs["val_names"] = [s.name for s in task.eval_settings()]
        if "score" not in kwargs and hasattr(task, "score"):
            kwargs["score"] = task.score
        kwargs.setdefault("main_metric", task.main_metric)
        return super().from_checkpoint_meta(meta, **kwargs)

    def on_validation_epoch_start(self) -> None:
        self.scores.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        loss_sum, tokens, scores = score_batch(self.model, batch, self.score)
        self.scores.add(dataloader_idx, loss_sum, tokens, scores)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            self.scores.reduce(lambda t: self.trainer.strategy.reduce(
                t.to(self.device), reduce_op="sum"))
        summary = self.scores.summary()
        for name, values in summary.items():
            self.log(f"val/{name}/loss", values["loss"])
            for rate in rates(values):
                self.log(f"val/{name}/{rate}", values[rate])
        first = summary.get(self.val_names[0])
        if first is not None:  # Lightning's sanity check may stop before the first setting ends
            self.log("val/loss", first["loss"], prog_bar=True)
            self.log(f"val/{self.main_metric}", first[self.main_metric], prog_bar=True)

    def final_report(self, dm: Any, settings: RunSettings, run: dict[str, Any],
                     device: torch.device) -> Report:
        """The task's metrics on its test sets, one row per setting, with the final weights."""
        rows = evaluate_task(self.model, dm.test_dataloader(), dm.val_names, dm.score, device)
        step = self.trainer.global_step
        payload = {"task": dm.task_name, "main_metric": self.main_metric, "pe": run["pe"]["name"],
                   "model": self.model_config.to_dict(),
                   "n_parameters": self.model.num_parameters(), "seed": run["seed"],
                   "global_step": step, "task_config": dict(dm.cfg),
                   "split": getattr(dm, "test_split", "test"), "results": rows}
        metrics = {f"test/{r['setting']}/{k}": r[k] for r in rows
                   for k in ("loss", "accuracy", "exact", "token_accuracy", "sequence_accuracy",
                             "score") if k in r}
        table = format_task_table(rows, f"test {dm.task_name}: pe={run['pe']['name']}, hidden "
                                        f"{self.model_config.hidden_size}, step {step}")
        return Report(metrics, table, "task_eval.json", payload)


@torch.no_grad()
def evaluate_task(model: nn.Module, loaders: Sequence[Any], names: Sequence[str], score: Scorer,
                  device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Score `model` on each loader (one per setting); one row per setting, in order."""
    scores = TaskScores(names)
    was_training = model.training
    model.eval()
    try:
        for index, loader in enumerate(loaders):
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                scores.add(index, *score_batch(model, batch, score))
    finally:
        model.train(was_training)
    summary = scores.summary()
    return [{"setting": name, **summary[name]} for name in names if name in summary]


def format_task_table(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """Setting, examples, loss and the rates, one line per setting."""
    names = [r for r in ("accuracy", "exact", "token_accuracy", "sequence_accuracy", "score")
             if rows and r in rows[0]]
    count_key = "count" if "count" in (rows[0] if rows else {}) else "sequences"
    lines = [title, f"{'setting':>10} {'examples':>9} {'loss':>8} "
                    + " ".join(f"{n:>17}" for n in names)]
    for r in rows:
        cells = " ".join(f"{'n/a' if math.isnan(r[n]) else f'{100 * r[n]:.1f}%':>17}"
                         for n in names)
        lines.append(f"{r['setting']:>10} {int(r.get(count_key, 0)):>9} {r['loss']:>8.4f} {cells}")
    return "\n".join(lines)
