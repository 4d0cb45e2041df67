#!/usr/bin/env bash
# Install ingestd with its dev and bench extras, then run the checks and the test suite.
# Tests start their own embedded PostgreSQL; nothing else needs to run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/bootstrap.sh" dev,bench
cd "$root"
export PATH="$root/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== import contracts"
lint-imports
echo "== buf lint"
buf lint
echo "== pytest"
exec python -m pytest "$@"
