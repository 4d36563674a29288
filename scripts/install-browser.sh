#!/usr/bin/env bash
# Debian's chromium and its driver, installed SYSTEM-WIDE with apt-get, for tests/test_browser.py only: geoindex,
# its page and the demo never need a browser. Says what it installs and how big it is before installing; on a
# terminal it asks first. GEOINDEX_INSTALL_BROWSER=0 never installs (the browser test then skips, saying why),
# =1 installs without asking. scripts/test.sh calls it; scripts/demo.sh and scripts/install.sh never do.
set -euo pipefail
packages=(chromium chromium-driver)
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "chromium and chromedriver are already installed: $(chromium --version 2>/dev/null | head -1)"
    exit 0
fi
if [ "${GEOINDEX_INSTALL_BROWSER:-}" = "0" ]; then
    echo "GEOINDEX_INSTALL_BROWSER=0: chromium not installed; tests/test_browser.py will skip, saying why"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "no apt-get here: install chromium and chromedriver yourself to run tests/test_browser.py (it skips without them)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
cat <<BANNER
========================================================================================================
SYSTEM-WIDE INSTALL, for the browser test (tests/test_browser.py) only: Debian's ${packages[*]}
with ${SUDO:+sudo }apt-get. On Debian 12 that is 26 packages, about 121 MB downloaded and 380 MB on disk;
this machine's figures follow. Skip it with GEOINDEX_INSTALL_BROWSER=0 (the browser test then skips);
undo it with: ${SUDO:+sudo }apt-get remove ${packages[*]} && ${SUDO:+sudo }apt-get autoremove
========================================================================================================
BANNER
$SUDO apt-get update -qq
# apt's own count for this machine (what is missing here), without installing anything yet.
$SUDO apt-get install --assume-no --no-install-recommends "${packages[@]}" 2>/dev/null \
    | grep -E "newly installed|Need to get|After this operation" || true
if [ -t 0 ] && [ "${GEOINDEX_INSTALL_BROWSER:-}" != "1" ]; then
    read -r -p "Install them now? [y/N] " answer
    case "$answer" in
        y|Y|yes|YES) ;;
        *) echo "not installed: tests/test_browser.py will skip, saying why"; exit 0 ;;
    esac
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${packages[@]}"
chromium --version 2>/dev/null | head -1
chromedriver --version
