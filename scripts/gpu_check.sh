#!/usr/bin/env bash
# The GPU checks of issue 20, as one short run on a machine with an NVIDIA GPU: the tests marked
# `gpu`, then benchmarks/gpu.py, its JSON kept under docs/benchmarks/ with the date and the device.
# Needs .venv (scripts/setup.sh "train,dev") and a CUDA build of torch; a few minutes on an H200.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
.venv/bin/python -m pytest -m gpu -q tests/engine/test_gpu.py
device="$(.venv/bin/python -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())')"
out="${OUT:-docs/benchmarks}/gpu-${device}-$(date -u +%Y-%m-%d).json"
.venv/bin/python benchmarks/gpu.py --out "$out" "$@"
echo "wrote $out"
