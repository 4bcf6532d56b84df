"""Errors that reach the user as one line naming the problem and the fix."""


class BipeError(Exception):
    """Base class: `train.py`/`eval.py` print `error: <message>` and exit with status 2."""


class ConfigError(BipeError, ValueError):
    """A config key has a wrong or missing value; the message names it (`model.hidden_size`)."""


class DataError(BipeError):
    """A corpus, file or cache cannot be used. The message names the file or the `data.*` key."""


class CheckpointError(BipeError):
    """A checkpoint is missing, truncated or not one of ours. The message names the path."""
