"""µAP with tied scores (issue 16): ties are one step of the curve, as DISC21 and scikit-learn's
``average_precision_score`` count them, so the order of the predictions never changes µAP."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.copydetect.metrics import micro_average_precision


def test_tied_scores_do_not_depend_on_input_order():
    assert micro_average_precision([0.5, 0.5], [True, False], 1) == pytest.approx(0.5)
    assert micro_average_precision([0.5, 0.5], [False, True], 1) == pytest.approx(0.5)
    # without ties nothing changes: 1/1, then 2/3
    assert micro_average_precision([0.9, 0.5, 0.4], [True, False, True], 2) == pytest.approx((1 + 2 / 3) / 2)


def test_missed_ground_truth_lowers_recall():
    assert micro_average_precision([0.9], [True], 4) == pytest.approx(0.25)


def test_matches_scikit_learn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, 40) / 5.0              # many ties
        correct = rng.random(40) < 0.4
        if not correct.any():
            continue
        perm = rng.permutation(40)
        ours = micro_average_precision(scores[perm], correct[perm], int(correct.sum()))
        assert ours == pytest.approx(sk.average_precision_score(correct, scores))
        assert ours == pytest.approx(micro_average_precision(scores, correct, int(correct.sum())))
