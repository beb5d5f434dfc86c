"""Other ways of combining an ensemble's members, measured on scores `evaluate --keep-scores` kept.

    .venv/bin/anomaly-scores evaluate ../shared/data/loda --keep-scores --out /tmp/loda
    .venv/bin/python benchmarks/combinations.py /tmp/loda/contaminated/scores /tmp/loda/clean/scores

Prints, per folder, the mean test AUC over each dataset's splits of every rule below, then the
mean over datasets, beside kNN and Isolation Forest on the same splits. Every rule puts a member's
test values of a term on the scale of its own validation values (a surprisal, -log of the
conformal p-value, as the product's factor_fisher does, or a rank) and averages the members; a
member whose validation values of a term are not all finite (a diverged fit) sits that term out,
as in `evaluate`. No network is refitted: a rule costs seconds.

Terms (app.bundle.ensemble.terms, higher = more anomalous): `likelihood` is -log p(x);
`likelihood.manifold` -(log prior + log volume) at the encoder's z and `likelihood.residual` the
residual's -log density; `latent` the prior term alone, so `volume` = manifold - latent is
-log volume; `projected.*` the same factors at the projection's z.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.bundle.ensemble import ranks, surprisal
from app.train.selection import auc

Terms = dict[str, list[NDArray[np.float64]]]  # term -> one array of values per member
MANIFOLD, RESIDUAL = "likelihood.manifold", "likelihood.residual"


def load(path: Path) -> tuple[NDArray[np.bool_], dict[str, NDArray[np.float64]], Terms, Terms]:
    """A kept split: test labels, baseline test scores, members' validation and test terms."""
    kept = np.load(path)
    members = sorted({int(k.split("/")[1]) for k in kept.files if k.startswith("val/")})
    names = sorted({k.split("/", 2)[2] for k in kept.files if k.startswith("val/0/")})
    val = {t: [kept[f"val/{i}/{t}"] for i in members] for t in names}
    test = {t: [kept[f"test/{i}/{t}"] for i in members] for t in names}
    for terms in (val, test):
        terms["volume"] = [m - p for m, p in zip(terms[MANIFOLD], terms["latent"], strict=True)]
    baselines = {k.split("/")[1]: kept[k] for k in kept.files if k.startswith("baseline/")}
    return kept["y_test"], baselines, val, test


def scaled(statistic: Callable[..., NDArray[np.float64]], val: Terms, test: Terms, term: str) -> NDArray:
    """(members, rows): each member's test values of `term` against its validation values."""
    return np.stack(
        [
            statistic(v, x) if np.isfinite(v).all() else np.full(x.shape, np.nan)
            for v, x in zip(val[term], test[term], strict=True)
        ]
    )


def s(val: Terms, test: Terms, term: str) -> NDArray[np.float64]:
    return scaled(surprisal, val, test, term)


RULES: dict[str, Callable[[Terms, Terms], NDArray[np.float64]]] = {
    "manifold + residual surprisals (the default)": lambda v, x: s(v, x, MANIFOLD) + s(v, x, RESIDUAL),
    "max of the two surprisals (Tippett)": lambda v, x: np.maximum(s(v, x, MANIFOLD), s(v, x, RESIDUAL)),
    "median over members, not the mean": lambda v, x: np.nanmedian(s(v, x, MANIFOLD) + s(v, x, RESIDUAL), 0),
    "manifold surprisal alone": lambda v, x: s(v, x, MANIFOLD),
    "residual surprisal alone": lambda v, x: s(v, x, RESIDUAL),
    "manifold + residual / 2": lambda v, x: s(v, x, MANIFOLD) + 0.5 * s(v, x, RESIDUAL),
    "prior + manifold + residual": lambda v, x: s(v, x, "latent") + s(v, x, MANIFOLD) + s(v, x, RESIDUAL),
    "prior + volume + residual": lambda v, x: s(v, x, "latent") + s(v, x, "volume") + s(v, x, RESIDUAL),
    "prior + residual (no volume)": lambda v, x: s(v, x, "latent") + s(v, x, RESIDUAL),
    "-log volume alone": lambda v, x: s(v, x, "volume"),
    "encoder: manifold + residual": lambda v, x: s(v, x, "encoder.manifold") + s(v, x, "encoder.residual"),
    "projected: manifold + residual": lambda v, x: (
        s(v, x, "projected.manifold") + s(v, x, "projected.residual")
    ),
    "-log p(x) ranked whole (rank_mean)": lambda v, x: scaled(ranks, v, x, "likelihood"),
}


AUCs = dict[str, dict[str, list[float]]]  # detector -> dataset -> test AUC per split


def kept_splits(folder: Path) -> Iterator[tuple[str, str, NDArray[np.bool_], AUCs, Terms, Terms]]:
    """(dataset, split, test labels, empty AUC record, validation terms, test terms) per kept split;
    the record already holds the baselines' AUCs."""
    paths = sorted(folder.glob("*.npz"))
    if not paths:
        raise SystemExit(f"{folder}: no kept scores (run evaluate --keep-scores)")
    for path in paths:
        match = re.fullmatch(r"(.*)-(\d+)\.npz", path.name)
        if match is None:
            continue
        dataset, split = match.groups()
        y, baselines, val, test = load(path)
        record: AUCs = {name: {dataset: [auc(y, values)]} for name, values in baselines.items()}
        yield dataset, split, y, record, val, test


def merge(into: AUCs, record: AUCs) -> None:
    for name, per in record.items():
        for dataset, values in per.items():
            into.setdefault(name, {}).setdefault(dataset, []).extend(values)


def markdown(label: str, aucs: AUCs) -> str:
    """Mean test AUC per dataset and over datasets; n/a where a detector has no split of a dataset."""
    datasets = sorted({d for per in aucs.values() for d in per})
    lines = [f"| {label} | {' | '.join(datasets)} | mean |", "|---|" + "---|" * (len(datasets) + 1)]
    for name, per in aucs.items():
        means = [float(np.mean(per[d])) if per.get(d) else float("nan") for d in datasets]
        cells = " | ".join("n/a" if np.isnan(m) else f"{m:.3f}" for m in means)
        lines.append(f"| {name} | {cells} | **{np.nanmean(means):.3f}** |")
    return "\n".join(lines)


def print_tables(doc: str, table: Callable[[Path], str]) -> None:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="evaluate --keep-scores folders")
    for folder in parser.parse_args().folders:
        print(f"## {folder}\n\n{table(folder)}\n")


def table(folder: Path) -> str:
    aucs: AUCs = {}
    for dataset, _, y, record, val, test in kept_splits(folder):
        for name, rule in RULES.items():
            combined = rule(val, test)
            record[name] = {dataset: [auc(y, np.nanmean(combined, 0) if combined.ndim == 2 else combined)]}
        merge(aucs, record)
    return markdown("rule", aucs)


if __name__ == "__main__":
    print_tables(__doc__, table)
