"""SCROLLS metrics, as the official scorer computes them (Shaham et al. 2022).

* `f1` (Qasper, NarrativeQA): token-level F1 after SQuAD normalisation (lower case, punctuation
  and the articles a/an/the removed, whitespace collapsed).
* `exact_match` (ContractNLI, QuALITY): normalised strings equal.
* `rouge` (QMSum, SummScreenFD, GovReport): the geometric mean of ROUGE-1, ROUGE-2 and ROUGE-Lsum
  F-measures (rouge-score, Porter stemming; Lsum splits sentences at newlines).

With several references (SCROLLS repeats an id with one output per row), each metric takes the
best reference; for ROUGE the best of each of the three F-measures, then their geometric mean.
Scores are in [0, 100].
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

SUBSET_METRIC = {
    "qasper": "f1",
    "narrative_qa": "f1",
    "contract_nli": "exact_match",
    "quality": "exact_match",
    "qmsum": "rouge",
    "summ_screen_fd": "rouge",
    "gov_report": "rouge",
}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if not pred or not ref:
        return float(pred == ref)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: Sequence[str]) -> float:
    """Best token F1 over the references, x 100."""
    return 100 * max(_f1(prediction, r) for r in references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the normalised prediction equals a normalised reference, else 0."""
    pred = normalize_answer(prediction)
    return 100.0 * any(pred == normalize_answer(r) for r in references)


@cache
def _rouge_scorer():  # building it loads NLTK's stemmer: once
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)


def rouge(prediction: str, references: Sequence[str]) -> float:
    """Geometric mean of the best ROUGE-1, ROUGE-2, ROUGE-Lsum F-measures, x 100."""
    best = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    for reference in references:
        scores = _rouge_scorer().score(reference, prediction)
        for key in best:
            best[key] = max(best[key], scores[key].fmeasure)
    return 100 * math.prod(best.values()) ** (1 / 3)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "f1": f1, "exact_match": exact_match, "rouge": rouge}


def score(subset: str, prediction: str, references: Sequence[str]) -> float:
    """The subset's metric of one prediction against its references."""
    if not references:
        raise ValueError("an example needs at least one reference")
    return METRICS[SUBSET_METRIC[subset]](prediction, references)
