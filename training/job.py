"""`run_job`: what wraps every Hydra job: error reporting and always closing the W&B run."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig

from bipe.errors import BipeError
from training.messages import first_line
from training.wandb_logger import finish_wandb

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_USAGE = 2  # a BipeError: bad config, data or checkpoint


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def tidy_lightning_output() -> None:
    """Send Lightning's log lines through Hydra's handlers only (console + the run's log file),
    and drop its advert and a deprecation warning it raises against torch 2.13 itself.

    `import lightning` gives its top logger a console handler of its own, so with Hydra's root
    handlers every line printed twice. Call after importing lightning.
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    root = logging.getLogger()
    top = logging.getLogger("lightning")
    if root.handlers:
        for handler in list(top.handlers):
            top.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())


def run_job(fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run `fn(cfg)`; on a `BipeError` print `error: <message>` (one line) and exit with status 2.

    In a multirun the error is logged and re-raised instead, so Hydra marks this job failed and
    still runs the others. The W&B run is finished in every case (`failed` when `fn` raised), so
    the next job of a sweep never logs into this one's run.
    """
    failed = True
    try:
        result = fn(cfg)
        failed = False
        return result
    except BipeError as exc:
        message = first_line(exc)
        if _in_multirun():
            log.error("error: %s", message)
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    finally:
        finish_wandb(failed)

