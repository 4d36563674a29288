"""Two writers of one index at once, as real processes: the second is refused at once, nothing is half-changed,
and `geoindex indexes` tells the truth.

The first writer is held mid-work with SIGSTOP from inside (GEOINDEX_FAULT=phase:n:STOP, read by
geoindex.fileio.fault_point): a build after writing its new embeddings, train after a tail epoch (its checkpoint
in the index), bench, rm and relocate right after they took the lock. Every other writer then runs and must be
refused with the busy message, having written nothing; then the first goes on and must finish as if alone.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoindex import build_index
from geoindex.geo_index import load_index
from geoindex.locks import IndexReplaced

REPO = Path(__file__).resolve().parents[1]
EFFNET_RANDOM = dict(backbone="effnet", weights="none", image_size=64, batch_size=8, num_workers=0, progress=False)
WRITERS = ("build", "train", "bench", "rm", "relocate")
# Where each writer is held: mid-work where it has work before its end, else just after it took the lock.
HOLD_AT = {"build": "h5:1", "train": "tail-epoch:1", "bench": "locked-bench:1", "rm": "locked-rm:1",
           "relocate": "locked-relocate:1"}


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    """A small effnet index (random weights: train can adapt its tail) over a copy of the photos that can move."""
    base = tmp_path_factory.mktemp("concurrency")
    data = base / "photos"
    shutil.copytree(tree, data)
    build_index(data, name="ix", index_dir=base / "home", log=lambda m: None, **EFFNET_RANDOM)
    return base


def command(writer: str, home: Path, data: Path, moved: Path) -> list[str]:
    return {"build": ["build", "--data", data, "--name", "ix", "--overwrite", "--backbone", "effnet", "--weights", "none",
                      "--image-size", "48", "--batch-size", "8", "--workers", "0", "--device", "cpu"],
            "train": ["train", "--index", "ix", "--epochs", "2", "--workers", "0", "--device", "cpu"],
            "bench": ["bench", "--index", "ix", "--methods", "knn", "--workers", "0", "--device", "cpu"],
            "rm": ["rm", "ix", "--yes"],
            "relocate": ["relocate", "ix", moved]}[writer] + ["--index-dir", home]


def start(args, fault=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GEOINDEX_FAULT", None)
    if fault:
        env["GEOINDEX_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "geoindex.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the first writer ended (rc {proc.returncode}) before its hold point:\n{out[-2000:]}\n{err[-2000:]}")
        with open(f"/proc/{proc.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the first writer never reached its hold point")


def snapshot(home: Path) -> dict:
    """Every file of the index home but the lock: name -> (size, mtime_ns)."""
    return {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(home.rglob("*")) if p.is_file() and ".locks" not in p.parts}


def geoindex(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geoindex.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


@pytest.mark.parametrize("first", WRITERS)
def test_a_second_writer_is_refused_at_once_and_the_first_finishes_whole(built, tmp_path, first):
    home, data, moved = tmp_path / "home", built / "photos", tmp_path / "moved"
    shutil.copytree(built / "home" / "ix", home / "ix")
    shutil.copytree(data, moved)
    before = json.loads((home / "ix" / "manifest.json").read_text())

    holder = start(command(first, home, data, moved), fault=f"{HOLD_AT[first]}:STOP")
    try:
        wait_until_stopped(holder)
        # While it is held, the listing says what is true: the old index answers, and who is changing it.
        listed = geoindex("indexes", "--index-dir", home)
        assert listed.returncode == 0 and "BROKEN" not in listed.stdout and "ix" in listed.stdout, listed.stdout
        assert f"now by pid {holder.pid}, `geoindex {first}`" in listed.stdout, listed.stdout
        assert "rerun" not in listed.stdout, listed.stdout  # it is running, not interrupted
        held = snapshot(home)  # after the listing: its checksum memo (.verified.json) is a reader's, not a change
        others = [w for w in WRITERS if w != first]
        started = time.monotonic()
        refused = {w: start(command(w, home, data, moved)) for w in others}
        for writer, proc in refused.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 1, f"{writer} while {first} holds the index: rc {proc.returncode}\n{out}\n{err}"
            assert "is busy" in err and f"pid {holder.pid}" in err and f"`geoindex {first}`" in err, err
            assert "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) == 1, err
        # Refused before any work: no embedding, no training (each of these alone takes far longer on a busy CPU).
        assert time.monotonic() - started < 120
        assert snapshot(home) == held, f"a refused writer changed the index while {first} held it"
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
    out, err = holder.communicate(timeout=600)
    assert holder.returncode == 0, f"{first} did not finish after the others were refused:\n{out[-2000:]}\n{err[-2000:]}"

    listed = geoindex("indexes", "--index-dir", home)
    assert listed.returncode == 0 and "unfinished" not in listed.stdout and "BROKEN" not in listed.stdout
    assert not (home / ".staging").exists() and not (home / ".locks").exists() and not list(home.rglob("*.tmp"))
    if first == "rm":
        assert not (home / "ix").exists() and "no index" in listed.stdout
        return
    index = load_index(home / "ix", device="cpu", verify=True)  # every file as its manifest says
    manifest = index.manifest
    if first == "build":
        assert manifest["build_id"] != before["build_id"] and manifest["image_size"] == 48
    elif first == "train":
        assert manifest["adapted"]["mode"] == "tail" and (home / "ix" / "heads" / "probe" / "head.pt").is_file()
        assert index.classifier is not None and index.knn_method().tuned_on == "val"
    elif first == "bench":
        assert manifest == before and (home / "ix" / "bench" / "results.json").is_file()
    elif first == "relocate":
        assert manifest["data_root"] == str(moved) and index.store.metadata("train")["path"].iat[0].startswith(str(moved))
    photo = index.store.metadata("test")["path"].iat[0]
    assert index.query([photo], k=3)[0].cities
    index.close()


def test_heads_are_never_written_into_an_index_rebuilt_since_it_was_opened(built, tmp_path):
    """The Python API opens an index, then trains on it: a rebuild that swapped a new one in meanwhile must not
    receive a head trained for the old one (the folder has the same path, its content is another index)."""
    from geoindex.heads import train_probe
    from geoindex.tuning import tune_knn

    home = tmp_path / "home"
    shutil.copytree(built / "home" / "ix", home / "ix")
    index = load_index(home / "ix", device="cpu")
    rebuilt = geoindex(*command("build", home, built / "photos", None))
    assert rebuilt.returncode == 0, rebuilt.stderr
    with pytest.raises(IndexReplaced, match="rebuilt or removed since it was opened"):
        train_probe(index, epochs=1, progress=False, log=lambda m: None)
    with pytest.raises(IndexReplaced):
        tune_knn(index, log=lambda m: None)
    assert not (home / "ix" / "heads").exists()
    index.close()


def test_heads_and_tuning_of_another_build_are_not_used(tree, tmp_path):
    """However a head got beside another build's embeddings (a race of older versions, a copied folder), it is
    refused by name and kNN falls back to its untuned defaults instead of claiming a tuning it does not have."""
    from geoindex.errors import GeoindexError
    from geoindex.heads import train_probe
    from geoindex.tuning import tune_knn

    fast = dict(backbone="cnn", weights="none", image_size=32, batch_size=4, num_workers=0, progress=False)
    home = tmp_path / "home"
    build_index(tree, name="ix", index_dir=home, log=lambda m: None, **fast)
    index = load_index("ix", home, device="cpu")
    train_probe(index, epochs=1, progress=False, log=lambda m: None)
    tune_knn(index, log=lambda m: None)
    assert index.knn_method().tuned_on == "val"
    index.close()
    shutil.copytree(home / "ix" / "heads", tmp_path / "heads")
    build_index(tree, name="ix", index_dir=home, overwrite=True, log=lambda m: None, **fast)
    shutil.copytree(tmp_path / "heads", home / "ix" / "heads")
    index = load_index("ix", home, device="cpu")
    with pytest.raises(GeoindexError, match="trained for another build"):
        index.classifier
    assert index.knn_method().tuned_on is None
    index.close()
