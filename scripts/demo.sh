#!/usr/bin/env bash
# Install bulkoffboard into ./.venv and run the demo: an in-process emulator, a synthetic fleet,
# offboarded end to end through the real client, throttle and journal.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/bulkoffboard demo "$@"
