#!/usr/bin/env bash
# Creates .venv-clients (once): the Open Inference Protocol clients the end-to-end tests drive,
# tritonclient[http] and kserve, in an environment of their own, since kserve's pins (pandas,
# protobuf, grpcio) would move the project's. Run by scripts/test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
venv="$root/.venv-clients"
requirements=("tritonclient[http]>=2.40" "kserve>=0.13" "numpy>=1.26")
want="$(printf '%s\n' "${requirements[@]}" | sha256sum | cut -c1-16)"
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}"
    echo "$want" > "$stamp"
fi
