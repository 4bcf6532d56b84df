"""`LanguageModel`: next-token training of a `models.Transformer` with AdamW and warmup + decay."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from bipe.config import build
from evaluation.perplexity import describe_row, format_ppl_table, perplexity_rows
from models import ModelConfig, Transformer
from models.checkpoint import CHECKPOINT_KEY, FORMAT_VERSION, load_checkpoint, to_plain
from training.config import OptimConfig, RunSettings
from training.schedule import lr_multiplier

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class Report:
    """What a run measured at its end: metrics (logged, returned), the printed table, the file
    it is written to and what goes in that file."""

    metrics: dict[str, Any]
    table: str
    file: str
    payload: dict[str, Any]


def next_token_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and the number of scored tokens.

    `logits` float `[B, T, V]`; `targets` long `[B, T]` with -100 = not scored; `loss_mask` bool
    `[B, T]` or None (False = not scored, e.g. the prompt of a task). Returning the sum lets
    callers weight by tokens across batches instead of averaging per-batch means.
    """
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask.bool(), -100)
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                            reduction="sum")
    return total, (targets != -100).sum()


def batch_seed(seed: int, batch_number: int) -> int:
    """A well-mixed 63-bit seed for global training batch `batch_number` of run `seed`."""
    return int(np.random.SeedSequence([seed, batch_number]).generate_state(2, np.uint64)[0] >> 1)


