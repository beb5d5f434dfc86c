#!/usr/bin/env bash
# Creates .venv (once) and installs the project with the given extras. Sourced by test.sh and serve.sh.
# torch is installed first with an exact pin: pip then finds the local CPU wheel instead of pulling a
# multi-GB CUDA build, and the project's looser `torch>=2.2` requirement is already satisfied.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-train}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
venv="$root/.venv"
stamp="$venv/.installed-$extras"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    if [[ ",$extras," == *",train,"* ]]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[$extras]"
    echo "$want" > "$stamp"
fi
