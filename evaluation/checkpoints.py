"""The checkpoints an evaluation reads: found (a file, a run folder, a sweep), rebuilt, grouped.

Checkpoints of one sweep cell, i.e. run folders whose overrides differ only in `seed`, form a
group, reported as mean and 95% interval; with `eval.rope_scaling` each rotary checkpoint that
has no scaling of its own is also loaded scaled (`<label>+yarn4`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bipe.errors import CheckpointError, ConfigError
from evaluation.sweeps import Cell, read_overrides, varying_keys, warn_unfinished
from models import Transformer
from models.checkpoint import resolve_checkpoint_path, with_scaling
from models.pretrained import TOKENIZER_FILE, is_saved_folder


@dataclass
class LoadedModel:
    """One checkpoint ready to evaluate. `label` is unique; `group` names its cell: checkpoints
    that share a group (the seeds of one sweep cell, or equal `labels=`) are summarised together
    as mean and 95% interval."""

    label: str
    path: Path
    model: torch.nn.Module
    tokenizer: Any
    meta: dict[str, Any]
    train_length: int
    streams: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = field(default_factory=dict)
    group: str = ""
    seed: int | None = None

    def __post_init__(self) -> None:
        self.group = self.group or self.label

    @property
    def pe_name(self) -> str:
        return self.meta["model_config"]["pe"].get("name", "custom")

    @property
    def has_relative(self) -> bool:
        return self.model.config.pe.relative.type != "none"


def find_checkpoints(cfg: DictConfig) -> list[tuple[str, Path]]:
    """`(option, path)` of `ckpt_path` (or `ckpt`), `ckpts`, and every run folder's checkpoint
    under `sweep_dir` that finished (its newest of last.ckpt and interrupted.ckpt; unfinished
    jobs are named on stderr and left out); the option names the path in an error when it
    cannot be loaded."""
    one = cfg.get("ckpt_path") or cfg.get("ckpt")
    key = "ckpt_path" if cfg.get("ckpt_path") else "ckpt"
    named = [(key, p) for p in ([one] if one else [])] + [("ckpts", p) for p in cfg.ckpts or []]
    out = [(k, Path(p) if is_saved_folder(Path(p)) else resolve_checkpoint_path(p, key=k))
           for k, p in named]
    if cfg.sweep_dir:
        sweep = Path(cfg.sweep_dir)
        if not sweep.is_dir():
            raise ConfigError(f"sweep_dir={sweep} is not a folder")
        # A job that did not finish (no metrics.json) is named and left out: its checkpoint,
        # if any, holds a half-trained model that would pass for the finished ones.
        unfinished = set(warn_unfinished(sweep, "metrics.json"))
        runs = sorted({p.parent.parent for pattern in ("last.ckpt", "interrupted.ckpt")
                       for p in sweep.glob(f"**/checkpoints/{pattern}")} - unfinished)
        if not runs:
            raise ConfigError(f"sweep_dir={sweep} holds no */checkpoints/last.ckpt; train first "
                              "or pass ckpt_path=PATH")
        out += [("sweep_dir", resolve_checkpoint_path(run, key="sweep_dir")) for run in runs]
    if not out:
        raise ConfigError("nothing to evaluate: pass ckpt_path=PATH, ckpts=[A,B] or "
                          "sweep_dir=DIR")
    return out


def _job_dir(path: Path) -> Path:
    """The run folder of `<run>/checkpoints/<name>.ckpt` (a saved folder is its own)."""
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def group_labels(paths: list[Path], metas: list[dict[str, Any]],
                 labels: list[str]) -> list[tuple[str, str]]:
    """`(label, group)` per checkpoint. The group is `labels[i]` when given, else the encoding's
    name plus the sweep settings that differ between the checkpoints (from each run folder's
    `.hydra/overrides.yaml`), the seed left out; the label adds `#s<seed>` (or the folder) to
    tell the members of a group apart."""
    cells = [Cell.of(read_overrides(_job_dir(p)), drop=["pe"]) for p in paths]
    keys = varying_keys(cells)
    groups = []
    for i, (meta, cell) in enumerate(zip(metas, cells, strict=True)):
        if i < len(labels):
            groups.append(labels[i])
            continue
        extra = cell.label(keys)
        name = meta["model_config"]["pe"].get("name", "model")
        groups.append(f"{name},{extra}" if extra else name)
    seeds = [meta.get("run_config", {}).get("seed") for meta in metas]
    out, taken = [], set()
    for i, group in enumerate(groups):
        members = [j for j, g in enumerate(groups) if g == group]
        member_seeds = [seeds[j] for j in members]
        replicates = len(members) > 1 and None not in member_seeds and \
            len(set(member_seeds)) == len(members)
        label = f"{group}#s{seeds[i]}" if replicates else group
        while label in taken:  # not seeds of one cell: each its own, told apart by folder
            label = f"{label}:{_job_dir(paths[i]).name}"
        taken.add(label)
        out.append((label, group if replicates else label))
    return out


def _scaling_label(scaling: dict[str, Any]) -> str:
    factor = scaling.get("factor")
    return f"{scaling['type']}{'' if factor is None else f'{factor:g}'}"


def require_tokenizer(path: Path, model: Transformer) -> None:
    """CheckpointError naming the checkpoint when it carries no tokenizer: every evaluation
    turns text into tokens with the checkpoint's own, and none other would give its numbers."""
    if model.tokenizer is not None:
        return
    if path.is_dir() and is_saved_folder(path):
        raise CheckpointError(f"{path} has no {TOKENIZER_FILE}, which evaluation needs to read "
                              "text: save the model again with its tokenizer "
                              "(save_pretrained(folder, tokenizer=...)), or evaluate the run "
                              "folder or .ckpt it came from")
    raise CheckpointError(f"{path} carries no tokenizer, which evaluation needs; evaluate a "
                          "checkpoint written by train.py")


