"""What wraps the entry points: `cli` around Hydra's main (its own errors become one line) and
`run_job` around every job (a `BipeError` or a full / read-only disk becomes one line, a
stopping signal or Ctrl-C an exit status of 128 + its number; the W&B run is always closed)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from bipe.attention import log_kernels_again
from bipe.errors import ENVIRONMENT_ERRNOS, BipeError, environment_cause, first_line
from evaluation.wandb_runs import finish_wandb
from training.interrupted import TrainingStopped

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_USAGE = 2  # a BipeError (bad config, data or checkpoint) or a machine that cannot do it
EXIT_INTERRUPTED = 128 + signal.SIGINT  # Ctrl-C outside training, as a shell reports it


def environment_error(exc: BaseException) -> str | None:
    """One line for an `OSError` the machine caused (`ENVIRONMENT_ERRNOS`), `exc` itself or one
    behind it (`bipe.errors.environment_cause`), naming the file and the way out; None for any
    other exception (a bug must keep its traceback)."""
    fault = environment_cause(exc)
    if fault is None:
        return None
    where = fault.filename or "a file"
    fix = ("free space there or point paths.root (outputs) / paths.cache_dir (caches) at "
           "another disk") if fault.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else (
        "make it writable or point paths.root (outputs) / paths.cache_dir (caches) at a "
        "writable folder")
    return f"cannot use {where}: {ENVIRONMENT_ERRNOS[fault.errno]}; {fix}"


def _in_multirun() -> bool:
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
    """Run `fn(cfg)`; on a `BipeError`, or an `OSError` the machine caused (`environment_error`),
    print `error: <message>` (one line) and exit with status 2;
    on `TrainingStopped` (SIGINT, SIGTERM) print where to resume from and exit with 128 + the
    signal number, as a shell reports a process the signal killed; on Ctrl-C before or after
    training (building the data cache, testing) print one line and exit with 130.

    In a multirun the error is logged and re-raised instead, so Hydra marks this job failed and
    still runs the others. The W&B run is finished in every case (`failed` when `fn` raised), so
    the next job of a sweep never logs into this one's run.
    """
    failed = True
    log_kernels_again()
    try:
        result = fn(cfg)
        failed = False
        return result
    except TrainingStopped as exc:  # a signal: the checkpoint is written; exit as killed by it
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # outside training, where no handler turns it into a checkpoint
        print("stopped: interrupted by SIGINT (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        message = first_line(exc) if isinstance(exc, BipeError) else environment_error(exc)
        if message is None:
            raise  # a bug, or an OSError the code caused: keep the traceback
        if _in_multirun():
            log.error("error: %s", message)
            raise
        _log_to_files(f"error: {message}")  # the run folder says why it ended
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    finally:
        finish_wandb(failed)


def _log_to_files(message: str) -> None:
    """`message` into the run's log file (Hydra's `train.log`) but not onto the console, where
    the caller prints it as the one `error:` line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    quiet, logging.raiseExceptions = logging.raiseExceptions, False  # no "--- Logging error ---"
    try:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                with contextlib.suppress(OSError):  # the disk that failed may be this file's
                    handler.handle(record)
    finally:
        logging.raiseExceptions = quiet


def hydra_error_line(exc: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config: an unknown
    group option with the valid ones, or the message and its cause with the key they name."""
    if isinstance(exc, MissingConfigException) and exc.options:
        group = (exc.missing_cfg_file or "").rsplit("/", 1)
        name = f"{group[0]}={group[1]}" if len(group) == 2 else exc.missing_cfg_file
        return (f"{name} is not an option; choose one of {', '.join(exc.options)} "
                f"(conf/{group[0]}/*.yaml)")
    parts: list[str] = []
    key = None
    while exc is not None:
        line = first_line(exc).rstrip(".")
        # OmegaConf repeats its message as a template ($VALUE) and some causes say "None"
        if line and line != "None" and "$VALUE" not in line and line not in parts:
            parts.append(line)
        key = key or getattr(exc, "full_key", None)
        exc = exc.__cause__ or exc.__context__
    text = "; ".join(parts)
    if key and key not in text:
        text += f" (key {key})"
    return text


def cli(main: Callable[[], object]) -> None:
    """Run a `@hydra.main` function; an error while composing the config (an unknown option, a
    misspelled or mistyped key, a malformed override) prints one `error:` line and exits 2.

    A multirun runs every job, then exits 0 if all succeeded, 2 with one `error:` line if a job
    ended with a one-line error (the first such job's; each job's `train.log` has its own), and
    1 with the traceback if a job hit a bug."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's errors reach us instead of printing them
    try:
        main()
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except BipeError as exc:  # only a multirun gets here: Hydra re-raises a failed job's error
        print(f"error: a job of the sweep failed: {first_line(exc)} (the other jobs ran; each "
              "job's train.log says how it ended)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except Exception as exc:  # Hydra creating the run folder on a full or read-only disk
        message = environment_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
