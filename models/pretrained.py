"""One loader and one saver for a trained decoder: `Transformer.from_pretrained` and
`model.save_pretrained`.

`from_pretrained(path)` takes what a user has at hand: a run folder (its newest of last.ckpt and
interrupted.ckpt), a `.ckpt` file of `train.py`, or a folder written by `save_pretrained`. The
model comes back in eval mode with its encoding config, and with `model.tokenizer` (a
`tokenizers.Tokenizer`) and `model.meta` (the checkpoint's `"bipe"` entry: data statistics, the
run's data settings with its segmenter, the training step).

`save_pretrained(folder)` writes the Hugging Face Hub layout: `config.json` (the model and
encoding config and the metadata), `model.safetensors` (the weights) and `tokenizer.json`, each
atomically, for every encoding (BiPE included). `python -m models.export_hf` turns a `rope`
model into a transformers `LlamaForCausalLM` folder instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import load_file, save
from tokenizers import Tokenizer

from bipe.errors import CheckpointError, first_line
from bipe.io import atomic_write, atomic_write_json, atomic_write_text
from models.checkpoint import (
    CHECKPOINT_KEY,
    FORMAT_VERSION,
    load_checkpoint,
    model_state_dict,
    to_plain,
)
from models.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MODEL_TYPE = "bipe-transformer"

M = TypeVar("M", bound="PretrainedMixin")


def is_saved_folder(path: Path) -> bool:
    """True for a folder written by `save_pretrained` (config.json and model.safetensors)."""
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_saved_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(meta, state dict)` of a `save_pretrained` folder; CheckpointError naming a bad file."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} cannot be read: {first_line(exc)}") \
            from None
    if config.get("model_type") != MODEL_TYPE or CHECKPOINT_KEY not in config:
        raise CheckpointError(f"{folder} holds no model saved by this project (config.json has "
                              f"model_type {config.get('model_type')!r}); for a transformers "
                              "Llama folder use python -m models.convert_hf")
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{folder / WEIGHTS_FILE} cannot be read (truncated or "
                              f"corrupted?): {first_line(exc)}") from None
    meta = dict(config[CHECKPOINT_KEY])
    tokenizer = folder / TOKENIZER_FILE
    if tokenizer.is_file():
        meta["tokenizer"] = tokenizer.read_text()
    return meta, state


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for a module built from a `ModelConfig` (the
    decoder); see the module docstring."""

    tokenizer: Any = None
    meta: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls: type[M], path: str | os.PathLike[str], *,
                        model_config_hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                        map_location: Any = "cpu", key: str = "checkpoint") -> M:
        """The model of a run folder, a `.ckpt` or a saved folder, in eval mode.

        `model_config_hook` may edit the model config dict first, e.g. to set RoPE scaling for
        evaluation at a longer length. CheckpointError naming the path when it is missing,
        truncated, corrupted or not ours.
        """
        p = Path(path).expanduser()
        if p.is_dir() and is_saved_folder(p):
            meta, state = read_saved_folder(p)
        else:
            ckpt = load_checkpoint(p, key=key, map_location=map_location)
            meta, state = ckpt[CHECKPOINT_KEY], model_state_dict(ckpt)
        config = dict(meta["model_config"])
        if model_config_hook is not None:
            config = model_config_hook(config)
        model = cls(ModelConfig.from_dict(config))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{key}={path}: its weights do not fit its own model config "
                                  f"({first_line(exc)})") from None
        model.eval()
        model.tokenizer = Tokenizer.from_str(meta["tokenizer"]) if meta.get("tokenizer") else None
        model.meta = dict(meta)
        return model

    def save_pretrained(self, folder: str | os.PathLike[str], *, tokenizer: Any = None,
                        meta: Mapping[str, Any] | None = None) -> Path:
        """Write `config.json`, `model.safetensors` and `tokenizer.json` (when the model has a
        tokenizer, or one is given) into `folder`; returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {k: v for k, v in {**(self.meta or {}), **(meta or {})}.items() if k != "tokenizer"}
        info.update(format_version=FORMAT_VERSION,
                    model_config=to_plain(self.config.to_dict(), "model_config"))
        weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(save(weights)))
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            atomic_write_text(folder / TOKENIZER_FILE, tokenizer.to_str())
        atomic_write_json(folder / CONFIG_FILE, {
            "model_type": MODEL_TYPE, "architectures": ["Transformer"],
            CHECKPOINT_KEY: to_plain(info, CHECKPOINT_KEY)})
        return folder
