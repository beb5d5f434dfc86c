"""Judging candidates: the AUC against a pairwise count, and the selection rule."""

import math

import numpy as np
import pytest

from app.train.selection import auc, select


def test_auc_matches_a_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.standard_normal(300), 1)  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert auc(labels, scores) == pytest.approx(pairwise, abs=1e-12)


def test_auc_ranks_non_finite_scores_as_most_anomalous_and_is_nan_for_one_class():
    labels = np.array([0, 0, 1, 1, 0], bool)
    score = np.array([0.1, 0.5, np.inf, 0.3, np.nan])
    finite = np.array([0.1, 0.5, 1.5, 0.3, 1.5])
    pos, neg = finite[labels], finite[~labels]
    expected = ((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (pos.size * neg.size)
    assert auc(labels, score) == pytest.approx(expected)
    assert math.isnan(auc(np.zeros(5, bool), score))


def test_selection_prefers_labels_and_falls_back_to_the_likelihood():
    val_auc, loglik, error = [0.6, 0.9, 0.7], [-5.0, -9.0, -3.0], [0.2, 0.1, 0.3]
    assert select("likelihood", True, val_auc, loglik, error) == (1, "validation AUC")
    assert select("likelihood", False, val_auc, loglik, error)[0] == 2
    assert select("reconstruction", False, val_auc, loglik, error)[0] == 1  # lowest error
    # labels of one class give no AUC: the unsupervised rule decides
    index, rule = select("likelihood", True, [math.nan] * 3, loglik, error)
    assert index == 2 and "log-likelihood" in rule
