#!/usr/bin/env bash
# Debian packages the end-to-end tests drive for real: promtool/prometheus, nginx, chromium (renders
# /docs and /redoc headless) and Java 17 (Spark in local mode). Best effort: where they cannot be installed (no root, no apt), the tests
# that need them skip and say why.
set -uo pipefail
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: cannot install ${missing[*]} (needs root and apt-get); their tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null; then
    echo "system-deps: installing ${missing[*]} failed; their tests will skip" >&2
fi
# The Debian packages start their own daemons; the tests run private instances on free ports.
for service in prometheus nginx; do
    command -v systemctl >/dev/null 2>&1 && systemctl stop "$service" >/dev/null 2>&1
    pkill -x "$service" >/dev/null 2>&1
done
exit 0
