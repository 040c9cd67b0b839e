#!/usr/bin/env bash
# The whole check, as CI runs it: install, lint, format check, type check, tests with coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
# Tests talk to the loopback emulator with its own throwaway CA; machine-wide CA overrides
# (REQUESTS_CA_BUNDLE and friends) must not leak into them.
unset REQUESTS_CA_BUNDLE CURL_CA_BUNDLE SSL_CERT_FILE HTTPS_PROXY https_proxy HTTP_PROXY http_proxy
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest --cov --cov-report=term "$@"
