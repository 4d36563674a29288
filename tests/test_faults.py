"""Fault injection: a real SIGKILL at every phase of a build (and of fine-tuning), then a rerun.

Each kill comes from inside the process (GEOINDEX_FAULT=phase:n, read by geoindex.fileio.fault_point),
so it lands exactly at the phase named; the rerun must give the same index, bit for bit, as a run
that was never interrupted, and leave no temporary file, staging folder or lock behind.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import small_tmpfs
import torch

from geoindex import build_index
from geoindex.errors import GeoindexError
from geoindex.geo_index import load_index

FAST = dict(backbone="cnn", weights="none", image_size=32, batch_size=4, num_workers=0, progress=False,
            checkpoint_rows=8)
REPO = Path(__file__).resolve().parents[1]
# Fault points of a build, in the order a build reaches them; (phase, n) = the n-th time it is reached.
BUILD_FAULTS = [("scan", 1), ("extract", 1), ("checkpoint", 1), ("extract", 7), ("checkpoint", 3), ("h5", 1),
                ("index", 1), ("manifest", 1), ("commit", 1), ("cleanup", 1)]
VOLATILE = {"created", "build_id", "extraction", "files"}


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    home = tmp_path_factory.mktemp("reference")
    build_index(tree, name="ix", index_dir=home, log=lambda m: None, **FAST)
    return home / "ix"


def build_in_child(tree, home, fault=None, name="ix", overwrite=False, **extra):
    """A build in a separate process, as a user runs it; returns the CompletedProcess."""
    kwargs = {**FAST, **extra}
    script = textwrap.dedent(f"""
        from geoindex import build_index
        build_index({str(tree)!r}, name={name!r}, index_dir={str(home)!r}, overwrite={overwrite!r},
                    log=lambda m: None, **{kwargs!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GEOINDEX_FAULT", None)
    if fault:
        env["GEOINDEX_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def leftovers(home: Path) -> list[str]:
    found = [str(p.relative_to(home)) for p in home.rglob("*") if p.name.endswith(".tmp") or p.name == ".partial"]
    found += [name for name in (".staging", ".locks") if (home / name).exists()]
    return found


def assert_same_index(a: Path, b: Path):
    with h5py.File(a / "embeddings.h5") as fa, h5py.File(b / "embeddings.h5") as fb:
        assert list(fa.attrs["classes"]) == list(fb.attrs["classes"])
        for split in ("train", "val", "test"):
            for key in fa[split]:
                if key in ("mtime_ns",):
                    continue
                np.testing.assert_array_equal(fa[split][key][...], fb[split][key][...], err_msg=f"{split}/{key}")
    assert (a / "faiss.index").read_bytes() == (b / "faiss.index").read_bytes()
    assert (a / "skipped.json").read_text() == (b / "skipped.json").read_text()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ma.items() if k not in VOLATILE} == {k: v for k, v in mb.items() if k not in VOLATILE}


@pytest.mark.parametrize("phase,n", BUILD_FAULTS, ids=[f"{p}-{n}" for p, n in BUILD_FAULTS])
def test_kill_at_each_phase_then_rerun_gives_the_same_index(tree, reference, tmp_path, phase, n):
    home = tmp_path / "home"
    killed = build_in_child(tree, home, fault=f"{phase}:{n}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    report = build_index(tree, name="ix", index_dir=home, log=lambda m: None, **FAST)
    if phase in ("extract", "checkpoint") and n > 1:
        assert report.resumed_rows > 0, "finished checkpoints must not be embedded again"
    assert_same_index(reference, home / "ix")
    assert leftovers(home) == []
    index = load_index("ix", home)
    photo = index.store.metadata("train")["path"][0]
    assert index.query([photo], k=3)[0].neighbours[0].path == photo


def test_overwrite_killed_midway_leaves_the_old_index_answering(tree, reference, tmp_path):
    home = tmp_path / "home"
    build_index(tree, name="ix", index_dir=home, log=lambda m: None, **FAST)
    old = json.loads((home / "ix" / "manifest.json").read_text())
    # A rebuild with other settings (so nothing can be reused), killed twice: mid-extraction and after its manifest.
    for fault in ("extract:2", "manifest:1"):
        killed = build_in_child(tree, home, fault=fault, overwrite=True, image_size=48)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        index = load_index("ix", home)
        assert index.manifest["build_id"] == old["build_id"] and index.manifest["image_size"] == 32
        photo = index.store.metadata("test")["path"][0]
        assert index.query([photo], k=3)[0].cities
        index.close()
    listed = subprocess.run([sys.executable, "-m", "geoindex.cli", "indexes", "--index-dir", str(home)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "unfinished" in listed.stdout and listed.returncode == 0
    report = build_index(tree, name="ix", index_dir=home, overwrite=True, log=lambda m: None, **{**FAST, "image_size": 48})
    assert report.manifest["image_size"] == 48 and leftovers(home) == []


def test_rebuild_reuses_unchanged_photos_and_embeds_only_new_ones(tree, reference, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tree, data)
    home = tmp_path / "home"
    build_index(data, name="ix", index_dir=home, log=lambda m: None, **FAST)
    new = data / "Images" / "London"
    src = sorted(new.glob("*.jpg"))[0]
    from PIL import Image
    parts = src.name.split("_")
    parts[1] = "0000099"  # a new place
    Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new / "_".join(parts), quality=90)
    report = build_index(data, name="ix", index_dir=home, overwrite=True, log=lambda m: None, **FAST)
    assert report.extracted_rows == 1 and report.resumed_rows == 30
    assert sum(report.manifest["counts"].values()) == 31 and leftovers(home) == []
    # A changed photo (new bytes, new mtime) is embedded again; the others are not.
    Image.open(src).rotate(90).save(src, quality=90)
    report = build_index(data, name="ix", index_dir=home, overwrite=True, log=lambda m: None, **FAST)
    assert report.extracted_rows == 1 and report.resumed_rows == 30


def test_sigterm_saves_like_ctrl_c_and_the_rerun_resumes(tree, reference, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEOINDEX_FAULT": "extract:3:TERM"}
    proc = subprocess.run([sys.executable, "-m", "geoindex.cli", "build", "--data", str(tree), "--name", "ix",
                           "--index-dir", str(home), "--backbone", "cnn", "--weights", "none", "--image-size", "32",
                           "--batch-size", "4", "--workers", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "SIGTERM" in proc.stdout and "saved" in proc.stdout and "Traceback" not in proc.stderr
    assert len(list((home / ".staging" / "ix" / "cache").glob("shard-*.npz"))) == 1
    report = build_index(tree, name="ix", index_dir=home, log=lambda m: None, **FAST)
    assert report.resumed_rows == 12
    assert_same_index(reference, home / "ix")


def test_disk_full_stops_with_one_line_and_the_rerun_finishes(tree, reference, tmp_path):
    with small_tmpfs(tmp_path / "small", "160k") as mount:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "geoindex.cli", "build", "--data", str(tree), "--name", "ix",
                               "--index-dir", str(mount), "--backbone", "cnn", "--weights", "none", "--image-size",
                               "32", "--batch-size", "4", "--workers", "0", "--dtype", "float32"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        messages = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("embedding")]  # tqdm's bar
        assert "Traceback" not in proc.stderr and len(messages) == 1, proc.stderr
        assert "disk full" in messages[0] and "rerun the same command" in messages[0]
        kept = list((mount / ".staging" / "ix" / "cache").glob("shard-*.npz"))
        assert kept, "the checkpoints written before the disk filled must be kept"
        assert not list(mount.rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=20m", str(mount)], check=True)
        report = build_index(tree, name="ix", index_dir=mount, log=lambda m: None, **{**FAST, "dtype": "float32"})
        assert report.resumed_rows >= 8 and leftovers(mount) == []


def test_two_builds_of_one_name_the_second_refuses_naming_the_first(tree, tmp_path):
    home = tmp_path / "home"
    script = textwrap.dedent(f"""
        import time
        from geoindex import build_index
        build_index({str(tree)!r}, name="ix", index_dir={str(home)!r}, on_batch=lambda b: time.sleep(0.5),
                    log=lambda m: None, **{FAST!r})
    """)
    first = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = home / ".locks" / "ix.lock"
        for _ in range(600):
            if lock.exists() and lock.read_text().split()[:1] == [str(first.pid)]:
                break
            assert first.poll() is None
            import time
            time.sleep(0.05)
        with pytest.raises(GeoindexError, match=f"pid {first.pid}"):
            build_index(tree, name="ix", index_dir=home, log=lambda m: None, **FAST)
    finally:
        first.kill()
        first.wait()
    # The lock dies with its holder: the next build goes ahead and resumes what the first had saved.
    build_index(tree, name="ix", index_dir=home, log=lambda m: None, **FAST)
    assert leftovers(home) == []


FINETUNE = textwrap.dedent("""
    import sys
    import torch
    from geoindex.geo_index import load_index
    from geoindex.heads import train_finetune
    device = sys.argv[3]
    if device == "cuda":  # cuDNN's fastest kernels sum in a varying order: two equal runs would already differ
        torch.use_deterministic_algorithms(True, warn_only=True)
    index = load_index(sys.argv[1], sys.argv[2])
    train_finetune(index, epochs=2, patience=5, batch_size=8, device=device, num_workers=0, seed=0, progress=False,
                   resume=len(sys.argv) > 4, log=lambda m: None)
""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: a checkpoint resumed on the GPU is untested"))])
def test_fine_tuning_killed_after_an_epoch_resumes_to_the_same_weights(reference, tmp_path, device):
    home = tmp_path / "home"
    for name in ("a", "b"):
        shutil.copytree(reference, home / name)
        manifest = json.loads((home / name / "manifest.json").read_text())
        (home / name / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what deterministic cuBLAS asks for
    plain = subprocess.run([sys.executable, "-c", FINETUNE, "a", str(home), device], capture_output=True, text=True,
                           env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    killed = subprocess.run([sys.executable, "-c", FINETUNE, "b", str(home), device], capture_output=True, text=True,
                            env={**env, "GEOINDEX_FAULT": "train-epoch:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (home / "b" / "heads" / "finetune" / "meta.json").exists()
    resumed = subprocess.run([sys.executable, "-c", FINETUNE, "b", str(home), device, "resume"], capture_output=True,
                             text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for file in ("backbone.pt", "head.pt"):
        a = torch.load(home / "a" / "heads" / "finetune" / file, weights_only=True)
        b = torch.load(home / "b" / "heads" / "finetune" / file, weights_only=True)
        # on the GPU not every kernel sums in a fixed order (warn_only above): equal up to that rounding
        same = torch.equal if device == "cpu" else lambda x, y: torch.allclose(x, y, rtol=1e-3, atol=1e-5)
        assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a), file
    ha, hb = (json.loads((home / n / "heads" / "finetune" / "meta.json").read_text()) for n in ("a", "b"))
    assert ha["best_epoch"] == hb["best_epoch"] and ha["best_val_accuracy"] == hb["best_val_accuracy"]
