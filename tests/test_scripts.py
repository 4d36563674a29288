"""The set-up scripts: nothing is installed system-wide without saying so, and only the test script may do it.

scripts/install-browser.sh runs for real under a PATH of stand-ins: an `apt-get` that records what it was asked
and prints apt's size lines, and no chromium, so what it would install and when is seen without installing."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"

FAKE_APT = """#!/bin/bash
echo "$*" >> "$APT_LOG"
case "$*" in
  *--assume-no*) echo "26 newly installed, 0 to remove"; echo "Need to get 121 MB of archives."
                 echo "After this operation, 380 MB of additional disk space will be used."; exit 1 ;;
  install*) for tool in chromium chromedriver; do  # what the real packages put on the PATH
              printf '#!/bin/bash\necho "%s 156.0"\n' "$tool" > "$(dirname "$0")/$tool"; chmod +x "$(dirname "$0")/$tool"
            done ;;
esac
exit 0
"""


@pytest.fixture
def no_browser_path(tmp_path):
    """A PATH with the shell tools the script uses and a recording apt-get, but no chromium or chromedriver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "grep", "id", "head", "cat", "dirname", "chmod"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not found")
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    (bin_dir / "sudo").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)
    return bin_dir


def run_install_browser(bin_dir, tmp_path, stdin=subprocess.DEVNULL, **env):
    log = tmp_path / "apt.log"
    result = subprocess.run([str(bin_dir / "bash"), str(SCRIPTS / "install-browser.sh")], stdin=stdin,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": str(bin_dir), "APT_LOG": str(log), "HOME": str(tmp_path), **env})
    return result, (log.read_text().splitlines() if log.exists() else [])


def test_browser_install_says_what_and_how_big_before_installing(no_browser_path, tmp_path):
    result, apt_calls = run_install_browser(no_browser_path, tmp_path)  # as CI runs it: no terminal
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "SYSTEM-WIDE" in out and "chromium" in out and "tests/test_browser.py" in out
    assert "121 MB" in out and "380 MB" in out and "GEOINDEX_INSTALL_BROWSER=0" in out
    installs = [c for c in apt_calls if c.startswith("install") and "--assume-no" not in c]
    assert installs == ["install -y --no-install-recommends chromium chromium-driver"], apt_calls
    # the size was asked of apt before the install itself
    assert apt_calls.index(next(c for c in apt_calls if "--assume-no" in c)) < apt_calls.index(installs[0])


def test_browser_install_can_be_refused(no_browser_path, tmp_path):
    result, apt_calls = run_install_browser(no_browser_path, tmp_path, GEOINDEX_INSTALL_BROWSER="0")
    assert result.returncode == 0 and apt_calls == [], apt_calls
    assert "will skip" in result.stdout


def test_only_the_test_script_installs_a_browser():
    """demo.sh and install.sh (what a user runs to try geoindex) never reach for apt-get or the browser script."""
    for name in ("demo.sh", "install.sh"):
        text = (SCRIPTS / name).read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "install-browser" not in code and "apt-get" not in code, name
    assert "install-browser.sh" in (SCRIPTS / "test.sh").read_text()


def test_install_shows_pip_progress():
    """A first install downloads gigabytes: pip must not be silenced."""
    import re
    text = (SCRIPTS / "install.sh").read_text()
    assert not re.search(r"(^|[\s(\"'])(-q|--quiet)\b", text, re.M)
