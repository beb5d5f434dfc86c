"""The residual's noise, e = x - f(z) ~ N(0, sigma2 diag(w)): the paper's sigma2 I when a model has
no relative variances w (None), one variance sigma2 w_j per feature otherwise.

Torch-free, so the exporter and the service's graph checks share these roundings with the torch
scores (app.model.scores) bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

LOG_2PI = math.log(2 * math.pi)


def whitening_factors(relative_variance: Sequence[float] | None) -> NDArray[np.float64] | None:
    """r = 1 / sqrt(w) (d,), float64: residuals times r have noise sigma2 I. Both operations are
    correctly rounded, so every platform gets the same bits. None for isotropic noise."""
    return None if relative_variance is None else 1.0 / np.sqrt(np.asarray(relative_variance, np.float64))


def log_det_relative(relative_variance: Sequence[float] | None) -> float:
    """sum_j log w_j: what diag(w) adds to the log-determinant of the covariance beyond d log sigma2."""
    return 0.0 if relative_variance is None else math.fsum(math.log(w) for w in relative_variance)


def log_normal_constant(sigma2: float, dims: int, relative_variance: Sequence[float] | None = None) -> float:
    """-log N(0; 0, sigma2 diag(w)) in `dims` dimensions: (d log 2 pi + d log sigma2 + sum log w) / 2."""
    return 0.5 * (dims * (LOG_2PI + math.log(sigma2)) + log_det_relative(relative_variance))
