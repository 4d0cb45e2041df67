#!/usr/bin/env bash
# Create .venv beside this repository and install ingestd into it.
# Usage: scripts/bootstrap.sh [EXTRA]   (EXTRA is a pyproject extra, e.g. dev)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch pulled in by sentence-transformers
# would fetch a multi-gigabyte CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
target="."
if [ -n "${1:-}" ]; then
    target=".[$1]"
fi
# torch is named again so that no extra can move it off the pin.
.venv/bin/python -m pip install --quiet -e "$target" "torch==2.13.0"
