"""Putting an ensemble's members on one scale and combining them (issue 16).

Each member m has reference scores r_m (its scores of held-out normal rows). A new row's score s_m
becomes its rank among them, the empirical distribution function F_m(s_m) = #{r_m <= s_m} / n_m in
[0, 1], and the ensemble's score is the mean of the members' ranks. Ranks rather than scores
standardised by a centre and a spread: members' scores differ in scale by orders of magnitude and
in tail weight (a volume term can explode on a few rows), and a rank caps what one member can add,
so no member dominates the mean; on the paper's ten datasets (issue 16's study, five splits) rank
averaging matched or beat median/IQR standardisation for every score tried. A rank is also what a
conformal p-value is made of, so the ensemble's own calibration and p-values follow as for one model.

Numpy only: the trainer, the evaluation and the service combine members the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def ranks(
    reference: NDArray[np.float64], scores: NDArray[np.float64], ascending: bool = False
) -> NDArray[np.float64]:
    """F(s) = #{r <= s} / n for each score: 0 below every reference score, 1 at or above the largest.
    `reference` need not be sorted unless `ascending` says it is (a bundle's, checked at load: a
    request then skips the sort); NaN scores stay NaN."""
    ordered = np.asarray(reference, dtype=np.float64)
    ordered = ordered if ascending else np.sort(ordered)
    if ordered.size == 0 or np.isnan(ordered).any():
        raise ValueError("reference scores must be a non-empty set of numbers")
    s = np.asarray(scores, dtype=np.float64)
    out = np.searchsorted(ordered, s, side="right") / ordered.size
    return np.where(np.isnan(s), np.nan, out)


def rank_mean(
    references: Sequence[NDArray[np.float64]], scores: Sequence[NDArray[np.float64]]
) -> NDArray[np.float64]:
    """The ensemble score of each row: the mean over members of its rank among that member's
    reference scores. references[m] and scores[m] belong to member m; every scores[m] has one entry
    per row."""
    if len(references) != len(scores) or not references:
        raise ValueError(f"{len(references)} reference sets for {len(scores)} members' scores")
    return np.mean([ranks(r, s) for r, s in zip(references, scores, strict=True)], axis=0)
