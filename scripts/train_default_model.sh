#!/usr/bin/env bash
# Rebuilds models/default/ from the shipped demo table (scikit-learn's breast-cancer data, offline).
# Deterministic on CPU: the same command gives the same weights and the same bundle version.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python scripts/make_demo_data.py
.venv/bin/anomaly-scores train data/breast-cancer-train.csv --label-column malignant \
    --grid default --select --steps 3000 --val-fraction 0.2 --cal-fraction 0.33 --default-fpr 0.1 \
    --name breast-cancer-demo --out models/default "$@"
