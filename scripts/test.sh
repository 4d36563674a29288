#!/usr/bin/env bash
# Set up (./.venv), then run the whole test suite (CPU only; GPU paths are exercised when a GPU is present).
# The browser test needs Debian's chromium: scripts/install-browser.sh installs it SYSTEM-WIDE, saying so and its
# size first (asking first on a terminal; GEOINDEX_INSTALL_BROWSER=0 skips it and that test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install-browser.sh || echo "chromium not installed: tests/test_browser.py will skip, saying why"
source scripts/python-env.sh
echo "running the test suite: 8 to 25 minutes on a 2-core CPU (one dot per passing test; slowest ten listed at the end)"
exec "$GEOINDEX_PY" -m pytest -q -rs --durations=10 "$@"
