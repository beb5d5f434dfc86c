"""Write the shipped demo tables from scikit-learn's bundled breast-cancer data (no download).

    .venv/bin/python scripts/make_demo_data.py

data/breast-cancer-train.csv    300 benign rows + 15 malignant ones (5% unlabelled contamination in
                                spirit; the `malignant` column is there for selection and reports)
data/breast-cancer-holdout.csv  the other 57 benign and 197 malignant rows, to score
"""

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer


def main() -> None:
    raw = load_breast_cancer()
    names = [n.replace(" ", "_") for n in raw.feature_names]
    frame = pd.DataFrame(raw.data, columns=names)
    frame["malignant"] = (raw.target == 0).astype(int)  # sklearn codes malignant as 0
    rng = np.random.default_rng(0)
    benign = rng.permutation(np.flatnonzero(frame["malignant"] == 0))
    malignant = rng.permutation(np.flatnonzero(frame["malignant"] == 1))
    train = np.sort(np.r_[benign[:300], malignant[:15]])
    holdout = np.sort(np.r_[benign[300:], malignant[15:]])
    out = Path(__file__).resolve().parent.parent / "data"
    out.mkdir(exist_ok=True)
    frame.iloc[train].to_csv(out / "breast-cancer-train.csv", index=False, float_format="%.6g")
    frame.iloc[holdout].to_csv(out / "breast-cancer-holdout.csv", index=False, float_format="%.6g")
    print(f"wrote {len(train)} and {len(holdout)} rows to {out}")


if __name__ == "__main__":
    main()
