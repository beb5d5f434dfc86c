"""Standardisation with the training rows' statistics, in float64: the first step of every score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from numpy.typing import NDArray

# The interquartile range of a standard normal, 2 * 0.6744897...: dividing by it makes a robust scale
# equal to the standard deviation on normally distributed columns.
IQR_OF_NORMAL = 1.3489795003921634


Scaling = Literal["robust", "standard"]
SCALINGS: tuple[Scaling, ...] = get_args(Scaling)


@dataclass(frozen=True)
class Scaler:
    """Standardisation fitted on the training rows: x_std = (x - mean) / scale, `mean` the centre the
    scaling chose (a median for "robust")."""

    mean: NDArray[np.float64]
    scale: NDArray[np.float64]

    @classmethod
    def fit(cls, x: NDArray[np.float64], scaling: Scaling = "standard") -> Scaler:
        """ "standard": the columns' means and standard deviations. "robust": their medians and
        interquartile ranges over 1.349 (a normal column's standard deviation), which a minority of
        rows cannot move: neither the unlabelled anomalies in training, which the standard deviation
        counts squared, nor a heavy tail's few large values, which compress every other row of their
        column towards one value. A column whose middle half is one value (a count mostly 0, a flag)
        has no interquartile range and keeps its standard deviation."""
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")
        spread = x.std(axis=0)
        if scaling == "standard":
            centre = x.mean(axis=0)
        else:
            low, centre, high = np.percentile(x, [25, 50, 75], axis=0)
            spread = np.where(high > low, (high - low) / IQR_OF_NORMAL, spread)
        # A constant column carries no information; scale 1 keeps it finite instead of dividing by 0.
        return cls(centre, np.where(spread > 0, spread, 1.0))

    def transform(self, x: NDArray[np.floating]) -> NDArray[np.float64]:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}
