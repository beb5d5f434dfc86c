#!/usr/bin/env bash
# One command: set up the environment and serve the shipped default model on http://127.0.0.1:8000
# (override with ANOMALY_MODEL_PATH, HOST and PORT; every ANOMALY_* setting is read by the service).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Only what serving needs: the onnx backend scores every method without PyTorch or the training
# extras (about 370 MB installed instead of 1.6 GB). scripts/test.sh adds the rest to the same .venv.
bash "$root/scripts/setup.sh" "serve"
cd "$root"
exec .venv/bin/anomaly-scores serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