def load_models(cfg: DictConfig, device: torch.device) -> list[LoadedModel]:
    """Every checkpoint, as saved; with `eval.rope_scaling`, each rotary checkpoint that carries
    no scaling of its own is also loaded scaled (label `<name>+yarn4`), so base, scaled-only and
    fine-tuned models compare in one evaluation. `original_max_position: null` is each
    checkpoint's rotary training range (tokens, or segments per block for BiPE-RoPE)."""
    scaling = OmegaConf.to_container(cfg.eval.rope_scaling, resolve=True) \
        if cfg.eval.get("rope_scaling") else None
    found = find_checkpoints(cfg)
    paths = [path for _, path in found]
    built = []
    for key, path in found:
        built.append(Transformer.from_pretrained(path, key=key))
        require_tokenizer(path, built[-1])
    names = group_labels(paths, [model.meta for model in built], list(cfg.labels or []))
    loaded = []
    for (key, path), model, (label, group) in zip(found, built, names, strict=True):
        tokenizer, meta = model.tokenizer, model.meta
        train_length = int(meta["run_config"]["data"]["block_size"])
        seed = meta.get("run_config", {}).get("seed")
        loaded.append(LoadedModel(label, path, model.to(device), tokenizer, meta, train_length,
                                  group=group, seed=seed))
        relative = meta["model_config"]["pe"]["relative"]
        if scaling is None or relative["type"] != "rope" or relative.get("scaling"):
            continue
        scaled = with_scaling(meta, scaling, key="eval.rope_scaling")

        def hook(config: dict, scaled: dict = scaled) -> dict:
            pe = config["pe"]
            return {**config, "pe": {**pe, "relative": {**pe["relative"], "scaling": scaled}}}

        model = Transformer.from_pretrained(path, model_config_hook=hook, key=key)
        tag = f"+{_scaling_label(scaled)}"
        loaded.append(LoadedModel(f"{label}{tag}", path, model.to(device), tokenizer,
                                  model.meta, train_length, group=f"{group}{tag}", seed=seed))
    return loaded
