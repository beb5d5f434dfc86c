"""The default rule over subsets of an ensemble's members, measured on scores `evaluate --keep-scores` kept.

    .venv/bin/anomaly-scores evaluate ../shared/data/loda --grid GRID --keep-scores --out /tmp/loda
    .venv/bin/python benchmarks/member_subsets.py /tmp/loda/contaminated/scores /tmp/loda/clean/scores

Prints, per folder, the mean test AUC over each dataset's splits of the default combination (the
surprisals of each member's manifold and residual factors added, the members averaged, as
`benchmarks/combinations.py` computes it) when only the members of one hyper-parameter value (or
pair) take part: what a smaller grid would score, without refitting. Members are matched to their
hyper-parameters by `candidates.csv` beside the scores. A dataset where no member of a subset fits
(a latent size not below its number of features) is left out of that subset's mean, so compare
such rows with care.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from app.train.selection import auc
from benchmarks.combinations import MANIFOLD, RESIDUAL, AUCs, kept_splits, markdown, merge, print_tables, s

Row = dict[str, str]  # a candidates.csv row
SUBSETS: dict[str, Callable[[Row], bool]] = {
    "all": lambda c: True,
    **{f"latent {k}": (lambda c, k=k: c["latent_dim"] == k) for k in ("2", "4", "8")},
    **{
        f"latent {a}, {b}": (lambda c, a=a, b=b: c["latent_dim"] in (a, b))
        for a, b in (("2", "4"), ("4", "8"), ("2", "8"))
    },
    **{f"beta {v}": (lambda c, v=v: float(c["beta"]) == v) for v in (0.1, 1.0)},
    **{f"kernel width {v}": (lambda c, v=v: float(c["kernel_width"]) == v) for v in (0.1, 1.0)},
    "beta 1, kernel width 1": lambda c: float(c["beta"]) == 1.0 and float(c["kernel_width"]) == 1.0,
}


def table(folder: Path) -> str:
    candidates: dict[tuple[str, str], dict[int, Row]] = defaultdict(dict)
    with open(folder.parent / "candidates.csv") as f:
        for row in csv.DictReader(f):
            candidates[(row["dataset"], row["split"])][int(row["candidate"])] = row
    aucs: AUCs = {}
    for dataset, split, y, record, val, test in kept_splits(folder):
        score = s(val, test, MANIFOLD) + s(val, test, RESIDUAL)  # (members, rows)
        kept = np.load(folder / f"{dataset}-{split}.npz")
        members = sorted({int(k.split("/")[1]) for k in kept.files if k.startswith("val/")})
        for name, pick in SUBSETS.items():
            chosen = [j for j, i in enumerate(members) if pick(candidates[(dataset, split)][i])]
            if chosen:
                record[name] = {dataset: [auc(y, np.nanmean(score[chosen], 0))]}
        merge(aucs, record)
    return markdown("members", aucs)


if __name__ == "__main__":
    print_tables(__doc__, table)
