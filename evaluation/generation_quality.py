"""Generation quality at long prefixes (LM-Infinite, docs/methods.md section 4): greedy
continuations scored against the gold continuation with BLEU (sacrebleu) and ROUGE (rouge-score)."""

from __future__ import annotations

import numpy as np
import sacrebleu
import torch
from rouge_score import rouge_scorer
from torch import nn

from models.generation import generate


@torch.no_grad()
def generation_quality(model: nn.Module, tokenizer, ids: np.ndarray, boundary: np.ndarray | None,
                       prefix_lengths: list[int], *, new_tokens: int = 100, samples: int = 4,
                       separator_ids=(), device: torch.device | str = "cpu") -> list[dict]:
    """For each prefix length, `samples` windows of the stream: generate `new_tokens` greedily
    after the prefix and score the text against the next `new_tokens` gold tokens."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rows = []
    for prefix in prefix_lengths:
        span = prefix + new_tokens
        if len(ids) < span:
            raise ValueError(f"the evaluation stream has {len(ids)} tokens, fewer than prefix "
                             f"{prefix} + {new_tokens}; lower eval.generation.prefix_lengths")
        starts = np.linspace(0, len(ids) - span, num=samples).astype(int)
        hyps, refs = [], []
        for s in starts:
            x = torch.from_numpy(np.array(ids[s:s + prefix], dtype=np.int64))[None].to(device)
            b = None
            if boundary is not None:
                b = torch.from_numpy(np.array(boundary[s:s + prefix], dtype=bool))[None]
                b = b.to(device)
            out = generate(model, x, b, max_new_tokens=new_tokens, separator_ids=separator_ids)
            hyps.append(tokenizer.decode(out[0, prefix:].tolist()))
            refs.append(tokenizer.decode(np.asarray(ids[s + prefix:s + span]).tolist()))
        bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
        rouge = [scorer.score(r, h) for r, h in zip(refs, hyps, strict=True)]
        rows.append({
            "prefix": prefix, "samples": len(hyps), "bleu": bleu,
            **{k: 100 * float(np.mean([r[k].fmeasure for r in rouge]))
               for k in ("rouge1", "rouge2", "rougeL")},
        })
    return rows
