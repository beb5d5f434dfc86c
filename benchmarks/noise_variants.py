"""Ways to estimate the residual's per-feature noise variances, measured on the default ensemble.

    .venv/bin/python benchmarks/noise_variants.py ../shared/data/loda --out /tmp/noise [--jobs 2] [--steps N]

For each protocol, dataset and split, `evaluate`'s split, hold-out, default grid and fitting seed
(benchmarks/refits.py, seed 0) are fitted again, and each member keeps its manifold factor and its
squared residuals per feature on the fitting, validation and test rows, in
OUT/<protocol>/<dataset>-<split>.npz (a file already there is reused). Fitting does not depend on
the noise, so every variance estimate below scores the same networks: the residual factor
sum_j e_j^2 / v_j with v_j each feature's
- `validation mean` (the product: its mean squared residual on the validation rows),
- `isotropic` (the paper's sigma^2 I),
- `validation median`: the median over the validation rows / 0.4549 (a chi-square(1)'s median), which
  a minority of anomalous rows cannot move as they move the mean,
- `validation, worst tenth left out`: the mean without the rows of the largest total residual,
- `fitting mean`, `fitting median`: the same on the fitting rows,
each floored at 1/100 of the features' mean as the product floors it, combined by the default rule.
Prints the mean test AUC over the datasets (each the mean of its splits) per protocol, beside
Isolation Forest and kNN on the same splits, and per variant against the product's: datasets better
and worse, Wilcoxon signed-rank p. docs/evaluation.md, "Robust noise variances", is its output;
with `--steps 500` (another --out), "Fewer steps, with the factor rule".
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.bundle.ensemble import FACTOR_FISHER, member_scores
from app.train.evaluate import Dataset
from app.train.fit import RELATIVE_VARIANCE_FLOOR, SIGMA2_FLOOR, score_rows
from app.train.selection import auc
from benchmarks.refits import compare, fit_default, fit_every_split, fits_parser, squared_residuals

CHI2_1_MEDIAN = 0.454936  # scipy.stats.chi2(1).median()


def _trimmed(e2: NDArray[np.float64]) -> NDArray[np.float64]:
    total = (e2 / e2.mean(axis=0)).sum(axis=1)
    return e2[total <= np.quantile(total, 0.9)].mean(axis=0)


VARIANTS: dict[str, tuple[str, Callable[[NDArray[np.float64]], NDArray[np.float64]]]] = {
    "validation mean (the product)": ("val", lambda e2: e2.mean(axis=0)),
    "isotropic": ("val", lambda e2: np.ones(e2.shape[1])),
    "validation median": ("val", lambda e2: np.median(e2, axis=0) / CHI2_1_MEDIAN),
    "validation, worst tenth left out": ("val", _trimmed),
    "fitting mean": ("fit", lambda e2: e2.mean(axis=0)),
    "fitting median": ("fit", lambda e2: np.median(e2, axis=0) / CHI2_1_MEDIAN),
}


def fit_split(dataset: Dataset, split: int, protocol: str, steps: int | None, path: Path) -> None:
    fitted = fit_default(dataset, split, protocol, seed=0, steps=steps)
    arrays = dict(fitted.arrays)
    for i, model in enumerate(fitted.members):
        arrays[f"fit/{i}/e2"] = squared_residuals(model, fitted.x_fit).astype(np.float32)
        for part, x in fitted.held.items():
            parts = score_rows(model, x, "likelihood")
            arrays[f"{part}/{i}/manifold"] = -(parts["log_prior"] + parts["log_volume"])
            arrays[f"{part}/{i}/e2"] = squared_residuals(model, x).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def ensemble_auc(z: np.lib.npyio.NpzFile, variant: str) -> float:
    rows, estimate = VARIANTS[variant]
    references, values = [], []
    for i in sorted({int(k.split("/")[1]) for k in z.files if k.startswith("val/")}):
        v = estimate(z[f"{rows}/{i}/e2"].astype(np.float64))
        v = np.maximum(v, max(RELATIVE_VARIANCE_FLOOR * v.mean(), SIGMA2_FLOOR))
        references.append({"m": z[f"val/{i}/manifold"], "r": (z[f"val/{i}/e2"] / v).sum(axis=1)})
        values.append({"m": z[f"test/{i}/manifold"], "r": (z[f"test/{i}/e2"] / v).sum(axis=1)})
    return auc(z["y_test"], member_scores(FACTOR_FISHER, references, values).mean(axis=1))


def main() -> None:
    parser = fits_parser(__doc__, "residuals")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the product's)")
    args = parser.parse_args()
    datasets = fit_every_split(fit_split, args.root, args.out, args.jobs, args.steps)
    compare(args.out, datasets, lambda z: {variant: ensemble_auc(z, variant) for variant in VARIANTS})


if __name__ == "__main__":
    main()
