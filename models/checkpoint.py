"""Self-describing checkpoints: written atomically, read with `weights_only=True`.

A Lightning checkpoint of this project carries, under the `"bipe"` key, everything needed to
rebuild the model without the run's config files: the model config (PE config included), the
tokenizer as a JSON string, the data statistics (e.g. `max_segments_per_block`, the original
length of BiPE-RoPE's rotary part for YaRN) and the resolved run config. Every entry is plain
Python (dict/list/str/int/float/bool/None), so `torch.load(path, weights_only=True)` reads it.

The trainer writes through `checkpoint_io.AtomicCheckpointIO` (-> `save_atomic`). This module
does not import Lightning, so `train.py` reports a bad checkpoint without that import's wait.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bipe.config import HF_SCALING_KEYS, normalize_scaling
from bipe.errors import CheckpointError, ConfigError, first_line, name_file
from bipe.io import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "bipe"
FORMAT_VERSION = 1
STATE_PREFIX = "model."  # the LightningModule holds the Transformer as `self.model`
# What torch.save's C++ writer raises when a write fails; writing to a path itself (not to a
# Python file), it keeps no OSError behind it to say why.
TORCH_WRITE_FAILURES = ("unexpected pos", "iostream error", "file write failed",
                        "failed writing file")
FULL_BELOW = 16 << 20  # bytes left on a disk below which a failed write is taken as a full disk


def to_plain(obj: Any, key: str = "value") -> Any:
    """A copy of `obj` made of dict/list/str/int/float/bool/None (numpy scalars, tuples and paths
    converted), so it loads with `weights_only=True`; anything else raises `TypeError`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, f"{key}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, f"{key}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{key}: {type(obj).__name__} cannot be stored in a weights-only checkpoint")


def confirmed_disk_fault(exc: BaseException, path: Path) -> OSError | None:
    """An `OSError` naming `path` for a `torch.save` failure with no `OSError` behind it: its
    message is one of torch's write failures AND `os.statvfs` finds the disk holding `path`
    read-only or (nearly) full, while the partial file still fills it; else None (the error
    keeps its traceback: a failed write is not always a full disk)."""
    messages: list[str] = []
    link: BaseException | None = exc
    while link is not None and len(messages) < 16:
        if isinstance(link, OSError):
            return None  # it says itself what failed
        messages.append(str(link))
        link = link.__cause__ or link.__context__
    if not any(m in text for m in TORCH_WRITE_FAILURES for text in messages):
        return None
    try:
        disk = os.statvfs(path.parent)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    if disk.f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif disk.f_bavail * disk.f_frsize < FULL_BELOW:
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, os.strerror(code), str(path))


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically (`bipe.io.atomic_write`). A full or read-only disk
    raises an error whose `OSError` names `path` (`bipe.errors.environment_cause`), however
    torch reports it."""
    path = Path(path)

    def write(f: Any) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # checked here, while the partial file fills the disk
            fault = confirmed_disk_fault(exc, path)
            if fault is None:
                raise
            raise fault from exc

    try:
        atomic_write(path, write)
    except Exception as exc:  # the OSError of a write to an open file names no file
        name_file(exc, path)
        raise


def resolve_checkpoint_path(path: str | os.PathLike, key: str = "checkpoint") -> Path:
    """`path` itself, or for a run folder its newest of `checkpoints/last.ckpt` and
    `checkpoints/interrupted.ckpt` (written when training stopped on Ctrl-C or an error)."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = [c for c in (folder / "last.ckpt", folder / "interrupted.ckpt") if c.is_file()]
        if not found:
            raise CheckpointError(f"{key}={path} is a folder without checkpoints/last.ckpt")
        return max(found, key=lambda c: c.stat().st_mtime_ns)
    if not p.exists():
        raise CheckpointError(f"{key}={path} does not exist")
    return p


