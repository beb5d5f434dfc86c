"""Thresholds and p-values from held-out calibration scores (conformal, distribution-free).

With calibration scores c_1..c_n of normal rows, the p-value of a new score s is
(1 + #{c_i >= s}) / (n + 1), and a row is flagged at false-positive rate a when its p-value is at
most a. For a normal row exchangeable with the calibration rows that happens with probability at
most a. The threshold is the score above which exactly that happens, so `score > threshold` and
`p_value <= fpr` always agree.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

DEFAULT_FPRS = (0.1, 0.01, 0.001)


def check_fpr(fpr: float, n: int) -> None:
    if not 0 < fpr < 1:
        raise ValueError(f"a false-positive rate must lie in (0, 1), got {fpr}")
    if fpr < 1 / n:
        raise ValueError(
            f"false-positive rate {fpr} is below 1/n = {1 / n:.3g} for {n} calibration rows: "
            "it cannot be calibrated; use more calibration rows or a larger rate"
        )


def threshold_name(fpr: float) -> str:
    return f"fpr_{fpr:g}"


def threshold(sorted_scores: NDArray[np.float64], fpr: float) -> float:
    """Score above which a row's conformal p-value is at most `fpr`.

    j = floor(fpr (n + 1)) - 1 calibration scores may lie at or above a flagged score, so the
    threshold is the (j + 1)-th largest calibration score.
    """
    n = sorted_scores.size
    check_fpr(fpr, n)
    allowed = math.floor(fpr * (n + 1) + 1e-9) - 1
    return float(sorted_scores[n - 1 - allowed])


def p_values(sorted_scores: NDArray[np.float64], scores: ArrayLike) -> NDArray[np.float64]:
    """(1 + #{calibration >= s}) / (n + 1) for each s, by binary search."""
    s = np.asarray(scores, dtype=np.float64)
    n = sorted_scores.size
    at_or_above = n - np.searchsorted(sorted_scores, s, side="left")
    return (1.0 + at_or_above) / (n + 1.0)
