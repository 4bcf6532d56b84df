"""Learning-rate schedule: linear warmup, then a decay to `min_lr_ratio` of the peak."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "polynomial", "constant")


def lr_multiplier(step: int, *, max_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1, power: float = 2.0) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based).

    Warmup rises linearly to 1 at `step == warmup_steps` (the first step already gets a small
    non-zero lr, as in nanoGPT); the decay then runs to `min_lr_ratio` at `max_steps` and stays
    there. `polynomial` is `(1 - progress) ** power`; `power=1` equals `linear`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = (1.0 - progress) ** power
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
