"""Standardisation with the training rows' statistics, in float64: the first step of every score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Scaler:
    """Standardisation fitted on the training rows: x_std = (x - mean) / scale."""

    mean: NDArray[np.float64]
    scale: NDArray[np.float64]

    @classmethod
    def fit(cls, x: NDArray[np.float64]) -> Scaler:
        scale = x.std(axis=0)
        # A constant column carries no information; scale 1 keeps it finite instead of dividing by 0.
        return cls(x.mean(axis=0), np.where(scale > 0, scale, 1.0))

    def transform(self, x: NDArray[np.floating]) -> NDArray[np.float64]:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}
