"""Gross values among the training rows, under either scaling: what the detector still catches.

    .venv/bin/python benchmarks/gross_values.py [--magnitudes 20 1e4 1e8] [--steps 1000]

A synthetic table (seeded): 4 000 training rows of ten features near a 3-d manifold and a count
(Poisson, mean 20); 500 normal test rows, 25 with counts of 40 to 59 and 25 pushed off the manifold
(N(0, 0.4) in each of the ten features). For each magnitude, 1% of the training rows get that
count (20: none is gross), and one model (`grid=None`, `--steps` steps) is trained with each
scaling. Prints the test AUC over all anomalies, over the count anomalies and over the off-manifold
ones, and the share flagged at a 5% false-positive rate. Then a column of spread 1e-3 whose 1.3%
of training rows hold 1e14, about 1e17 interquartile ranges out.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.detector import ManifoldDetector
from app.train.selection import auc


def table(rng: np.random.Generator, n: int) -> pd.DataFrame:
    mixing = np.random.default_rng(1).normal(size=(3, 10))
    x = np.tanh(rng.normal(size=(n, 3))) @ mixing + 0.1 * rng.normal(size=(n, 10))
    return pd.DataFrame(np.c_[x, rng.poisson(20, n)], columns=[*(f"f{i}" for i in range(10)), "count"])


def report(name: str, detector: ManifoldDetector, test: pd.DataFrame, parts: dict[str, np.ndarray]) -> None:
    scores, flagged = detector.anomaly_score(test), detector.predict(test) == -1
    normal = parts["normal"]
    anomalous = np.any([rows for key, rows in parts.items() if key != "normal"], axis=0)
    figures = {
        key: auc(np.r_[np.zeros(normal.sum()), np.ones(rows.sum())], np.r_[scores[normal], scores[rows]])
        for key, rows in parts.items()
        if key != "normal"
    }
    shown = ", ".join(f"{key} {value:.3f}" for key, value in figures.items())
    print(
        f"{name:34s} AUC {shown}; flagged: normal {flagged[normal].mean():.3f}, "
        f"anomalies {flagged[anomalous].mean():.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--magnitudes", type=float, nargs="+", default=[20, 1e4, 1e8])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # the calibration notes of a small table
    rng = np.random.default_rng(7)
    train, test = table(rng, 4000), table(rng, 550)
    test.loc[500:524, "count"] = rng.integers(40, 60, 25)
    test.iloc[525:, :10] += rng.normal(0, 0.4, size=(25, 10))
    rows = np.arange(550)
    parts = {
        "normal": rows < 500,
        "all": rows >= 500,
        "count": (rows >= 500) & (rows < 525),
        "off-manifold": rows >= 525,
    }
    for magnitude in args.magnitudes:
        spoiled = train.copy()
        spoiled.loc[: len(train) // 100 - 1, "count"] = magnitude
        for scaling in ("robust", "standard"):
            detector = ManifoldDetector(grid=None, steps=args.steps, scaling=scaling, fpr=0.05).fit(spoiled)
            report(f"1% of counts at {magnitude:g}, {scaling}", detector, test, parts)
    tiny = train.copy()
    tiny["count"] = rng.normal(0, 1e-3, len(train))
    tiny.loc[: 13 * len(train) // 1000, "count"] = 1e14
    test_tiny = test.copy()
    test_tiny["count"] = rng.normal(0, 1e-3, len(test))
    off = {"normal": parts["normal"], "off-manifold": parts["off-manifold"]}
    for scaling in ("robust", "standard"):
        detector = ManifoldDetector(grid=None, steps=args.steps, scaling=scaling, fpr=0.05).fit(tiny)
        report(f"spread 1e-3, 1.3% at 1e14, {scaling}", detector, test_tiny, off)


if __name__ == "__main__":
    main()
