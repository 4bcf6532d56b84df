"""Errors that reach the user as one line naming the problem and the fix."""


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
