"""Metrics: SQuAD-style answer F1 / exact match, accuracy, macro-F1.

``normalize_answer`` is the official SQuAD v1.1 normalisation (lower-case, drop punctuation,
drop the articles a/an/the, collapse whitespace), which MeZO also uses.

>>> normalize_answer("The  Denver Broncos!")
'denver broncos'
>>> round(squad_f1("Denver Broncos", ["the Broncos"]), 4), squad_em("the Broncos", ["Broncos"])
(0.6667, 1.0)
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove articles (a, an, the), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between two normalised answers (0 when either is empty after normalising)."""
    predicted = normalize_answer(prediction).split()
    reference = normalize_answer(gold).split()
    common = Counter(predicted) & Counter(reference)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Max :func:`token_f1` over the gold answers."""
    return max((token_f1(prediction, gold) for gold in answers), default=0.0)


def squad_em(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in answers))


def accuracy(predictions: Sequence[int], correct: Sequence[Sequence[int]]) -> float:
    """Share of predictions that are among the correct indices of their example."""
    if not predictions:
        return 0.0
    return sum(p in ok for p, ok in zip(predictions, correct, strict=True)) / len(predictions)


def macro_f1(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``golds`` or ``predictions``
    (scikit-learn's ``f1_score(average="macro")`` without an explicit label list).

    >>> macro_f1([0, 0, 1, 1], [0, 1, 1, 1])
    0.7333333333333334
    """
    classes = sorted(set(golds) | set(predictions))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        true_pos = sum(p == c and g == c for p, g in zip(predictions, golds, strict=True))
        predicted = sum(p == c for p in predictions)
        actual = sum(g == c for g in golds)
        scores.append(0.0 if true_pos == 0 else 2 * true_pos / (predicted + actual))
    return sum(scores) / len(scores)
