"""Adapting an index's backbone: the tail fine-tuning of geoindex.adapt and the re-embedding it ends with."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from geoindex import build_index
from geoindex.backbones import create_backbone, tail_split
from geoindex.cli import main
from geoindex.errors import GeoindexError
from geoindex.geo_index import load_index
from geoindex.integrity import IndexCorrupt

REPO = Path(__file__).resolve().parents[1]
EFFNET_RANDOM = dict(backbone="effnet", weights="none", image_size=64, batch_size=8, num_workers=0, progress=False)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", ["effnet", "effnet-duo"])
def test_trunk_then_tail_is_the_whole_model(name):
    backbone = create_backbone(name, weights="none", image_size=96)
    split = tail_split(backbone)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        whole, parts = backbone.model(x), split.tail(split.trunk(x))
        assert split.trunk(x).shape == (3, split.trunk_dim)
    assert torch.equal(whole, parts)
    tail_ids = {id(p) for p in split.parameters}
    assert 0 < len(tail_ids) < len(list(backbone.model.parameters()))  # the trunk is not trained
    assert not any(id(p) in tail_ids for p in backbone.model.members[0].net.conv_stem.parameters()) if name == \
        "effnet-duo" else not any(id(p) in tail_ids for p in backbone.model.net.conv_stem.parameters())


def test_tail_split_refuses_backbones_it_cannot_cut():
    with pytest.raises(GeoindexError, match="EfficientNet-Lite backbones.*--mode finetune"):
        tail_split(create_backbone("resnet18", weights="none"))


@pytest.fixture(scope="module")
def pretrained_index(tree, tmp_path_factory):
    home = tmp_path_factory.mktemp("adapt")
    build_index(tree, name="ix", index_dir=home, log=lambda m: None, **EFFNET_RANDOM)
    return home / "ix"


def copy_index(source: Path, home: Path, name: str) -> Path:
    shutil.copytree(source, home / name)
    manifest = json.loads((home / name / "manifest.json").read_text())
    (home / name / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    return home / name


def test_train_adapts_the_index_and_queries_are_embedded_as_it_was(pretrained_index, tmp_path):
    home = tmp_path / "home"
    path = copy_index(pretrained_index, home, "ix")
    before = load_index(path, device="cpu")
    old = {s: before.store.embeddings(s) for s in ("train", "val", "test")}
    old_meta = before.store.metadata("train").copy()
    before.close()

    result = run("train", "--index", "ix", "--index-dir", home, "--epochs", "2", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "tail epoch  1" in result.output and "re-embedded" in result.output and "kNN tuned on val" in result.output

    index = load_index(path, device="cpu")
    manifest = index.manifest
    assert manifest["adapted"]["mode"] == "tail" and manifest["adapted"]["tuned_on"] == "val"
    assert manifest["weights"]["source"] == "file" and manifest["weights"]["path"] == "backbone.pt"
    assert "backbone.pt" in manifest["files"] and (path / "backbone.pt").is_file()
    assert manifest["counts"] == {s: len(v) for s, v in old.items()}
    # Same rows, same order, same metadata; new vectors.
    assert index.store.metadata("train").equals(old_meta)
    assert not np.allclose(index.store.embeddings("train"), old["train"], atol=1e-3)
    # A query is embedded with the tuned backbone: an indexed photo finds itself at similarity ~1.
    photo = old_meta["path"].iat[0]
    own = index.query([photo], k=1)[0]
    assert own.neighbours[0].path == photo and own.neighbours[0].similarity > 0.999
    assert (path / "heads" / "tail" / "curves.png").is_file() and (path / "heads" / "tail" / "history.csv").is_file()
    assert not (path / "heads" / "tail" / "checkpoint.pt").exists()
    assert (path / "heads" / "probe" / "head.pt").is_file()
    assert not (home / ".staging").exists()
    build_id = manifest["build_id"]
    index.close()

    again = run("train", "--index", "ix", "--index-dir", home, "--device", "cpu")
    assert again.exit_code == 0 and "already adapted" in again.output
    assert json.loads((path / "manifest.json").read_text())["build_id"] == build_id  # not re-adapted
    refused = run("train", "--index", "ix", "--index-dir", home, "--mode", "tail", "--device", "cpu")
    assert refused.exit_code == 1 and "already adapted" in refused.output and "Traceback" not in refused.output

    data = bytearray((path / "backbone.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "backbone.pt").write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match="backbone.pt"):
        load_index(path, device="cpu", verify=True)


def test_train_probe_mode_leaves_the_backbone_alone(pretrained_index, tmp_path):
    path = copy_index(pretrained_index, tmp_path, "ix")
    result = run("train", "--index", "ix", "--index-dir", tmp_path, "--mode", "probe", "--device", "cpu")
    assert result.exit_code == 0, result.output
    manifest = json.loads((path / "manifest.json").read_text())
    assert "adapted" not in manifest and manifest["weights"]["source"] == "random"


ADAPT = textwrap.dedent("""
    import sys
    from geoindex.adapt import adapt_index
    from geoindex.geo_index import load_index
    # batch_size 4: several batches an epoch, so a resumed run that shuffled otherwise would train other weights
    result = adapt_index(load_index(sys.argv[1], sys.argv[2], device="cpu"), epochs=3, patience=5, device="cpu",
                         num_workers=0, progress=False, log=print, batch_size=4)
    assert result.weights.is_file() and result.index.manifest["adapted"]["mode"] == "tail"
