#!/usr/bin/env bash
# Installs geoindex and its dependencies into a virtual environment, ./.venv by default, made with
# $PYTHON (default python3, 3.10+) when it does not exist yet, so a system Python (PEP 668) is never touched.
# Set GEOINDEX_VENV to use another folder; run inside an activated virtualenv to install into that one.
# Nothing is installed outside that environment (the browser for the browser test is scripts/test.sh's, and asks).
#
# One CUDA stack at most: torch/torchvision are pinned to the release this project is tested with (pip takes
# them from a local wheel cache when there is one); FAISS is faiss-cpu, which searches on the CPU. GPU
# search (faiss-gpu, which brings the CUDA 12 libraries) is the opt-in extra `pip install -e ".[gpu]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
# pip's own progress is shown: a first install downloads about 3 GB and takes minutes.
pip_options=(--disable-pip-version-check --progress-bar on)
if ! "$GEOINDEX_PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "installing torch 2.14.1 + torchvision 0.29.1 into $("$GEOINDEX_PY" -c 'import sys; print(sys.prefix)')" \
       "(with the NVIDIA CUDA libraries: about 3.2 GB of the 6.4 GB the environment ends at)"
  "$GEOINDEX_PY" -m pip install "${pip_options[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi
echo "installing geoindex with its test, serve and ray extras"
"$GEOINDEX_PY" -m pip install "${pip_options[@]}" -e ".[test,serve,ray,int8]"
echo "geoindex installed in $("$GEOINDEX_PY" -c 'import sys; print(sys.prefix)'); activate it with: source $GEOINDEX_VENV_ACTIVATE"
