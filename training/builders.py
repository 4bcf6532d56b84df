"""Turn the validated config's `_target_` nodes into the run's objects: callbacks, logger, trainer.

Each builder raises a `ConfigError` with a one-line message naming the config key.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from bipe.errors import ConfigError, first_line
from training.checkpoint_io import AtomicCheckpointIO


def _instantiate(node: DictConfig, key: str) -> Any:
    try:
        return instantiate(node)
    except Exception as exc:  # hydra wraps the target's own error; keep its first line
        raise ConfigError(f"{key}: {first_line(exc.__cause__ or exc)}") from exc


def callbacks(cfg: DictConfig, with_logger: bool = True) -> list[Any]:
    """Instantiate every entry of `cfg.callbacks` (null entries are switched off).

    Without a logger (`logger=none`) the learning-rate monitor, which can only log, is left out.
    """
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
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    cls = get_class(kwargs.pop("_target_"))
    try:
        return cls(**kwargs, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()])
    except (ValueError, TypeError) as exc:  # MisconfigurationException is a ValueError
        raise ConfigError(f"trainer: {first_line(exc)}") from exc
    except ImportError as exc:  # an accelerator whose package is missing (tpu: torch_xla)
        raise ConfigError(f"trainer.accelerator={kwargs.get('accelerator')!r} needs a package "
                          f"this machine lacks: {first_line(exc)}") from exc
