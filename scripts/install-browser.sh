#!/usr/bin/env bash
# Debian's chromium and its driver, for tests/test_browser.py (the page driven end to end, headless).
# Installs only what is missing; needs root (or sudo) for apt-get.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "chromium and chromedriver are already installed: $(chromium --version 2>/dev/null | head -1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium chromium-driver
chromium --version 2>/dev/null | head -1
chromedriver --version