def verify_archive(path: Path, key: str = "checkpoint") -> None:
    """`CheckpointError` unless `path` is a zip archive (what `torch.save` writes, and so every
    checkpoint of this project) whose members all pass their CRC-32 check: `torch.load` does not
    check them, so a flipped byte inside a tensor would load as a wrong weight; and it would
    report a file of random bytes as one that holds Python objects."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{key}={path} cannot be read: it is not a checkpoint (not the zip "
                              "archive torch.save writes: a truncated copy or another kind of "
                              "file); use a .ckpt written by train.py or its run folder")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{key}={path} cannot be read (truncated or corrupted?): "
                              f"{first_line(exc)}") from None
    if bad is not None:
        raise CheckpointError(f"{key}={path} is corrupted: its part {bad} fails its CRC-32 "
                              "check (a damaged copy or disk); use another checkpoint of the "
                              "run (checkpoints/best.ckpt, last.ckpt) or copy it again")


def load_checkpoint(path: str | os.PathLike, *, key: str = "checkpoint",
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Read one of our checkpoints with `weights_only=True`.

    Raises `CheckpointError` naming the path when it is missing, truncated, corrupted, or not a
    checkpoint written by this project.
    """
    p = resolve_checkpoint_path(path, key)
    verify_archive(p, key)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch refuses every pickle it cannot read with "Weights only load failed"; only a
        # GLOBAL (a class or function to import) is a Python object, the rest is damage
        refused = "Weights only load failed" in str(exc)
        if not refused or "GLOBAL" not in str(exc):
            detail = "its pickle is not one torch.save writes" if refused else first_line(exc)
            raise CheckpointError(f"{key}={p} cannot be read (truncated or corrupted?): "
                                  f"{detail}") from None
        raise CheckpointError(
            f"{key}={p} holds Python objects besides tensors and plain values, which this "
            "project's checkpoints never do: it was not written by train.py, or was altered; "
            "it is not loaded, since unpickling it could run arbitrary code") from None
    except Exception as exc:  # zip errors, EOF: all mean "unreadable"
        raise CheckpointError(f"{key}={p} cannot be read (truncated or corrupted?): "
                              f"{first_line(exc)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or CHECKPOINT_KEY not in ckpt:
        raise CheckpointError(f"{key}={p} is not a checkpoint written by this project's train.py "
                              f"(no '{CHECKPOINT_KEY}' metadata)")
    version = ckpt[CHECKPOINT_KEY].get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{key}={p} has checkpoint format {version}; this code reads "
                              f"format {FORMAT_VERSION}")
    return ckpt


def model_state_dict(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The Transformer's weights from a Lightning checkpoint (the `model.` prefix removed)."""
    return {k[len(STATE_PREFIX):]: v for k, v in ckpt["state_dict"].items()
            if k.startswith(STATE_PREFIX)}


def load_weights(model: nn.Module, ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Copy a checkpoint's weights into `model`; `CheckpointError` naming the first mismatch."""
    state = model_state_dict(ckpt)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = (f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model "
                "does not")
        raise CheckpointError(f"init_from={path} {what}: the checkpoint was trained with a "
                              "different model/pe config")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"init_from={path}: {name} has shape {list(tensor.shape)} in the checkpoint but "
                f"{list(own[name].shape)} in this model; match its model.* / pe.* sizes "
                "(see its config with Transformer.from_pretrained)")
    model.load_state_dict(state)


def relative_training_range(meta: Mapping[str, Any]) -> int:
    """The distances a checkpoint's relative part (RoPE, ALiBi) saw in training: tokens per
    block, or for one over segment indices (BiPE), the most segments in a block."""
    if meta["model_config"]["pe"]["relative"]["index"] == "inter":
        return int(meta["data_stats"]["max_segments_per_block"])
    return int(meta["run_config"]["data"]["block_size"])


def with_scaling(meta: Mapping[str, Any], scaling: Mapping[str, Any] | None,
                 key: str = "pe.relative.scaling") -> dict[str, Any] | None:
    """`scaling` with `original_max_position: null` filled from the checkpoint (see above);
    None stays None. ConfigError (naming `key`) when the checkpoint's encoding has no rotary part
    or the scaling is malformed."""
    if scaling is None:
        return None
    relative = meta["model_config"]["pe"]["relative"]
    if relative["type"] != "rope":
        raise ConfigError(f"{key} scales RoPE, but the checkpoint's encoding "
                          f"({meta['model_config']['pe'].get('name')}) has relative part "
                          f"{relative['type']!r}; set {key}=null or start from a rope or "
                          "bipe_rope checkpoint")
    out = {HF_SCALING_KEYS.get(k, k): v for k, v in scaling.items()}  # HF spellings too
    if out.get("original_max_position") is None:
        out["original_max_position"] = relative_training_range(meta)
    return normalize_scaling(out, key)
