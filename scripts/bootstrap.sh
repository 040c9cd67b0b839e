#!/usr/bin/env bash
# Create (or reuse) ./.venv and install bulkoffboard into it, with the test tools when asked.
# With "test", also the servers the tests start on loopback (Debian packages): installed with
# apt-get when running as root (CI, a fresh machine), else named so a developer can install
# them (the tests that need them skip loudly; under CI=true they fail).
# Usage: scripts/bootstrap.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "bulkoffboard needs Python 3.11 or newer")'
  "$PY" -m venv .venv
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra}"

if [ "${1:-}" = "test" ]; then
  # program -> Debian package: Redis (the shared budget), PostgreSQL (the export), Chromium
  # (the HTML reports are opened in a headless browser)
  declare -A wanted=([redis-server]=redis-server [chromium]=chromium)
  missing=()
  for program in "${!wanted[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${wanted[$program]}")
  done
  # PostgreSQL's server programs are not on PATH: Debian keeps them per major version.
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing the test servers: ${missing[*]}" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "note: the tests start ${missing[*]} (Debian packages): install them, or those tests skip" >&2
    fi
  fi
fi
