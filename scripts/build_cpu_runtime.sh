#!/usr/bin/env bash
# Builds the Docker image's CPU runtime without Docker: a fresh venv installed by the very script the
# Dockerfile's cpu-builder stage runs (scripts/install_runtime.sh cpu), so the two cannot drift.
#
#   scripts/build_cpu_runtime.sh [VENV]      (default /tmp/anomaly-cpu-runtime; replaced if present)
#
# The default, like the image, has no PyTorch. WITH_TORCH=1 builds the variant with torch (the
# Dockerfile's --build-arg CPU_TORCH=1); one difference, on purpose: the Dockerfile takes torch from
# the PyTorch CPU index, here TORCH_INDEX_URL is left empty, so `pip install torch==2.13.0` resolves
# through pip's own configuration, which on the project's machines finds the local CPU wheel.
# Prints the venv's path on the last line of stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-/tmp/anomaly-cpu-runtime}"
case "$venv" in
    /*) ;;
    *) venv="$PWD/$venv" ;;
esac
if [ -e "$venv" ]; then
    if [ ! -f "$venv/pyvenv.cfg" ]; then
        echo "build_cpu_runtime.sh: $venv exists and is not a venv; refusing to replace it" >&2
        exit 2
    fi
    rm -rf "$venv"
fi
TORCH_INDEX_URL="${TORCH_INDEX_URL-}" bash "$root/scripts/install_runtime.sh" cpu "$venv" "$root" >&2
echo "$venv"
