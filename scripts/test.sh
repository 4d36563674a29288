#!/usr/bin/env bash
# Set up (./.venv), then run the whole test suite (CPU only; GPU paths are exercised when a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/python-env.sh
exec "$GEOINDEX_PY" -m pytest -q -rs "$@"
