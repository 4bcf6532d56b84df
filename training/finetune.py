"""Continue a pretrained checkpoint in a new setting: the YaRN fine-tuning stage.

    python train.py experiment=yarn_finetune init_from=CKPT pe.relative.scaling.factor=4

With `finetune.model_from_checkpoint: true` and `init_from`, the run's model shape and positional
encoding are the checkpoint's, whatever `model=` and `pe=` say: the only part of `pe` taken from
this run's config is `pe.relative.scaling` (the RoPE scaling to train with). Its
`original_max_position: null` is filled with the rotary part's training range: tokens per block
for `rope`, the largest segment count per block for `bipe_rope` (from the checkpoint's data
statistics), as docs/methods.md section 5 prescribes. `finetune.block_size_factor: k` trains on
blocks of k times the checkpoint's block size (`null` keeps `data.block_size`). The fine-tuned
checkpoint stores the scaled encoding in its model config, so `eval.py` applies it without being
told.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from bipe.errors import ConfigError
from models.checkpoint import with_scaling

log = logging.getLogger(__name__)


def apply_finetune(cfg: DictConfig, meta: Mapping[str, Any], resume: bool = False) -> None:
    """Rewrite `cfg.model`, `cfg.pe` and `cfg.data.block_size` in place from the checkpoint's
    `meta` (its `"bipe"` entry), as `cfg.finetune` asks; a no-op when it asks for nothing.

    `resume=True` (`ckpt_path`: resuming a fine-tuning run) restores that run's own settings:
    model and encoding (its scaling included) and block size exactly as the checkpoint has them.
    """
    finetune = cfg.finetune
    if resume:
        if finetune.model_from_checkpoint or finetune.block_size_factor is not None:
            model = dict(meta["model_config"])
            pe = model.pop("pe")
            with open_dict(cfg):
                OmegaConf.update(cfg, "pe", pe, merge=True)
                OmegaConf.update(cfg, "model", model, merge=True)
                cfg.data.block_size = int(meta["run_config"]["data"]["block_size"])
        return
    if finetune.model_from_checkpoint:
        model = dict(meta["model_config"])
        pe = model.pop("pe")
        scaling = OmegaConf.to_container(cfg.pe.relative, resolve=True).get("scaling")
        pe = {**pe, "relative": {**pe["relative"], "scaling": with_scaling(meta, scaling)}}
        with open_dict(cfg):  # merged into the typed nodes (every key is given)
            OmegaConf.update(cfg, "model", model, merge=True)
            OmegaConf.update(cfg, "pe", pe, merge=True)
        log.info("fine-tuning the checkpoint's model: pe=%s, hidden %s, %s layers, scaling %s",
                 pe.get("name"), model["hidden_size"], model["n_layers"],
                 pe["relative"]["scaling"])
    factor = finetune.block_size_factor
    if factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
            raise ConfigError(f"finetune.block_size_factor={factor!r} must be a number >= 1 "
                              "or null")
        original = int(meta["run_config"]["data"]["block_size"])
        block_size = round(factor * original)
        with open_dict(cfg):
            cfg.data.block_size = block_size
        log.info("fine-tuning on %s-token blocks (%s x the checkpoint's %s)", block_size, factor,
                 original)
