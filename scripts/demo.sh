#!/usr/bin/env bash
# Set up (./.venv), then build + train + query + score an index end to end.
# Usage: bash scripts/demo.sh [DATA] [--no-adapt ...]   (a GSV-Cities tree, a <city>/*.jpg folder or a CSV manifest;
#                                        no argument: the real photos in ../shared, else a generated tree)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/python-env.sh
# The first argument, unless it is an option, is the data; the rest go to `geoindex demo` (e.g. --no-adapt).
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then data="$1"; shift; exec "$GEOINDEX_PY" -m geoindex.cli demo --data "$data" "$@"; fi
exec "$GEOINDEX_PY" -m geoindex.cli demo "$@"
