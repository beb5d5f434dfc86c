"""Ranking quality of anomaly scores."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata


def roc_auc(is_anomaly: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve, higher score = more anomalous; ties count one half.

    The Mann-Whitney statistic from mid-ranks: O(n log n), exact.
    """
    labels = np.asarray(is_anomaly, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if labels.shape != s.shape or labels.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of one length, got {labels.shape} and {s.shape}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one anomalous and one normal row")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite to be ranked")
    ranks = rankdata(s)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
