"""What the tasks' scores add up from: each rate is a sum over a count, added over batches.

A scoring function returns, for one batch, its rates and the sums and counts behind them; callers
add the sums and counts over batches (`add_sums`) and only then divide (`rates`), so batches of
different sizes weigh by what they hold.
"""

from __future__ import annotations

from collections.abc import Mapping

# Each rate and the (numerator, denominator) sums behind it, as the scoring functions return them.
RATES: dict[str, tuple[str, str]] = {
    "accuracy": ("correct", "count"),  # arithmetic: final answer right
    "exact": ("exact_count", "count"),  # arithmetic: whole chain equals the reference
    "token_accuracy": ("tokens_correct", "tokens"),  # Bi-NFA: state tokens right
    "sequence_accuracy": ("sequences_correct", "sequences"),  # Bi-NFA: every state token right
    "score": ("score_sum", "count"),  # SCROLLS: the subset's metric (F1, EM or ROUGE) / 100
}


def add_sums(total: dict[str, float], scores: Mapping[str, float]) -> dict[str, float]:
    """Add the sums and counts of one batch's `scores` into `total` (in place; rates skipped)."""
    for key, value in scores.items():
        if key not in RATES:
            total[key] = total.get(key, 0.0) + float(value)
    return total


def rates(sums: Mapping[str, float]) -> dict[str, float]:
    """The rates that `sums` (added over batches) determine; a rate with a zero count is NaN."""
    return {name: (sums[num] / sums[den] if sums[den] else float("nan"))
            for name, (num, den) in RATES.items() if num in sums and den in sums}
