#!/usr/bin/env bash
# Installs geoindex and its dependencies into a virtual environment, ./.venv by default, made with
# $PYTHON (default python3, 3.10+) when it does not exist yet, so a system Python (PEP 668) is never touched.
# Set GEOINDEX_VENV to use another folder; run inside an activated virtualenv to install into that one.
#
# One CUDA stack at most: torch/torchvision are pinned to the release this project is tested with (pip takes
# them from a local wheel cache when there is one); FAISS is faiss-cpu, which searches on the CPU. GPU
# search (faiss-gpu, which brings the CUDA 12 libraries) is the opt-in extra `pip install -e ".[gpu]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
quiet=(-q --disable-pip-version-check)
if ! "$GEOINDEX_PY" -c "import torch, torchvision" 2>/dev/null; then
  "$GEOINDEX_PY" -m pip install "${quiet[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi
"$GEOINDEX_PY" -m pip install "${quiet[@]}" -e ".[test,serve,ray]"
# Headless Chromium + chromedriver for the page's browser test (Debian packages; skipped where apt is not ours).
bash scripts/install-browser.sh || echo "chromium not installed: the browser test will skip with the reason"
echo "geoindex installed in $("$GEOINDEX_PY" -c 'import sys; print(sys.prefix)'); activate it with: source $GEOINDEX_VENV_ACTIVATE"
