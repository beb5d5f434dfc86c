"""Two `anomaly-scores evaluate` runs on the same splits, compared dataset by dataset.

    .venv/bin/python benchmarks/paired.py BEFORE AFTER [--columns likelihood reconstruction]

BEFORE and AFTER are evaluate's --out folders (or a protocol's folder of each). For each protocol
both hold, and each ensemble column of ensembles.csv and each baseline of baselines.csv named (by
default the default detector's, `likelihood`, and the baselines), prints the mean test AUC over
the datasets (each the mean of its splits) before and after, the datasets better and worse, and
the Wilcoxon signed-rank p-value over the dataset means: how docs/evaluation.md compares a change
of the default that refits the networks with the run before it. A column or split that only one
run has is an error, not a silent gap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

PROTOCOLS = ("contaminated", "clean")


def dataset_means(folder: Path, column: str) -> pd.Series:
    """Per dataset, the mean over splits of `column` in ensembles.csv or baselines.csv."""
    for name in ("ensembles.csv", "baselines.csv"):
        table = pd.read_csv(folder / name)
        if column in table:
            return table.groupby("dataset", sort=False)[column].mean()
    raise SystemExit(f"{folder}: no column {column!r} in ensembles.csv or baselines.csv")


def compare(before: Path, after: Path, columns: list[str]) -> None:
    for column in columns:
        old, new = dataset_means(before, column), dataset_means(after, column)
        if list(old.index) != list(new.index):
            raise SystemExit(f"{column}: the runs hold other datasets ({list(old.index)}, {list(new.index)})")
        difference = new.to_numpy() - old.to_numpy()
        p = wilcoxon(difference).pvalue if np.any(difference != 0) else float("nan")
        print(
            f"  {column:28s} {old.mean():.4f} -> {new.mean():.4f}   better on {(difference > 0).sum()}, "
            f"worse on {(difference < 0).sum()} of {difference.size}, Wilcoxon p = {p:.3f}"
        )
        print("    " + " ".join(f"{d:+.3f}" for d in difference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--columns", nargs="+", default=["likelihood", "reconstruction", "knn", "iforest"])
    args = parser.parse_args()
    pairs = [(args.before / p, args.after / p, p) for p in PROTOCOLS if (args.before / p).is_dir()]
    for before, after, protocol in pairs or [(args.before, args.after, "")]:
        for folder in (before, after):
            splits = pd.read_csv(folder / "ensembles.csv")[["dataset", "split"]]
            if not splits.equals(pd.read_csv(before / "ensembles.csv")[["dataset", "split"]]):
                raise SystemExit(f"{folder}: other datasets or splits than {before}")
        print(f"{protocol or before.name}: mean test AUC over datasets, before -> after")
        compare(before, after, args.columns)


if __name__ == "__main__":
    main()
