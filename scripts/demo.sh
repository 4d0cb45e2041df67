#!/usr/bin/env bash
# Install ingestd, start the embedded database and the three services,
# ingest the project's own docs, run a search, print the results and stop.
# Extra arguments go to `ingestd demo` (for example --query "..." or paths).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh"
export INGESTD_DATA_DIR=${INGESTD_DATA_DIR:-$root/.ingestd}
exec "$root/.venv/bin/ingestd" demo "$@"
