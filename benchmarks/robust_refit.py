"""A second fit without the rows the first fit finds most anomalous: does it spare the residual?

    .venv/bin/python benchmarks/robust_refit.py ../shared/data/loda --out /tmp/refit [--jobs 2]

Under contamination the residual factor is what the unlabelled training anomalies spoil (the
autoencoder learns to reconstruct them), while the manifold factor alone scores above Isolation
Forest. The default ensemble already ranks anomalies far better than a per-batch reconstruction
loss does (what `--trim` leaves out), so: fit the default grid, score the fitting rows with the
ensemble (each member's factors as surprisals among its validation values, the default rule), leave
out the share q of the fitting rows it scores highest, and fit the same grid again, same seed, on
the rest. Validation rows (noise variances, references) and test rows stay as they were.

For each protocol, dataset and split, `evaluate`'s split, hold-out, default grid and fitting seed
(benchmarks/refits.py, seed 0) are fitted once and then again for q = 0.05 and 0.1; each fit keeps
its members' manifold factor and squared residuals per feature on the validation and test rows in
OUT/<protocol>/<dataset>-<split>.npz (a file already there is reused). Prints the mean test AUC over
the datasets (each the mean of its splits) per protocol, the first fit (the product) and each
refit, beside Isolation Forest and kNN on the same splits, and per refit against the first fit:
datasets better and worse, Wilcoxon signed-rank p.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.bundle.ensemble import FACTOR_FISHER, member_scores
from app.model.manifold import ManifoldModel
from app.train.evaluate import PROTOCOLS, Dataset, EvaluateOptions, fitting
from app.train.fit import RELATIVE_VARIANCE_FLOOR, SIGMA2_FLOOR, fit_candidates, score_rows
from app.train.options import GRIDS, expand_grid
from app.train.selection import auc
from benchmarks.refits import SPLITS, compare, fit_default, fit_every_split, fits_parser, squared_residuals

SHARES = (0.05, 0.1)
Terms = dict[str, NDArray[np.float64]]


def _terms(model: ManifoldModel, rows: dict[str, NDArray[np.float64]]) -> dict[str, Terms]:
    """Per part of the rows: the manifold factor and the residual with the product's per-feature
    noise variances (each feature's mean squared residual on the validation rows, floored)."""
    e2 = {part: squared_residuals(model, x) for part, x in rows.items()}
    v = e2["val"].mean(axis=0)
    v = np.maximum(v, max(RELATIVE_VARIANCE_FLOOR * v.mean(), SIGMA2_FLOOR))
    out = {}
    for part, x in rows.items():
        parts = score_rows(model, x, "likelihood")
        out[part] = {"m": -(parts["log_prior"] + parts["log_volume"]), "r": (e2[part] / v).sum(axis=1)}
    return out


def _ensemble(
    members: list[dict[str, Terms]], part: str, combination: str = FACTOR_FISHER
) -> NDArray[np.float64]:
    """The members' scores of rows `part` combined; FACTOR_FISHER, the default of session 15's study."""
    references = [terms["val"] for terms in members]
    return member_scores(combination, references, [terms[part] for terms in members]).mean(axis=1)


def fit_split(dataset: Dataset, split: int, protocol: str, path: Path) -> None:
    first = fit_default(dataset, split, protocol, seed=0)
    rows = {"fit": first.x_fit} | first.held
    arrays: dict[str, NDArray[Any]] = dict(first.arrays)
    members = [_terms(model, rows) for model in first.members]
    arrays["q0/test"] = _ensemble(members, "test")
    fit_scores = _ensemble(members, "fit")
    options = EvaluateOptions(candidates=tuple(expand_grid(GRIDS["default"], dataset.normal.shape[1])))
    fit = replace(options.fit, seed=split)  # refits.py's seed 0: the first fit's
    for share in SHARES:
        keep = fit_scores <= np.quantile(fit_scores, 1 - share)
        refitted = fit_candidates(first.x_fit[keep], fitting(dataset, options), fit)
        terms = [_terms(member.model.eval(), first.held) for member in refitted]
        arrays[f"q{share}/test"] = _ensemble(terms, "test")
        arrays[f"q{share}/left_out_anomalies"] = np.array([(~keep & first.y_fit).sum(), first.y_fit.sum()])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def left_out(out: Path, datasets: list[Dataset]) -> None:
    """How many of the fitting rows' anomalies each share left out, over every dataset and split."""
    for protocol in PROTOCOLS:
        files = [
            np.load(out / protocol / f"{d.name}-{split}.npz") for d in datasets for split in range(SPLITS)
        ]
        for share in SHARES:
            left, total = np.sum([z[f"q{share}/left_out_anomalies"] for z in files], axis=0)
            print(f"{protocol}: the top {share:.0%} left out {left} of the fitting rows' {total} anomalies")


def main() -> None:
    parser = fits_parser(__doc__)
    args = parser.parse_args()
    datasets = fit_every_split(fit_split, args.root, args.out, args.jobs)
    names = {"q0": "one fit (the product)"} | {f"q{s}": f"refit without the top {s:.0%}" for s in SHARES}
    compare(
        args.out,
        datasets,
        lambda z: {name: auc(z["y_test"], z[f"{key}/test"]) for key, name in names.items()},
    )
    left_out(args.out, datasets)


if __name__ == "__main__":
    main()
