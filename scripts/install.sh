#!/usr/bin/env bash
# Installs geoindex and its dependencies into the current Python (3.10+).
# torch/torchvision are pinned first to the release this project is tested with; pip takes them
# from a local wheel cache when there is one, so no other build of several GB is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
