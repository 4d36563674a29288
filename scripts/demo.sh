#!/usr/bin/env bash
# Set up, then build + query + score an index end to end.
# Usage: bash scripts/demo.sh [/path/to/GSV-Cities]   (no path: ../shared sample, else a generated tree)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ $# -ge 1 ]; then exec geoindex demo --data "$1"; else exec geoindex demo; fi
