"""One-line messages: errors reach the user as a single line (see `bipe.errors`)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
