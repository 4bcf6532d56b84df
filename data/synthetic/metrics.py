"""Task metrics: arithmetic answers by greedy cached decoding, Bi-NFA states by teacher forcing.

Each function scores one batch of `SyntheticDataModule` and returns plain floats: the rates for
this batch and the sums/counts behind them, so a caller adds `correct` and `count` over batches
(batches of different sizes) instead of averaging rates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from models import generate

from .arithmetic import EOS_ID, SEPARATOR_IDS


@torch.no_grad()
def arithmetic_accuracy(model: nn.Module, batch: dict[str, Tensor], *,
                        separator_ids: Iterable[int] = SEPARATOR_IDS, eos_id: int = EOS_ID,
                        max_new_tokens: int | None = None) -> dict[str, float]:
    """Final-answer accuracy of greedy KV-cached decoding from each prompt (`... =`).

    Batch: `input_ids`, `boundary` `[B, T]`, `targets` `[B, T]`, `prompt_len`, `answer_id`,
    `length` `[B]`. The predicted answer is the token before the first `<eos>` (the last token if
    none came within `max_new_tokens`, default twice the true continuation plus 8). Rows are
    decoded in groups of equal prompt length, so no prompt is padded. `exact` is the share whose
    generated chain equals the reference token for token (chains are not always unique).
    """
    separator_ids = tuple(separator_ids)
    ids, boundary, targets = batch["input_ids"], batch["boundary"], batch["targets"]
    prompt_len, answer, length = batch["prompt_len"], batch["answer_id"], batch["length"]
    was_training = model.training
    model.eval()
    correct = exact = 0
    try:
        for p in torch.unique(prompt_len).tolist():
            rows = (prompt_len == p).nonzero().squeeze(1)
            # Reference continuation: inputs after the prompt, then the last target (<eos>).
            todo = length[rows] + 1 - p  # [b]
            budget = max_new_tokens or 2 * int(todo.max()) + 8
            out = generate(model, ids[rows, :p], boundary[rows, :p], max_new_tokens=budget,
                           separator_ids=separator_ids, eos_id=eos_id)
            new = out[:, p:]  # [b, n]
            is_eos = new == eos_id
            has_eos = is_eos.any(dim=1)
            first_eos = is_eos.long().argmax(dim=1)  # 0 when none; masked below
            at = torch.where(has_eos, p + first_eos - 1, out.shape[1] - 1)
            predicted = out.gather(1, at[:, None]).squeeze(1)
            correct += int((predicted == answer[rows]).sum())
            for j, r in enumerate(rows.tolist()):
                n = int(todo[j])
                ref = torch.cat([ids[r, p : length[r]], targets[r, length[r] - 1 : length[r]]])
                exact += int(new.shape[1] >= n and torch.equal(new[j, :n], ref))
    finally:
        model.train(was_training)
    count = int(ids.shape[0])
    return {"accuracy": correct / max(count, 1), "exact": exact / max(count, 1),
            "correct": float(correct), "exact_count": float(exact), "count": float(count)}


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
