"""Rows far off the manifold: flagged by the default ensemble with and without the surprisals' tail.

    .venv/bin/python benchmarks/far_rows.py [--out /tmp/far-rows] [--features 200] [--seed 0]

Writes a synthetic table (3 000 rows: tanh of five latent normals through a random 5 x d matrix,
plus noise 0.05; `--seed` draws another) and trains on it as a user would, `anomaly-scores train
TABLE --out DIR` with no options. Then scores 500 new normal rows and 500 rows off the manifold
(normals of the normal rows' per-feature spread through tanh) with the bundle (factor_fisher_tail,
the default), and with the same members combined as before session 18 (factor_fisher: each
surprisal stops at log(n + 1)), its calibration recomputed on the same calibration rows (`train`'s
split: seed 0, a fifth of the rows). Prints, for both, the AUC and the share of each kind of row
flagged at the bundle's default false-positive rate. About half a minute on two cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import subprocess

import numpy as np
import onnxruntime as ort
import pandas as pd
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from app.bundle import calibration as cal
from app.bundle.ensemble import FACTOR_FISHER, member_scores, term_scores
from app.bundle.format import EnsembleBundle, load_bundle
from app.bundle.graphs import verified_graphs
from app.engine.onnx_backend import OnnxScorer
from app.train.pipeline import split_rows


def tables(d: int, seed: int) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Training rows, new normal rows, rows off the manifold."""
    rng = np.random.default_rng(seed)
    z, weights = rng.normal(size=(3000, 5)), rng.normal(size=(5, d))
    train = np.tanh(z @ weights / 3) + 0.05 * rng.normal(size=(3000, d))
    rng = np.random.default_rng(seed + 1)
    on = np.tanh(rng.normal(size=(500, 5)) @ weights / 3)
    normal = on + 0.05 * rng.normal(size=(500, d))
    far = np.tanh(rng.normal(size=(500, d)) * on.std(axis=0))
    return train, normal, far


def untailed(bundle: EnsembleBundle, x_raw: NDArray[np.float64]) -> NDArray[np.float64]:
    """The members' `likelihood` combined as factor_fisher: each member scored by its own graph."""
    values = []
    for member in bundle.members:
        session = ort.InferenceSession(
            verified_graphs(member)["likelihood"], providers=["CPUExecutionProvider"]
        )
        x = np.ascontiguousarray(member.split_columns(x_raw)[0], dtype=np.float64)
        parts = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x}), strict=True))
        values.append(term_scores(FACTOR_FISHER, "likelihood", parts))
    return member_scores(FACTOR_FISHER, [m.calibration for m in bundle.members], values).mean(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/far-rows"))
    parser.add_argument("--features", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic table")
    args = parser.parse_args()
    train, normal, far = tables(args.features, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "table.csv"
    pd.DataFrame(train, columns=[f"f{j}" for j in range(args.features)]).to_csv(table, index=False)
    model = args.out / "model"
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "train",
        str(table),
        "--out",
        str(model),
        "--quiet",
        "--force",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    bundle = load_bundle(model)
    assert isinstance(bundle, EnsembleBundle)
    x, y = np.vstack([normal, far]), np.r_[np.zeros(len(normal)), np.ones(len(far))]
    fpr = bundle.default_fpr
    tailed = OnnxScorer(bundle).score(x, "likelihood")
    x_cal = train[split_rows(len(train), 0.2, 0.2, seed=0).calibration]
    old = untailed(bundle, x)
    old_threshold = cal.threshold(np.sort(untailed(bundle, x_cal)), fpr)
    figures = {}
    for name, score, flagged in (
        (bundle.combination, tailed.score, tailed.is_anomaly),
        (FACTOR_FISHER, old, ~(old <= old_threshold)),
    ):
        figures[name] = {
            "auc": round(float(roc_auc_score(y, score)), 4),
            "normal_flagged": round(float(flagged[y == 0].mean()), 4),
            "far_flagged": round(float(flagged[y == 1].mean()), 4),
        }
    print(json.dumps({"features": args.features, "seed": args.seed, "fpr": fpr, "combinations": figures}))


if __name__ == "__main__":
    main()
