"""Errors that reach the user as one line naming the problem and the fix."""

from __future__ import annotations

import errno
import os

# Errors that come from the machine, not from the code: a full or read-only disk, no permission.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                      errno.EFBIG: "the file is too large for its file system",
                      errno.EROFS: "the file system is read-only",
                      errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


class BipeError(Exception):
    """Base class: `train.py`/`eval.py` print `error: <message>` and exit with status 2."""


class ConfigError(BipeError, ValueError):
    """A config key has a wrong or missing value; the message names it (`model.hidden_size`)."""


class DataError(BipeError):
    """A corpus, file or cache cannot be used. The message names the file or the `data.*` key."""


class CheckpointError(BipeError):
    """A checkpoint is missing, truncated or not one of ours. The message names the path."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if empty): how an
    error reaches the user."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def environment_cause(exc: BaseException | None) -> OSError | None:
    """The `OSError` the machine caused (`ENVIRONMENT_ERRNOS`) behind `exc`: `exc` itself or one
    in its chain of causes and contexts, preferring one that names its file; None if none.

    Libraries hide it: `torch.save` reports a full disk as `RuntimeError('unexpected pos ...')`
    raised while handling the `OSError` of the failed write."""
    found = None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            if exc.filename:
                return exc
            found = found or exc
        exc = exc.__cause__ or exc.__context__
    return found


def name_file(exc: BaseException, path: str | os.PathLike[str]) -> None:
    """Make the machine's `OSError` behind `exc` name `path` when it names no file (a write to an
    open file raises one without): the one-line error must say which disk to free."""
    fault = environment_cause(exc)
    if fault is not None and not fault.filename:
        fault.filename = os.fspath(path)
