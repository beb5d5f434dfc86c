#!/usr/bin/env bash
# The one place that says how a serving runtime is installed. The Dockerfile's builder stages run it,
# and scripts/build_cpu_runtime.sh runs it without Docker, so the two cannot drift apart.
#
#   scripts/install_runtime.sh cpu|gpu VENV [SOURCE]
#
#   cpu  a venv with `.[serve]`: the onnxruntime backend scores every method from the bundle's ONNX
#        graphs, without PyTorch. WITH_TORCH=1 adds torch's CPU-only build, for bundles written
#        before every method had a graph (their missing methods are delegated to torch).
#   gpu  a venv with `.[serve,train]`; torch is PyPI's Linux build, a CUDA build that brings its own
#        CUDA runtime libraries as nvidia-* wheels (the host needs only the driver).
#
# SOURCE is the project directory (default: this script's repository). It is copied, pyproject.toml,
# README.md and app/ only, to a scratch directory first, so the build writes nothing into SOURCE.
#
# Environment:
#   PYTHON           interpreter that creates the venv (default python3.11, else python3)
#   TORCH_SPEC       torch requirement (default torch==2.13.0, the version scripts/setup.sh pins)
#   TORCH_INDEX_URL  index torch comes from. Unset: https://download.pytorch.org/whl/cpu for cpu,
#                    pip's configured indexes (PyPI) for gpu. Set but empty: pip's configured indexes
#                    (scripts/build_cpu_runtime.sh does this to take a local CPU wheel offline).
#   WITH_TORCH       cpu only: 0 (default) leaves torch out, 1 installs it
set -euo pipefail

target="${1:?usage: install_runtime.sh cpu|gpu VENV [SOURCE]}"
venv="${2:?usage: install_runtime.sh cpu|gpu VENV [SOURCE]}"
source_dir="${3:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
case "$target" in
    cpu) extras="serve"; default_index="https://download.pytorch.org/whl/cpu" ;;
    gpu) extras="serve,train"; default_index="" ;;
    *) echo "install_runtime.sh: target must be cpu or gpu, not '$target'" >&2; exit 2 ;;
esac
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
torch_index="${TORCH_INDEX_URL-$default_index}"
with_torch="${WITH_TORCH:-0}"
case "$with_torch" in
    0 | 1) ;;
    *) echo "install_runtime.sh: WITH_TORCH must be 0 or 1, not '$with_torch'" >&2; exit 2 ;;
esac
if [ "$target" = gpu ]; then with_torch=1; fi  # the gpu image scores with torch on CUDA

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp -r "$source_dir/pyproject.toml" "$source_dir/README.md" "$source_dir/app" "$stage/"
find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --no-cache-dir --upgrade pip

# torch first, with an exact pin and its own index: pip then takes that build, and the package's
# looser `torch>=2.2` is already satisfied when the project is installed.
if [ "$with_torch" = 1 ]; then
    torch_args=("$torch_spec")
    if [ -n "$torch_index" ]; then torch_args+=(--index-url "$torch_index"); fi
    "${pip[@]}" install --no-cache-dir "${torch_args[@]}"
fi

# The project itself, built as a wheel from the clean copy (not editable: the image has no source).
"${pip[@]}" install --no-cache-dir "$stage[$extras]"
"${pip[@]}" check