class LanguageModel(L.LightningModule):
    """Trains `Transformer(model_config)` on batches of `input_ids`, `targets`, `boundary`.

    `metadata` (tokenizer JSON, data statistics, resolved run config) is written into every
    checkpoint beside the model config, so a checkpoint is enough to rebuild model and tokenizer.
    """

    def __init__(self, model_config: ModelConfig, optim: OptimConfig, max_steps: int,
                 seed: int = 0, metadata: dict[str, Any] | None = None):
        super().__init__()
        self.model_config = model_config
        self.model = Transformer(model_config)
        self.optim = optim
        self.max_steps = max_steps
        self.seed = seed
        self.metadata = to_plain(metadata or {}, "metadata")
        self.val_loss = MeanMetric()
        self._micro_step: tuple[int, int] | None = None  # (global_step, micro-batch within it)
        self.last_saved_step: int | None = None

    def forward(self, input_ids: Tensor, boundary: Tensor | None = None) -> Tensor:
        """`input_ids` long `[B, T]`, `boundary` bool `[B, T]` or None -> logits `[B, T, V]`."""
        return self.model(input_ids, boundary)

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(batch["input_ids"], batch.get("boundary"))
        return next_token_loss(logits, batch["targets"], batch.get("loss_mask"))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws from the global RNG. Reseeding it from (seed, global batch number) makes
        # the masks of batch k a function of k alone, like the data (batch k = f(seed, k)), so a
        # resumed run is bitwise identical to an uninterrupted one, whatever validation, sanity
        # checks or dataloader start-up consumed from the RNG in between.
        step = self.trainer.global_step
        micro = 0
        if self._micro_step is not None and self._micro_step[0] == step:
            micro = self._micro_step[1] + 1
        self._micro_step = (step, micro)
        batch_number = step * self.trainer.accumulate_grad_batches + micro
        torch.manual_seed(batch_seed(self.seed, batch_number))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        total, count = self._loss(batch)
        loss = total / count.clamp(min=1)
        # Several processes: log the mean over their shares, i.e. the global batch's loss.
        self.log("train/loss", loss, on_step=True, prog_bar=True,
                 sync_dist=self.trainer.world_size > 1)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        total, count = self._loss(batch)
        if count > 0:  # token-weighted: every scored token counts once, whatever its batch
            self.val_loss.update(total / count, weight=count)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp())

    def configure_optimizers(self) -> dict[str, Any]:
        # Decay matrices and embeddings (dim >= 2), not norms, biases or scalars (as nanoGPT).
        # The positional tables (BiPE's intra table) may get their own decay.
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        pe_decay = self.optim.pe_weight_decay
        is_pe = {id(p) for n, p in named if pe_decay is not None and n.startswith("pe.")}
        groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in is_pe],
                   "weight_decay": self.optim.weight_decay},
                  {"params": [p for p in params if p.dim() < 2 and id(p) not in is_pe],
                   "weight_decay": 0.0}]
        if is_pe:
            groups.append({"params": [p for p in params if id(p) in is_pe],
                           "weight_decay": pe_decay})
        # The fused kernel is ~5x faster than the default per-tensor loop on CPU (and fastest on
        # CUDA); other devices keep PyTorch's default implementation.
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas),
                                      eps=self.optim.eps, fused=fused)
        schedule = functools.partial(
            lr_multiplier, max_steps=self.max_steps, warmup_steps=self.optim.warmup_steps,
            schedule=self.optim.schedule, min_lr_ratio=self.optim.min_lr_ratio,
            power=self.optim.power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": FORMAT_VERSION,
            "model_config": to_plain(self.model_config.to_dict(), "model_config"),
            "global_step": self.trainer.global_step,
            **self.metadata,
        }
        self.last_saved_step = self.trainer.global_step

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any], **kwargs: Any) -> LanguageModel:
        """A module like the one that wrote a checkpoint, from its `"bipe"` entry alone."""
        run = meta.get("run_config") or {}
        optim = build(OptimConfig, run.get("optim") or {}, "optim")
        max_steps = int((run.get("trainer") or {}).get("max_steps") or 1)
        metadata = {k: meta[k] for k in ("tokenizer", "data_stats", "run_config") if k in meta}
        return cls(ModelConfig.from_dict(meta["model_config"]), optim, max_steps=max_steps,
                   seed=int(run.get("seed", 0)), metadata=metadata, **kwargs)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Any, map_location: Any = None,
                             hparams_file: Any = None, strict: bool | None = None,
                             **kwargs: Any) -> LanguageModel:
        """The module of one of this project's checkpoints (a `.ckpt` or a run folder), from the
        checkpoint alone: model, encoding, optimizer settings and metadata come from it; the
        module is in eval mode. `kwargs` go to the constructor."""
        ckpt = load_checkpoint(checkpoint_path, key="checkpoint_path",
                               map_location=map_location or "cpu")
        module = cls.from_checkpoint_meta(ckpt[CHECKPOINT_KEY], **kwargs)
        module.load_state_dict(ckpt["state_dict"], strict=True if strict is None else strict)
        return module.eval()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resume the data where the checkpoint left it. The training loader is infinite and
        # deterministic (batch k = f(seed, k)); Lightning builds it after this hook, so setting
        # the start here makes its first batch the one the interrupted run would have drawn next.
        if self._trainer is None:  # loaded outside a Trainer (load_from_checkpoint)
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "start_batch"):
            dm.start_batch = checkpoint["global_step"] * self.trainer.accumulate_grad_batches

    @torch.no_grad()
    def final_report(self, dm: Any, settings: RunSettings, run: dict[str, Any],
                     device: torch.device) -> Report:
        """Perplexity at `eval.lengths` x the training length on `eval.split` (blocks protocol:
        every token scored once), with the final weights: does the encoding extrapolate?"""
        ev = settings.eval
        block = settings.block_size
        ids, boundary = dm.split_arrays(ev.split)
        lengths = [m * block for m in ev.lengths]
        name = run["pe"]["name"]
        # A line per length as it finishes: the longest can take as long as a stretch of
        # training, and a run followed in its log file would otherwise fall silent here.
        log.info("length check: %s perplexity at %s tokens", ev.split,
                 ", ".join(map(str, lengths)))
        rows, _ = perplexity_rows(
            self.model, ids, boundary, lengths, train_length=block,
            base={"model": name, "group": name, "seed": run["seed"], "pe": name,
                  "dataset": run["data"]["name"], "split": ev.split, "lm_infinite": False},
            batch_size=ev.batch_size, max_blocks=ev.max_blocks,
            batch_tokens=run["data"]["batch_size"] * block,
            device=device, autocast_dtype=AUTOCAST_DTYPES.get(str(run["trainer"]["precision"])),
            on_row=lambda row: log.info("length check: %s", describe_row(row)))
        step = self.trainer.global_step
        table = format_ppl_table(rows)
        title = (f"{ev.split} perplexity vs length: pe={name}, trained on {block}-token "
                 f"blocks, step {step}")
        payload = {"pe": name, "block_size": block, "seed": run["seed"], "split": ev.split,
                   "global_step": step, "results": rows}
        metrics = {f"eval/ppl_{m}x": r["ppl"] for m, r in zip(ev.lengths, rows, strict=True)}
        return Report(metrics, f"{title}\n{table}", "length_eval.json", payload)
