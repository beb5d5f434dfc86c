#!/usr/bin/env bash
# One command: set up the environment and run the linter and the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" "train,serve,sign,ray,spark,dev"
bash "$root/scripts/setup_clients.sh"
cd "$root"
.venv/bin/ruff check app tests benchmarks
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
