"""One tokenized training/evaluation sequence of a synthetic task, before batching.

Both tasks produce an `EncodedExample`: the full token sequence plus, per token, its boundary flag
and whether it is scored as a target. Batching (`tasks.generated.collate`) shifts it into
`input_ids = ids[:-1]`, `targets = ids[1:]` (-100 where not scored), `boundary = flags[:-1]`.
Kept free of torch so the command-line generators start fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # the target value that `F.cross_entropy(..., ignore_index=-100)` skips


@dataclass(frozen=True)
class EncodedExample:
    """Token ids `[L]`, boundary flags `[L]`, scored flags `[L]` and per-example integer extras."""

    ids: tuple[int, ...]
    boundary: tuple[bool, ...]  # True = last token of its segment (docs/methods.md section 1)
    scored: tuple[bool, ...]  # True = this token is a target that gets a loss
    extras: dict[str, int] = field(default_factory=dict)  # e.g. prompt_len, answer_id

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.boundary) == len(self.scored):
            raise ValueError("ids, boundary and scored must have the same length")
        if len(self.ids) < 2:
            raise ValueError("a sequence needs at least two tokens (one input, one target)")

    @property
    def input_length(self) -> int:
        """Number of input tokens (`len(ids) - 1`: the last token is only a target)."""
        return len(self.ids) - 1

    def segments(self) -> int:
        """Segments among the input tokens (a trailing unclosed segment counts)."""
        flags = self.boundary[:-1]
        closed = sum(flags)
        return closed + (0 if flags[-1] else 1)

    def max_segment_length(self) -> int:
        """Longest segment among the input tokens, in tokens."""
        longest = run = 0
        for flag in self.boundary[:-1]:
            run += 1
            longest = max(longest, run)
            if flag:
                run = 0
        return longest
