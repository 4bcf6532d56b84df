"""`AtomicCheckpointIO`: the Lightning plugin that makes every checkpoint write atomic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO

from models.checkpoint import load_checkpoint, save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Never leaves a half-written checkpoint under the final name.

    Writes to a hidden temp file in the same folder, fsyncs it, then `os.replace`s it over the
    target (atomic on POSIX and Windows), and fsyncs the folder so the rename survives a crash.
    A run killed mid-write leaves only a `.*.tmp` file, which nothing reads. Loading always uses
    `weights_only=True`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        save_atomic(checkpoint, Path(path))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning reads the checkpoint a run resumes from, which train.py takes as ckpt_path=
        return load_checkpoint(path, key="ckpt_path", map_location=map_location or "cpu")
