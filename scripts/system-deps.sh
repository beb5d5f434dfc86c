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
# The Debian packages would start their own daemons (nginx on port 80, prometheus on 9090); the
# tests run private instances on free ports. policy-rc.d answering 101 ("action forbidden") is
# Debian's way to install without starting anything, so nothing needs stopping afterwards, and no
# process this script did not start (a user's own nginx included) is ever touched.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && trap 'rm -f "$policy"' EXIT
fi
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null; then
    echo "system-deps: installing ${missing[*]} failed; their tests will skip" >&2
fi
exit 0
