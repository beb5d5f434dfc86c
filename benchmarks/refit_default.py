"""The default detector fitted again with other seeds: how far its mean test AUC moves on its own.

    .venv/bin/python benchmarks/refit_default.py ../shared/data/loda --out /tmp/refit-default [--seeds 0 1 2]

For each protocol, dataset and split, `evaluate`'s split, hold-out and default grid (the product's
scaling and noise) are fitted once per seed: seed 0 with `evaluate`'s fitting seed (the split's
number, so it reproduces the committed ensembles.csv's `likelihood`), seed s with `split + 100 s`
(benchmarks/refits.py). Each fit's ensemble test scores, and those of every seed's members pooled
into one ensemble, go to OUT/<protocol>/<dataset>-<split>.npz (a file already there is reused).
Combined as the product's default (factor_fisher_tail; files written before session 18 hold
factor_fisher's scores and are reused as they are: pass a new --out to refit). Prints the mean test
AUC over the datasets per protocol: each seed, the pool, and Isolation Forest
and kNN on the same splits (kNN also on the networks' scaling), and each against seed 0 per
dataset: whether a margin between the default and a baseline outlasts a refit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.bundle.ensemble import FISHER_TAIL
from app.train.evaluate import Dataset
from app.train.selection import auc
from benchmarks.refits import compare, fit_default, fit_every_split, fits_parser
from benchmarks.robust_refit import _ensemble, _terms


def fit_split(dataset: Dataset, split: int, protocol: str, seeds: list[int], path: Path) -> None:
    arrays: dict[str, NDArray[Any]] = {}
    pooled = []
    for seed in seeds:
        fitted = fit_default(dataset, split, protocol, seed=seed)
        members = [_terms(model, fitted.held) for model in fitted.members]
        arrays[f"seed{seed}/test"] = _ensemble(members, "test", FISHER_TAIL)
        arrays |= fitted.arrays  # the same split, test labels and baselines for every seed
        pooled += members
    arrays["pooled/test"] = _ensemble(pooled, "test", FISHER_TAIL)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def main() -> None:
    parser = fits_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    datasets = fit_every_split(fit_split, args.root, args.out, args.jobs, args.seeds)
    keys = [f"seed{s}" for s in args.seeds] + ["pooled"]
    compare(args.out, datasets, lambda z: {key: auc(z["y_test"], z[f"{key}/test"]) for key in keys})


if __name__ == "__main__":
    main()
