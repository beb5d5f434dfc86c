"""Would a latent density fitted after training make the default ensemble's manifold factor better?

    .venv/bin/python benchmarks/latent_density.py ../shared/data/loda --out /tmp/latent [--jobs 2]

The WAE's MMD term pulls the encodings of the fitting rows towards the learned prior p(z), but only
approximately: the prior (four diagonal Gaussians at encoded pseudo-inputs) can be a coarse picture
of where the rows' encodings really lie, and the manifold factor -(log p(z) + log volume) inherits
that. Replacing p(z) by a density q(z) fitted to the encodings of the fitting rows (the decoder f with
the latent distribution the data actually induce, as two-stage VAEs do) keeps the likelihood a
density of x; whether it ranks anomalies better is measured here.

For each protocol, dataset and split, `evaluate`'s split, hold-out, default grid and fitting seed
(benchmarks/refits.py, seed 0) are fitted again; each member keeps the encodings of its fitting,
validation and test rows, the learned prior's log-density and the log volume of the held-out rows,
and their squared residuals per feature, in OUT/<protocol>/<dataset>-<split>.npz (a file already
there is reused). Every variant scores the same networks, the residual factor the product's
(per-feature variances from the validation rows), the combination the default rule; the manifold
factor is -(log q(z) + log volume) with q:
- `learned prior (the product)`,
- `mixture of K diagonal Gaussians, refitted`: EM (scikit-learn, seeded) on the fitting rows'
  encodings, K = 4 (the prior's own family and size), 8 or 16,
- `mixture of 8 full Gaussians, refitted`,
- `k-th nearest encoding`: log q(z) = -dim(z) log r_k(z) up to a constant, r_k the distance to the
  k-th nearest encoding of a fitting row (the k-nearest-neighbour density estimate of the same
  encodings), k = 1, 5, 10, 20 and sqrt(n) of n fitting rows; with the mean of the 5 distances
  instead; and with 1 024 or 256 of the fitting rows' encodings drawn at random as references, what
  a bundle could afford to carry;
and, the learned prior kept in the manifold factor, a third factor beside the two: the surprisal of
-log q(z) with q the k-th-nearest-encoding density, k = 5, 20 or sqrt(n).
Prints the mean test AUC over the datasets (each the mean of its splits) per protocol beside
Isolation Forest and kNN on the same splits, and per variant against the product's: datasets better
and worse, Wilcoxon signed-rank p.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.bundle.ensemble import FACTOR_FISHER, member_scores
from app.train.evaluate import Dataset
from app.train.fit import RELATIVE_VARIANCE_FLOOR, SIGMA2_FLOOR, score_rows
from app.train.selection import auc
from benchmarks.refits import compare, fit_default, fit_every_split, fits_parser, squared_residuals

Array = NDArray[np.float64]
PARTS = ("fit", "val", "test")


def fit_split(dataset: Dataset, split: int, protocol: str, path: Path) -> None:
    fitted = fit_default(dataset, split, protocol, seed=0)
    arrays = dict(fitted.arrays)
    rows = {"fit": fitted.x_fit} | fitted.held
    for i, model in enumerate(fitted.members):
        for part, x in rows.items():
            with torch.no_grad():
                arrays[f"{part}/{i}/z"] = model.encoder(torch.as_tensor(x, dtype=torch.float32)).numpy()
            arrays[f"{part}/{i}/e2"] = squared_residuals(model, x).astype(np.float32)
            if part != "fit":
                parts = score_rows(model, x, "likelihood")
                arrays[f"{part}/{i}/log_prior"] = parts["log_prior"]
                arrays[f"{part}/{i}/log_volume"] = parts["log_volume"]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def _mixture(components: int, covariance: str) -> Callable[[dict[str, Array]], dict[str, Array]]:
    def density(z: dict[str, Array]) -> dict[str, Array]:
        mixture = GaussianMixture(components, covariance_type=covariance, random_state=0, reg_covar=1e-6)
        mixture.fit(z["fit"])
        return {part: mixture.score_samples(z[part]) for part in ("val", "test")}

    return density


def _neighbours(
    k: int | None, references: int | None = None, mean: bool = False
) -> Callable[[dict[str, Array]], dict[str, Array]]:
    """log q(z) = -dim log r(z) up to a constant: r the distance to the k-th nearest encoding of a fitting
    row (of `references` of them drawn at random, when there are more), or the mean of the k distances;
    k=None: the textbook k = sqrt(n) of n references."""

    def density(z: dict[str, Array]) -> dict[str, Array]:
        fit = z["fit"]
        if references is not None and fit.shape[0] > references:
            fit = fit[np.random.default_rng(0).choice(fit.shape[0], references, replace=False)]
        index = NearestNeighbors(n_neighbors=k or round(np.sqrt(fit.shape[0]))).fit(fit)
        distances = {part: index.kneighbors(z[part])[0] for part in ("val", "test")}
        r = {part: d.mean(axis=1) if mean else d[:, -1] for part, d in distances.items()}
        return {part: -fit.shape[1] * np.log(r[part] + 1e-12) for part in r}

    return density


Density = Callable[[dict[str, Array]], dict[str, Array]]
# name -> (q in the manifold factor, None: the learned prior; a third factor's q, None: no third)
VARIANTS: dict[str, tuple[Density | None, Density | None]] = {
    "learned prior (the product)": (None, None),
    "mixture of 4 diagonal, refitted": (_mixture(4, "diag"), None),
    "mixture of 8 diagonal, refitted": (_mixture(8, "diag"), None),
    "mixture of 16 diagonal, refitted": (_mixture(16, "diag"), None),
    "mixture of 8 full, refitted": (_mixture(8, "full"), None),
    "nearest encoding": (_neighbours(1), None),
    "5th nearest encoding": (_neighbours(5), None),
    "10th nearest encoding": (_neighbours(10), None),
    "20th nearest encoding": (_neighbours(20), None),
    "sqrt(n)-th nearest encoding": (_neighbours(None), None),
    "5 nearest encodings, mean distance": (_neighbours(5, mean=True), None),
    "5th nearest of 1 024 encodings": (_neighbours(5, references=1024), None),
    "5th nearest of 256 encodings": (_neighbours(5, references=256), None),
    "prior; 3rd factor 5th nearest": (None, _neighbours(5)),
    "prior; 3rd factor 20th nearest": (None, _neighbours(20)),
    "prior; 3rd factor sqrt(n)-th": (None, _neighbours(None)),
}


def ensemble_auc(z: np.lib.npyio.NpzFile, variant: str) -> float:
    density, third = VARIANTS[variant]
    references, values = [], []
    for i in sorted({int(k.split("/")[1]) for k in z.files if k.startswith("val/")}):
        v = z[f"val/{i}/e2"].astype(np.float64).mean(axis=0)
        v = np.maximum(v, max(RELATIVE_VARIANCE_FLOOR * v.mean(), SIGMA2_FLOOR))
        encodings = {part: z[f"{part}/{i}/z"].astype(np.float64) for part in PARTS}
        if density is None:
            log_q = {part: z[f"{part}/{i}/log_prior"] for part in ("val", "test")}
        else:
            log_q = density(encodings)
        terms = {
            part: {
                "m": -(log_q[part] + z[f"{part}/{i}/log_volume"]),
                "r": (z[f"{part}/{i}/e2"] / v).sum(axis=1),
            }
            for part in ("val", "test")
        }
        if third is not None:
            for part, log_density in third(encodings).items():
                terms[part]["q"] = -log_density
        references.append(terms["val"])
        values.append(terms["test"])
    return auc(z["y_test"], member_scores(FACTOR_FISHER, references, values).mean(axis=1))


def main() -> None:
    parser = fits_parser(__doc__, "encodings")
    args = parser.parse_args()
    datasets = fit_every_split(fit_split, args.root, args.out, args.jobs)
    compare(args.out, datasets, lambda z: {variant: ensemble_auc(z, variant) for variant in VARIANTS})


if __name__ == "__main__":
    main()
