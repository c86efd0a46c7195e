"""Copy-detection metrics as DISC21 defines them: micro-average precision (µAP) over all predictions
of all queries pooled, the precision–recall curve, recall at a precision, and the threshold that gives
a precision (to calibrate ``retrieval.copydetect`` thresholds on a labelled sample)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from retrieval.errors import InvalidQueryError


def micro_average_precision(scores: Sequence[float], correct: Sequence[bool], n_ground_truth: int) -> float:
    """µAP as DISC21 defines it: all (query, reference, score) predictions of all queries pooled and
    sorted by score; AP over that list, with recall relative to ``n_ground_truth`` (the number of
    queries that have a true reference). Each true (query, reference) pair must be counted once.

    Predictions with equal scores are one step of the curve (a threshold admits all of them or none):
    each correct one counts the precision at the end of its tied group, as DISC21's evaluation and
    scikit-learn's ``average_precision_score`` do, so the input order never changes the result."""
    if n_ground_truth <= 0:
        raise InvalidQueryError("µAP needs at least one ground-truth pair")
    s = np.asarray(scores, np.float64)
    c = np.asarray(correct, bool)
    if len(s) == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    tp = np.cumsum(c)
    # index of the last prediction of each one's tied group
    last = np.r_[s[1:] != s[:-1], True]
    group_end = np.flatnonzero(last)[np.cumsum(np.r_[0, last[:-1]])]
    precision = tp[group_end] / (group_end + 1)
    return float(np.sum(precision[c]) / n_ground_truth)


def precision_recall_curve(scores, correct, n_ground_truth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at every prediction, scores sorted descending."""
    s = np.asarray(scores, np.float64)
    c = np.asarray(correct, bool)
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    tp = np.cumsum(c)
    precision = tp / np.arange(1, len(c) + 1)
    recall = tp / max(n_ground_truth, 1)
    # ties: a threshold admits every prediction with that score; keep the last index of each run
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    return precision[last], recall[last], s[last]


def recall_at_precision(scores, correct, n_ground_truth: int, precision: float = 0.9) -> float:
    p, r, _ = precision_recall_curve(scores, correct, n_ground_truth)
    ok = p >= precision
    return float(r[ok].max()) if ok.any() else 0.0


def threshold_for_precision(scores, correct, n_ground_truth: int, precision: float = 0.9) -> float | None:
    """The lowest score threshold at which precision is still >= ``precision`` (max recall)."""
    p, r, t = precision_recall_curve(scores, correct, n_ground_truth)
    ok = np.nonzero(p >= precision)[0]
    if len(ok) == 0:
        return None
    best = ok[np.argmax(r[ok])]
    return float(t[best])


__all__ = ["micro_average_precision", "precision_recall_curve", "recall_at_precision",
           "threshold_for_precision"]
