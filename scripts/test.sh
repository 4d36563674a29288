#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; GPU paths are exercised when a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest -q -rs "$@"
