#!/usr/bin/env bash
# Set up (./.venv), then build + query + score an index end to end.
# Usage: bash scripts/demo.sh [DATA]   (a GSV-Cities tree, a <city>/*.jpg folder or a CSV manifest;
#                                        no argument: the real photos in ../shared, else a generated tree)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/python-env.sh
if [ $# -ge 1 ]; then exec "$GEOINDEX_PY" -m geoindex.cli demo --data "$1"; else exec "$GEOINDEX_PY" -m geoindex.cli demo; fi
