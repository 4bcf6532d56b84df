"""Task metrics: arithmetic answers by greedy cached decoding, Bi-NFA states by teacher forcing.

Each function scores one batch of `SyntheticDataModule` and returns plain floats: the rates for
this batch and the sums/counts behind them, so a caller adds `correct` and `count` over batches
(batches of different sizes) instead of averaging rates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from models import generate

from .arithmetic import EOS_ID, SEPARATOR_IDS

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


@torch.no_grad()
def arithmetic_accuracy(model: nn.Module, batch: dict[str, Tensor], *,
                        separator_ids: Iterable[int] = SEPARATOR_IDS, eos_id: int = EOS_ID,
                        max_new_tokens: int | None = None) -> dict[str, float]:
    """Final-answer accuracy of greedy KV-cached decoding from each prompt (`... =`).

    Batch: `input_ids`, `boundary` `[B, T]`, `targets` `[B, T]`, `prompt_len`, `answer_id`,
    `length` `[B]`. The predicted answer is the token before the first `<eos>` (the last token if
    none came within `max_new_tokens`, default twice the longest true continuation plus 8). All
    rows decode together, each from its own prompt (`generate(prompt_lengths=...)`), so no prompt
    is padded. `exact` is the share whose generated chain equals the reference token for token
    (chains are not always unique).
    """
    separator_ids = tuple(separator_ids)
    ids, boundary, targets = batch["input_ids"], batch["boundary"], batch["targets"]
    prompt_len, answer, length = batch["prompt_len"], batch["answer_id"], batch["length"]
    B = ids.shape[0]
    # Reference continuation of row r: inputs after the prompt, then the last target (<eos>).
    todo = length + 1 - prompt_len  # [B]
    budget = max_new_tokens or 2 * int(todo.max()) + 8
    was_training = model.training
    model.eval()
    try:
        out = generate(model, ids, boundary, max_new_tokens=budget, separator_ids=separator_ids,
                       eos_id=eos_id, prompt_lengths=prompt_len)  # [B, L]
    finally:
        model.train(was_training)
    L = out.shape[1]
    col = torch.arange(L, device=out.device)[None, :]
    generated = (col >= prompt_len[:, None]) & (col < prompt_len[:, None] + budget)  # [B, L]
    is_eos = (out == eos_id) & generated
    has_eos = is_eos.any(dim=1)
    first_eos = is_eos.long().argmax(dim=1)  # 0 when none; masked below
    last = (prompt_len + budget).clamp(max=L) - 1
    at = torch.where(has_eos, first_eos - 1, last)
    predicted = out.gather(1, at[:, None]).squeeze(1)
    correct = int((predicted == answer).sum())
    exact = 0
    for r in range(B):
        p, n = int(prompt_len[r]), int(todo[r])
        ref = torch.cat([ids[r, p : length[r]], targets[r, length[r] - 1 : length[r]]])
        exact += int(p + n <= L and torch.equal(out[r, p : p + n], ref))
    return {"accuracy": correct / max(B, 1), "exact": exact / max(B, 1),
            "correct": float(correct), "exact_count": float(exact), "count": float(B)}


@torch.no_grad()
def bi_nfa_accuracy(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
    """Per-state-token and per-sequence accuracy of the argmax at the scored positions.

    Teacher forcing is the task's chain of thought: each state token is predicted from the word,
    `#` and the true earlier state tokens. Batch: `input_ids`, `boundary`, `targets` `[B, T]`.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(batch["input_ids"], batch["boundary"])  # [B, T, V]
    finally:
        model.train(was_training)
    targets = batch["targets"]
    scored = targets != -100
    hit = (logits.argmax(dim=-1) == targets) & scored
    tokens, tokens_correct = int(scored.sum()), int(hit.sum())
    has_targets = scored.any(dim=1)
    sequences = int(has_targets.sum())
    sequences_correct = int(((hit | ~scored).all(dim=1) & has_targets).sum())
    return {
        "token_accuracy": tokens_correct / max(tokens, 1),
        "sequence_accuracy": sequences_correct / max(sequences, 1),
        "tokens_correct": float(tokens_correct),
        "tokens": float(tokens),
        "sequences_correct": float(sequences_correct),
        "sequences": float(sequences),
    }