""")


@pytest.mark.parametrize("fault", ["tail-epoch:2", "reembed-h5:1"])
def test_adapting_killed_midway_resumes_to_the_same_index(pretrained_index, tmp_path, fault):
    home = tmp_path / "home"
    for name in ("a", "b"):
        copy_index(pretrained_index, home, name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GEOINDEX_FAULT", None)
    plain = subprocess.run([sys.executable, "-c", ADAPT, "a", str(home)], capture_output=True, text=True, env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    killed = subprocess.run([sys.executable, "-c", ADAPT, "b", str(home)], capture_output=True, text=True,
                            env={**env, "GEOINDEX_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    old = json.loads((home / "b" / "manifest.json").read_text())
    assert "adapted" not in old  # the index still answers as it was
    listed = subprocess.run([sys.executable, "-m", "geoindex.cli", "indexes", "--index-dir", str(home)],
                            capture_output=True, text=True, env=env).stdout
    assert "rerun `geoindex train --index b`" in listed and "geoindex rm b --unfinished" in listed, listed
    resumed = subprocess.run([sys.executable, "-c", ADAPT, "b", str(home)], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the tail fine-tuning after epoch" in resumed.stdout
    if fault.startswith("tail-epoch"):  # the trunk features come from the interrupted run, not computed again
        assert "read from trunk_features.npz" in resumed.stdout
        assert re.search(r"trunk features of [\d,]+ photos in ", plain.stdout) and "read from" not in plain.stdout
    a = torch.load(home / "a" / "backbone.pt", weights_only=True)
    b = torch.load(home / "b" / "backbone.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ia, ib = load_index(home / "a", device="cpu"), load_index(home / "b", device="cpu")
    assert np.array_equal(ia.store.embeddings("train"), ib.store.embeddings("train"))
    assert ia.manifest["adapted"]["best_epoch"] == ib.manifest["adapted"]["best_epoch"]
    assert not (home / ".staging").exists() and not list(home.rglob("*.tmp"))


def geoindex_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "geoindex.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=600)


def test_train_killed_while_re_embedding_is_described_right_and_rm_unfinished_keeps_the_index(pretrained_index,
                                                                                               tmp_path):
    home = tmp_path / "home"
    copy_index(pretrained_index, home, "ix")
    killed = geoindex_cli("train", "--index", "ix", "--index-dir", home, "--epochs", "1", "--workers", "0",
                          "--device", "cpu", env={"GEOINDEX_FAULT": "reembed-h5:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    listed = geoindex_cli("indexes", "--index-dir", home)
    assert listed.returncode == 0, listed.stderr
    # The advice names what finishes it (train, not a build) and a removal that keeps the working index.
    assert "geoindex train --index ix" in listed.stdout and "geoindex rm ix --unfinished" in listed.stdout
    assert "rerun the build" not in listed.stdout
    removed = geoindex_cli("rm", "ix", "--unfinished", "--yes", "--index-dir", home)
    assert removed.returncode == 0, removed.stderr
    assert not (home / ".staging").exists() and not (home / "ix" / "heads" / "tail" / "checkpoint.pt").exists()
    index = load_index(home / "ix", device="cpu", verify=True)  # the index as it was, whole
    assert "adapted" not in index.manifest and index.manifest == json.loads((pretrained_index / "manifest.json")
                                                                            .read_text())
    index.close()
    listed = geoindex_cli("indexes", "--index-dir", home)
    assert "unfinished" not in listed.stdout and "ix" in listed.stdout and "BROKEN" not in listed.stdout
    nothing = geoindex_cli("rm", "ix", "--unfinished", "--yes", "--index-dir", home)
    assert nothing.returncode == 1 and "nothing unfinished" in nothing.stderr and (home / "ix").is_dir()


def test_demo_adapts_as_train_does_unless_told_not_to(gsv_tree, tmp_path):
    adapted = run("demo", "--data", gsv_tree, "--backbone", "effnet", "--index-dir", tmp_path / "a", "--device", "cpu")
    assert adapted.exit_code == 0, adapted.output
    assert "adapting the backbone" in adapted.output and "re-embedded" in adapted.output
    manifest = json.loads(next((tmp_path / "a").glob("*/manifest.json")).read_text())
    assert manifest["adapted"]["mode"] == "tail"
    plain = run("demo", "--data", gsv_tree, "--backbone", "effnet", "--no-adapt", "--index-dir", tmp_path / "b",
                "--device", "cpu")
    assert plain.exit_code == 0, plain.output
    assert "adapting" not in plain.output
    assert "adapted" not in json.loads(next((tmp_path / "b").glob("*/manifest.json")).read_text())


def test_a_full_disk_during_train_stops_with_one_line_and_the_rerun_finishes(pretrained_index, tmp_path):
    from conftest import small_tmpfs

    def error_lines(proc):
        assert "Traceback" not in proc.stderr and proc.returncode == 1, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1, proc.stderr[-3000:]
        return lines[0]

    train = ("train", "--index", "ix", "--epochs", "1", "--workers", "0", "--device", "cpu")
    with small_tmpfs(tmp_path / "small", "400m") as mount:
        copy_index(pretrained_index, mount, "ix")
        filler = mount / "filler"

        def leave_free(nbytes: int):
            filler.unlink(missing_ok=True)
            with open(filler, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, shutil.disk_usage(mount).free - nbytes)

        # Room for the trunk features, not for the tail checkpoint (torch.save fails without an errno).
        leave_free(8 << 20)
        line = error_lines(geoindex_cli(*train, "--index-dir", mount))
        assert "disk full" in line and "tail checkpoint of epoch 1" in line and "rerun" in line
        assert "adapted" not in load_index(mount / "ix", device="cpu", verify=True).manifest
        assert not list(mount.rglob("*.tmp"))

        # Fine-tuned in full, then killed while re-embedding; its staging gone, the disk too small to re-embed.
        filler.unlink()
        killed = geoindex_cli(*train, "--index-dir", mount, env={"GEOINDEX_FAULT": "reembed-h5:1"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        shutil.rmtree(mount / ".staging")
        tuned = (mount / "ix" / "heads" / "tail" / "backbone.pt").stat().st_size
        leave_free(tuned + (3 << 19))  # room to save the tuned backbone again, not for a second copy of the index
        line = error_lines(geoindex_cli(*train, "--index-dir", mount))
        assert "disk full" in line and "re-embedding" in line and "rerun `geoindex train`" in line
        assert "adapted" not in load_index(mount / "ix", device="cpu", verify=True).manifest
        assert not (mount / ".staging").exists()

        filler.unlink()
        done = geoindex_cli(*train, "--index-dir", mount)
        assert done.returncode == 0, done.stderr[-2000:]
        assert load_index(mount / "ix", device="cpu", verify=True).manifest["adapted"]["mode"] == "tail"
