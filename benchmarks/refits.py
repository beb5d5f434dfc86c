"""How far a refit moves the default ensemble's AUC, and what a per-feature residual would gain.

    .venv/bin/python benchmarks/refits.py ../shared/data/loda --out /tmp/refits [--seeds 0 1 2] [--jobs 2]

For each protocol, dataset, split and seed, `evaluate`'s split, hold-out and default grid are
fitted again: seed 0 with `evaluate`'s fitting seed (the split's number, so it reproduces the
committed `ensembles.csv`), seed s with `split + 100 s`. Each member keeps, for its validation and
test rows, the two factors the default combination ranks (manifold, residual) and a residual with
one noise variance per feature, sum_j e_j^2 / s_j^2, s_j^2 the member's mean squared residual of
feature j on its fitting rows, in OUT/<protocol>/<dataset>-<split>-s<seed>.npz (a file already
there is reused, so a stopped run resumes). Prints, per protocol, the mean test AUC over datasets
(each the mean over its splits) of the default combination with either residual, per seed and
with every seed's members pooled into one ensemble, beside Isolation Forest and kNN on the same
splits; and, per dataset averaged over seeds, how often and how surely (Wilcoxon) the per-feature
residual beats the product's. docs/evaluation.md, "Refits and a per-feature residual", is its output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.stats import wilcoxon

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.bundle.ensemble import FISHER_TAIL, member_scores
from app.model.manifold import ManifoldModel
from app.train.evaluate import (
    PROTOCOLS,
    Dataset,
    EvaluateOptions,
    fitting,
    load_datasets,
    protocol_baselines,
    protocol_split,
    stratified_holdout,
)
from app.train.fit import SIGMA2_FLOOR, fit_candidates, score_rows
from app.train.options import GRIDS, expand_grid
from app.train.selection import auc

SPLITS = 5
RESIDUALS = {"product": "residual", "per-feature": "per_feature"}


def squared_residuals(model: ManifoldModel, x: NDArray[np.float64]) -> NDArray[np.float64]:
    with torch.no_grad():
        rows = torch.as_tensor(x, dtype=torch.float32)
        return (rows - model.decoder(model.encoder(rows))).double().numpy() ** 2


@dataclass
class FittedSplit:
    x_fit: NDArray[np.float64]
    y_fit: NDArray[np.bool_]  # which fitting rows are anomalies (never used in fitting)
    held: dict[str, NDArray[np.float64]]  # "val" and "test" rows
    members: list[ManifoldModel]
    arrays: dict[str, NDArray[Any]]  # y_test and each baseline's test scores, "baseline/<name>"


def fit_default(
    dataset: Dataset,
    split: int,
    protocol: str,
    seed: int,
    steps: int | None = None,
) -> FittedSplit:
    """The default grid fitted on `evaluate`'s split and hold-out, with the fitting seed of refit `seed`
    (and `steps` optimiser steps instead of the default's)."""
    torch.set_num_threads(1)  # one process per core
    options = EvaluateOptions(candidates=tuple(expand_grid(GRIDS["default"], dataset.normal.shape[1])))
    data = protocol_split(dataset, seed=split, contamination=PROTOCOLS[protocol], scaling=options.fit.scaling)
    fit_rows, val_rows = stratified_holdout(data.y_train, options.val_fraction, seed=split)
    x_fit = data.x_train[fit_rows]
    fit = replace(options.fit, seed=split + 100 * seed, steps=steps or options.fit.steps)
    fitted = fit_candidates(x_fit, fitting(dataset, options), fit)
    arrays: dict[str, NDArray[Any]] = {"y_test": data.y_test}
    baselines = protocol_baselines(dataset, split, PROTOCOLS[protocol], options, data)
    arrays |= {f"baseline/{name}": scores for name, scores in baselines.items()}
    members = [member.model.eval() for member in fitted]
    held = {"val": data.x_train[val_rows], "test": data.x_test}
    return FittedSplit(x_fit, data.y_train[fit_rows], held, members, arrays)


def fit_split(dataset: Dataset, split: int, protocol: str, seed: int, path: Path) -> None:
    fitted = fit_default(dataset, split, protocol, seed)
    x_fit, held, arrays = fitted.x_fit, fitted.held, fitted.arrays
    for i, model in enumerate(fitted.members):
        variance = np.maximum(squared_residuals(model, x_fit).mean(axis=0), SIGMA2_FLOOR)
        for part, x in held.items():
            parts = score_rows(model, x, "likelihood")
            arrays[f"{part}/{i}/manifold"] = -(parts["log_prior"] + parts["log_volume"])
            arrays[f"{part}/{i}/residual"] = -parts["log_residual"]
            arrays[f"{part}/{i}/per_feature"] = (squared_residuals(model, x) / variance).sum(axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def run_fits(fit: Callable[..., None], tasks: Iterable[tuple[Any, ...]], jobs: int) -> None:
    """fit(*task) in `jobs` processes for each task, (dataset, ..., output path), whose output is not
    there yet (so a stopped run resumes); the largest datasets first, so that no process is left
    with a long one at the end."""
    todo = [task for task in sorted(tasks, key=lambda task: -task[0].rows) if not task[-1].exists()]
    with ProcessPoolExecutor(jobs) as pool:
        for done, _ in enumerate(pool.map(fit, *zip(*todo, strict=True)) if todo else [], 1):
            print(f"\r{done}/{len(todo)} fits", end="", file=sys.stderr, flush=True)


def fits_parser(doc: str, kept: str = "scores") -> argparse.ArgumentParser:
    """The arguments every refitting benchmark takes: the Loda folder, --out for what it keeps (a
    run stopped midway resumes there) and --jobs."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("root", help="the Loda datasets' folder")
    parser.add_argument("--out", type=Path, required=True, help=f"where the kept {kept} go")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one fit each")
    return parser


def fit_every_split(fit: Callable[..., None], root: str, out: Path, jobs: int, *extra: Any) -> list[Dataset]:
    """fit(dataset, split, protocol, *extra, path) for every protocol, dataset and split of the Loda
    folder `root`, path OUT/<protocol>/<dataset>-<split>.npz (run_fits: a file already there is
    reused); returns the datasets."""
    datasets = load_datasets(root)
    tasks = (
        (dataset, split, protocol, *extra, out / protocol / f"{dataset.name}-{split}.npz")
        for protocol in PROTOCOLS
        for dataset in datasets
        for split in range(SPLITS)
    )
    run_fits(fit, tasks, jobs)
    return datasets


def compare(
    out: Path, datasets: list[Dataset], aucs: Callable[[np.lib.npyio.NpzFile], dict[str, float]]
) -> None:
    """Per protocol, the mean test AUC over the datasets (each the mean of its splits) of the baselines
    kept (Isolation Forest, kNN) and each variant `aucs` gives for a file of fit_every_split's, the
    first variant the product's; and each other variant against it per dataset: better, worse,
    Wilcoxon signed-rank p."""
    for protocol in PROTOCOLS:
        figures: dict[str, dict[str, list[float]]] = {}  # figure -> dataset -> AUCs over splits
        variants: list[str] = []
        for dataset in datasets:
            for split in range(SPLITS):
                z = np.load(out / protocol / f"{dataset.name}-{split}.npz")
                row = aucs(z)
                variants = list(row)
                baselines = [key.split("/", 1)[1] for key in z.files if key.startswith("baseline/")]
                row = {name: auc(z["y_test"], z[f"baseline/{name}"]) for name in baselines} | row
                for name, value in row.items():
                    figures.setdefault(name, {}).setdefault(dataset.name, []).append(value)
        means = {name: np.array([np.mean(v) for v in by.values()]) for name, by in figures.items()}
        product = means[variants[0]]
        print(f"\n{protocol}: mean test AUC over {len(datasets)} datasets, {SPLITS} splits each")
        for name, per_dataset in means.items():
            # closer than this: one AUC summed in two orders, a tie
            difference = np.where(np.abs(per_dataset - product) < 1e-9, 0.0, per_dataset - product)
            versus = ""
            if name in variants[1:] and difference.any():
                versus = (
                    f"  better on {int((difference > 0).sum())}, worse on {int((difference < 0).sum())}, "
                    f"Wilcoxon p = {wilcoxon(difference).pvalue:.3f}"
                )
            print(f"  {name:34s} {per_dataset.mean():.4f}{versus}")
            print("    " + " ".join(f"{value:.3f}" for value in per_dataset))


def ensemble_auc(kept: list[np.lib.npyio.NpzFile], residual: str) -> float:
    """The default combination's test AUC over the members of every file in `kept`."""
    references, values = [], []
    for z in kept:
        for i in sorted({int(k.split("/")[1]) for k in z.files if k.startswith("val/")}):
            references.append({"m": z[f"val/{i}/manifold"], "r": z[f"val/{i}/{residual}"]})
            values.append({"m": z[f"test/{i}/manifold"], "r": z[f"test/{i}/{residual}"]})
    return auc(kept[0]["y_test"], member_scores(FISHER_TAIL, references, values).mean(axis=1))


def report(out: Path, datasets: list[Dataset], seeds: list[int]) -> None:
    for protocol in PROTOCOLS:
        # figure -> dataset -> AUCs over splits
        figures: dict[str, dict[str, list[float]]] = {}
        for dataset in datasets:
            for split in range(SPLITS):
                kept = [np.load(out / protocol / f"{dataset.name}-{split}-s{s}.npz") for s in seeds]
                row = {
                    name: auc(kept[0]["y_test"], kept[0][f"baseline/{name}"]) for name in ("iforest", "knn")
                }
                for label, key in RESIDUALS.items():
                    row |= {
                        f"{label}, seed {s}": ensemble_auc([z], key) for s, z in zip(seeds, kept, strict=True)
                    }
                    row[f"{label}, pooled"] = ensemble_auc(kept, key)
                for name, value in row.items():
                    figures.setdefault(name, {}).setdefault(dataset.name, []).append(value)
        means = {name: np.array([np.mean(v) for v in by.values()]) for name, by in figures.items()}
        print(f"\n{protocol}: mean test AUC over {len(datasets)} datasets, {SPLITS} splits each")
        for name, per_dataset in means.items():
            print(f"  {name:28s} {per_dataset.mean():.4f}")
        product = np.mean([means[f"product, seed {s}"] for s in seeds], axis=0)
        per_feature = np.mean([means[f"per-feature, seed {s}"] for s in seeds], axis=0)
        # AUCs are multiples of 1 / (anomalies x normals), far above this: closer means are one AUC
        # summed in two orders (haberman's four test anomalies often tie), and count as ties.
        difference = np.where(np.abs(per_feature - product) < 1e-9, 0.0, per_feature - product)
        p = wilcoxon(difference).pvalue if difference.any() else 1.0
        print(
            f"  per-feature residual against the product's, each dataset averaged over the seeds: better "
            f"on {int((difference > 0).sum())}, worse on {int((difference < 0).sum())}, tied on "
            f"{int((difference == 0).sum())}; Wilcoxon p = {p:.3f} (ties left out)"
        )


def main() -> None:
    parser = fits_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    datasets = load_datasets(args.root)
    run_fits(
        fit_split,
        (
            (dataset, split, protocol, seed, args.out / protocol / f"{dataset.name}-{split}-s{seed}.npz")
            for seed in args.seeds
            for protocol in PROTOCOLS
            for dataset in datasets
            for split in range(SPLITS)
        ),
        args.jobs,
    )
    report(args.out, datasets, args.seeds)


if __name__ == "__main__":
    main()
