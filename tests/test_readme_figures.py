"""The README's measured figures are written from benchmarks/results/ by benchmarks/readme_figures.py: the committed
README must say what the committed results say, and a new result must change the README's text."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "readme_figures.py"


def test_readme_figure_blocks_match_the_committed_results():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr + "\nrun: python benchmarks/readme_figures.py"
    readme = (REPO / "README.md").read_text()
    assert "<!-- figures:openset -->" in readme and "<!-- figures:heldout -->" in readme


def test_a_new_open_set_result_rewrites_the_readme(tmp_path):
    """As after `python benchmarks/openset.py --index london` flags 11 of the 71 photos: the check fails until the
    script rewrites the block, which then says 15.5% (11 of 71)."""
    results, readme = tmp_path / "results", tmp_path / "README.md"
    shutil.copytree(REPO / "benchmarks" / "results", results)
    shutil.copy(REPO / "README.md", readme)
    data = json.loads((results / "openset_london.json").read_text())
    data["rows"]["foreign/knn"]["share_unlike_indexed"] = 11 / 71
    (results / "openset_london.json").write_text(json.dumps(data))
    args = [sys.executable, str(SCRIPT), "--readme", str(readme), "--results", str(results)]
    stale = subprocess.run([*args, "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "openset" in stale.stderr
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0
    text = readme.read_text()
    assert "15.5% (11 of 71)" in text and "5.6% (4 of 71)" not in text
    outside = text.split("<!-- figures:openset -->")[0]
    assert outside == (REPO / "README.md").read_text().split("<!-- figures:openset -->")[0]  # nothing else moved
    assert subprocess.run([*args, "--check"], capture_output=True, text=True).returncode == 0
