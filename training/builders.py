"""Turn the validated config into the run's objects: model config, data, callbacks, logger, trainer.

Each builder raises `BipeError` subclasses with one-line messages naming the config key. Heavy
imports (torch, Lightning, the data pipeline) happen inside the builders that need them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bipe.errors import ConfigError
from training.messages import first_line

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_config(cfg: DictConfig, vocab_size: int | None = None) -> Any:
    """`ModelConfig` from `cfg.model` and `cfg.pe`.

    `model.vocab_size: null` takes the tokenizer's size; a larger value pads the embedding (e.g.
    to a multiple of 64), a smaller one is an error. Without `vocab_size` (before the data is
    built) the configured tokenizer size stands in, so shape errors surface before data work.
    """
    from models import ModelConfig

    model = dict(_plain(cfg.model))
    configured = model.get("vocab_size")
    if vocab_size is None:
        vocab_size = configured or OmegaConf.select(cfg, "data.tokenizer.vocab_size") or 2
    elif configured is not None and configured < vocab_size:
        raise ConfigError(f"model.vocab_size={configured} is smaller than the tokenizer's "
                          f"{vocab_size} tokens; leave it null to use the tokenizer's size")
    model["vocab_size"] = configured or vocab_size
    return ModelConfig.from_dict({**model, "pe": _plain(cfg.pe)})


def datamodule(cfg: DictConfig, start_meta: dict[str, Any] | None = None,
               output_dir: Path | None = None) -> Any:
    """The run's prepared datamodule: `ScrollsDataModule` for SCROLLS, `SyntheticDataModule` for
    a synthetic task, else `LMDataModule` (see `lm_datamodule`). `start_meta`: the `"bipe"`
    entry of the checkpoint the run starts from, if any."""
    tokenizer_json = start_meta["tokenizer"] if start_meta else None
    if cfg.task.name == "scrolls":
        return scrolls_datamodule(cfg, start_meta)
    if cfg.task.name != "lm":
        return synthetic_datamodule(cfg, tokenizer_json)
    return lm_datamodule(cfg, tokenizer_json, output_dir)


def scrolls_datamodule(cfg: DictConfig, start_meta: dict[str, Any] | None) -> Any:
    """`ScrollsDataModule` with the pretrained checkpoint's tokenizer and segmenter."""
    from tasks.scrolls import ScrollsDataModule

    if not start_meta:
        raise ConfigError("task=scrolls fine-tunes a pretrained language model: set "
                          "init_from=<checkpoint or run folder of a text run>")
    # The pretraining corpus config (its segmenter): a text run's own, or the one a SCROLLS
    # run recorded from the text run it started from.
    text_data = start_meta.get("data_stats", {}).get("text_data") or \
        start_meta["run_config"]["data"]
    if "segmenter" not in text_data:
        raise ConfigError(f"init_from={cfg.init_from} was not trained on text (its data is "
                          f"{text_data.get('name')!r}); SCROLLS needs a language-model checkpoint")
    return ScrollsDataModule(_plain(cfg.task), start_meta["tokenizer"], text_data,
                             seed=int(cfg.seed))


def synthetic_datamodule(cfg: DictConfig, tokenizer_json: str | None = None) -> Any:
    """`SyntheticDataModule` for `cfg.task`, with its evaluation sets drawn.

    A learned token-position table must cover the longest test sequence (it cannot extrapolate);
    a checkpoint to start from must share the task's vocabulary.
    """
    from tasks.synthetic import SyntheticDataModule

    dm = SyntheticDataModule(_plain(cfg.task), seed=int(cfg.seed))
    dm.setup("fit")
    absolute = cfg.pe.absolute
    longest = dm.stats["eval_max_input_length"]
    if (absolute.type == "learned" and absolute.index == "token"
            and absolute.max_positions < longest):
        raise ConfigError(f"pe.absolute.max_positions={absolute.max_positions} rows cannot "
                          f"cover task={dm.task_name}'s longest test sequence ({longest} tokens); "
                          f"set data.block_size>={longest}")
    if tokenizer_json is not None and dm.tokenizer.to_str() != tokenizer_json:
        raise ConfigError(f"the checkpoint this run starts from was trained on another vocabulary "
                          f"than task={dm.task_name} with these settings; start from a checkpoint "
                          "of the same task")
    return dm


def lm_datamodule(cfg: DictConfig, tokenizer_json: str | None = None,
                  output_dir: Path | None = None) -> Any:
    """The prepared `LMDataModule` (cache built or reused, tokenizer loaded).

    With `tokenizer_json` (the tokenizer of the checkpoint a run starts from) the data must be
    tokenized by that tokenizer, or the embeddings would mean other tokens: if the configured
    data yields a different one, it is re-packed with the checkpoint's (saved to
    `output_dir/tokenizer.json`).
    """
    from data import LMDataModule

    data_cfg = _plain(cfg.data)
    dm = LMDataModule(data_cfg, seed=int(cfg.seed))
    dm.prepare_data()
    dm.setup("fit")
    if tokenizer_json is None or dm.tokenizer.to_str() == tokenizer_json:
        return dm
    if data_cfg["tokenizer"].get("path"):
        raise ConfigError(f"data.tokenizer.path={data_cfg['tokenizer']['path']} differs from the "
                          "tokenizer of the checkpoint this run starts from; set it to null to "
                          "use the checkpoint's tokenizer")
    assert output_dir is not None
    path = output_dir / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tokenizer_json)
    log.warning("data=%s trains a different tokenizer than the checkpoint's; re-packing the data "
                "with the checkpoint's tokenizer (%s)", data_cfg["name"], path)
    data_cfg["tokenizer"] = {**data_cfg["tokenizer"], "path": str(path)}
    dm = LMDataModule(data_cfg, seed=int(cfg.seed))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _instantiate(node: DictConfig, key: str) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as exc:  # hydra wraps the target's own error; keep its first line
        raise ConfigError(f"{key}: {first_line(exc.__cause__ or exc)}") from exc


def callbacks(cfg: DictConfig, with_logger: bool = True) -> list[Any]:
    """Instantiate every entry of `cfg.callbacks` (null entries are switched off).

    Without a logger (`logger=none`) the learning-rate monitor, which can only log, is left out.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor

    built = [_instantiate(node, f"callbacks.{name}")
             for name, node in (cfg.callbacks or {}).items() if node is not None]
    return [c for c in built if with_logger or not isinstance(c, LearningRateMonitor)]


def logger(cfg: DictConfig) -> Any:
    """The configured Lightning logger, or False (`logger=none`)."""
    if not cfg.logger or cfg.logger.get("_target_") is None:
        return False
    return _instantiate(cfg.logger, "logger")


def trainer(cfg: DictConfig, callbacks: list[Any], logger: Any) -> Any:
    """`cfg.trainer` as a Lightning Trainer that writes checkpoints atomically."""
    from hydra.utils import get_class

    from training.checkpoint_io import AtomicCheckpointIO

    kwargs = _plain(cfg.trainer)
    cls = get_class(kwargs.pop("_target_"))
    try:
        return cls(**kwargs, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()])
    except (ValueError, TypeError) as exc:  # MisconfigurationException is a ValueError
        raise ConfigError(f"trainer: {first_line(exc)}") from exc
