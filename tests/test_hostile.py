"""Hostile input: bombs, lying headers, planted pickles, swapped or edited index files, path tricks.

Every case must end in one clear line (CLI) or a GeoindexError (API), never a traceback, never
running code read from disk, never deleting or writing outside what geoindex made.
"""
import json
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import small_tmpfs
import torch
from PIL import Image

from geoindex import build_index
from geoindex.errors import GeoindexError, ImageError
from geoindex.geo_index import load_index
from geoindex.images import load_image

FAST = dict(backbone="cnn", weights="none", image_size=32, batch_size=8, num_workers=0, progress=False)
REPO = Path(__file__).resolve().parents[1]
TQDM = re.compile(r"\d+%\|")  # progress bars on stderr are not messages


def cli(*args, env=None):
    """The `geoindex` command, run in this process (fast); an uncaught exception shows up as a Traceback in stderr."""
    from click.testing import CliRunner
    from geoindex.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        stderr += "Traceback\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not TQDM.search(line)]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def png_bomb(path, side=12000):
    """A side x side grey PNG of ~140 KB: decoding it whole would take side^2 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def lying_jpeg(path, claimed=12000):
    """A 160 x 120 JPEG whose header claims claimed x claimed pixels."""
    import io
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", claimed, claimed)
    path.write_bytes(bytes(data))
    return path


class Payload:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def home(tree, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    build_index(tree, name="good", index_dir=home, log=lambda m: None, **FAST)
    return home


def fresh_copy(home, name, tmp_path):
    """A private copy of the good index to damage."""
    target = tmp_path / "h"
    shutil.copytree(home / "good", target / name)
    manifest = json.loads((target / name / "manifest.json").read_text())
    (target / name / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    return target


# ------------------------------------------------------------------------------------------ images
def test_png_bomb_is_refused_before_decoding(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    start = time.perf_counter()
    with pytest.raises(ImageError, match="MP limit"):
        load_image(bomb)
    assert time.perf_counter() - start < 1.0  # nothing was decoded


def test_jpeg_that_lies_about_its_size_is_refused_as_truncated(tmp_path):
    liar = lying_jpeg(tmp_path / "liar.jpg")
    with pytest.raises(ImageError, match="truncated"):
        load_image(liar, draft_size=256)  # as a build decodes it: drafted to 1500 x 1500, under the limit
    with pytest.raises(ImageError, match="MP limit"):
        load_image(liar)  # undrafted it is 144 MP: refused before decoding
    small = lying_jpeg(tmp_path / "small.jpg", claimed=2000)
    with pytest.raises(ImageError, match="truncated"):
        load_image(small)
    good = tmp_path / "good.jpg"
    Image.new("RGB", (160, 120), (128, 128, 128)).save(good)  # honest mid-grey photos: the one accepted loss
    Image.new("RGB", (160, 120), (120, 130, 140)).save(good)
    assert load_image(good).size == (160, 120)


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that leaves a marker file whenever it runs: PIL decodes EPS by running whatever `gs`
    it finds, as the user geoindex runs as. Returns the marker's path; it must never exist."""
    import os

    import PIL.EpsImagePlugin
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-ran"
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(PIL.EpsImagePlugin, "gs_binary", None)  # PIL looks for gs once, on first use: look again
    return marker


FOREIGN_FORMATS = ("EPS", "GIF", "ICO", "TGA", "PPM", "PCX")  # PIL reads them all; geoindex must not


def foreign_images(folder: Path, stem: str = "photo") -> list[Path]:
    """One picture per format geoindex does not read, each behind a .jpg name (as scraped data mislabels files)."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    paths = []
    for i, fmt in enumerate(FOREIGN_FORMATS):
        path = folder / stem.format(i=i, fmt=fmt.lower())
        picture.save(path, format=fmt)
        paths.append(path)
    return paths


def test_formats_geoindex_does_not_read_are_not_images_and_never_run_ghostscript(tmp_path, fake_ghostscript):
    for path in foreign_images(tmp_path / "in", "{fmt}.jpg"):
        with pytest.raises(ImageError, match="not an image") as caught:
            load_image(path, draft_size=256)
        assert caught.value.kind == "not_an_image", path
    assert not fake_ghostscript.exists(), "gs ran on an image file"
    allowed = tmp_path / "ok.png"
    Image.new("RGB", (64, 48), (10, 120, 200)).save(allowed)
    assert load_image(allowed).size == (64, 48)


def test_eps_behind_a_jpg_name_is_skipped_by_build_and_refused_by_query(tree, home, tmp_path, fake_ghostscript):
    data = tmp_path / "data"
    shutil.copytree(tree, data)
    # GSV-Cities names, so the scan takes them for Osaka photos.
    foreign = foreign_images(data / "Images" / "Osaka", "Osaka_00009{i}0_2020_01_000_34.690000_135.500000_{fmt}.jpg")
    report = build_index(data, name="eps", index_dir=tmp_path / "idx", log=lambda m: None, **FAST)
    reasons = {item["path"]: item["reason"] for item in report.skipped}
    for path in foreign:
        assert "not an image" in reasons[str(path)], reasons
    assert report.manifest["counts"]["train"] > 0  # the build went on past them
    proc = cli("query", foreign[0], "--index", "good", "--index-dir", home)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{foreign[0]}: not an image" in proc.stderr
    assert not fake_ghostscript.exists(), "gs ran on an image file"


def test_hostile_images_in_a_build_are_skipped_with_reasons_and_duplicates_kept_out_of_test(tree, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tree, data)
    city = data / "Images" / "Barcelona"
    stem = "Barcelona_{:07d}_2020_01_000_41.400000_2.170000_{}"
    bomb = png_bomb(city / (stem.format(900, "bomb") + ".png"))
    liar = lying_jpeg(city / (stem.format(901, "liar") + ".jpg"))
    # The same bytes under three cities.
    original = sorted((data / "Images" / "London").glob("*.jpg"))[0]
    copies = []
    for i, other in enumerate(("Barcelona", "Osaka")):
        copy = data / "Images" / other / original.name.replace("London", other).replace("_0000000_", f"_00009{i}0_")
        shutil.copyfile(original, copy)
        copies.append(copy)
    report = build_index(data, name="h", index_dir=tmp_path / "idx", log=lambda m: None, max_pixels=20_000_000,
                         **FAST)
    reasons = {item["path"]: item["reason"] for item in report.skipped}
    assert "MP limit" in reasons[str(bomb)] and "truncated" in reasons[str(liar)]
    group = [d for d in report.duplicates if str(original) in d["paths"]]
    assert len(group) == 1 and sorted(group[0]["cities"]) == ["Barcelona", "London", "Osaka"]
    index = load_index("h", tmp_path / "idx")
    held_out = set(index.store.metadata("val")["path"]) | set(index.store.metadata("test")["path"])
    assert not held_out & {str(original), *map(str, copies)}
    assert report.manifest["duplicates"]["across_cities"] == 1
    assert report.extracted_rows == 30 + 2 and report.failed_rows == 2  # honest counts
    manifest_bytes = (index.path / "manifest.json").stat().st_size
    assert manifest_bytes < 20_000 and report.manifest["skipped"]["count"] >= 2  # the list lives in skipped.json


# ------------------------------------------------------------------------------------------ planted pickles
def test_planted_head_is_refused_and_never_runs(home, tmp_path):
    h = fresh_copy(home, "planted", tmp_path)
    marker = tmp_path / "RAN"
    folder = h / "planted" / "heads" / "probe"
    folder.mkdir(parents=True)
    torch.save({"linear.weight": Payload(marker)}, folder / "head.pt")
    (folder / "meta.json").write_text(json.dumps({"mode": "probe", "classes": json.loads(
        (h / "planted" / "manifest.json").read_text())["classes"], "embed_dim": 512}))
    photo = sorted(Path(json.loads((h / "planted" / "manifest.json").read_text())["data_root"]).rglob("*.jpg"))[0]
    proc = cli("query", photo, "--index", "planted", "--index-dir", h)
    one_line_error(proc, "refusing probe head", "nothing in it ran")
    assert not marker.exists()


def test_planted_checkpoint_is_refused_by_train_resume(home, tmp_path):
    h = fresh_copy(home, "ckpt", tmp_path)
    marker = tmp_path / "RAN"
    folder = h / "ckpt" / "heads" / "finetune"
    folder.mkdir(parents=True)
    torch.save({"model": Payload(marker), "epoch": 1}, folder / "checkpoint.pt")
    proc = cli("train", "--index", "ckpt", "--index-dir", h, "--mode", "finetune", "--resume", "--workers", "0",
               "--device", "cpu")
    one_line_error(proc, "refusing fine-tuning checkpoint", "checkpoint.pt")
    assert not marker.exists()


def test_planted_checkpoint_shard_is_refused_and_never_runs(tree, tmp_path):
    marker = tmp_path / "RAN"

    def stop(batch):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # a real unfinished build, then a shard planted beside its own
        build_index(tree, name="p", index_dir=tmp_path / "idx", on_batch=stop, log=lambda m: None, **FAST)
    cache = tmp_path / "idx" / ".staging" / "p" / "cache"
    assert list(cache.glob("shard-*.npz"))
    np.savez(cache / "shard-000009.npz", paths=np.array([Payload(marker)], dtype=object))
    with pytest.raises(GeoindexError, match="not a geoindex checkpoint"):
        build_index(tree, name="p", index_dir=tmp_path / "idx", log=lambda m: None, **FAST)
    assert not marker.exists()


def test_training_with_no_readable_photo_stops_and_saves_nothing(home, tmp_path):
    h = fresh_copy(home, "moved", tmp_path)
    with h5py.File(h / "moved" / "embeddings.h5", "r+") as f:  # photos that moved away since the build
        for split in ("train", "val", "test"):
            f[split]["path"][...] = np.array([f"/nonexistent/{i}.jpg" for i in range(f[split]["path"].shape[0])],
                                             dtype=object)
    from geoindex.integrity import describe_files
    manifest = json.loads((h / "moved" / "manifest.json").read_text())
    manifest["files"] = describe_files(h / "moved", manifest["files"])  # a consistent index, only the photos are gone
    (h / "moved" / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("train", "--index", "moved", "--index-dir", h, "--mode", "finetune", "--workers", "0", "--device", "cpu",
               "--epochs", "1")
    one_line_error(proc, "none of the", "could be read", "nothing was trained")
    assert not (h / "moved" / "heads" / "finetune" / "head.pt").exists()


# ------------------------------------------------------------------------------------------ index files
def test_faiss_index_from_another_index_is_refused(home, tree, tmp_path):
    h = fresh_copy(home, "swapped", tmp_path)
    build_index(tree, name="other", index_dir=h, log=lambda m: None, **{**FAST, "image_size": 40})
    assert (h / "other" / "faiss.index").stat().st_size == (h / "swapped" / "faiss.index").stat().st_size
    shutil.copy2(h / "other" / "faiss.index", h / "swapped" / "faiss.index")  # same size, even the same mtime
    photo = next(tree.rglob("*.jpg"))
    one_line_error(cli("query", photo, "--index", "swapped", "--index-dir", h), "faiss.index", "checksum")
    listed = cli("indexes", "--index-dir", h)
    assert listed.returncode == 0 and "swapped" in listed.stdout and "BROKEN" in listed.stdout
    assert "other" in listed.stdout.replace("swapped", "")


def test_labels_edited_in_embeddings_are_refused(home, tree, tmp_path):
    h = fresh_copy(home, "edited", tmp_path)
    with h5py.File(h / "edited" / "embeddings.h5", "r+") as f:
        labels = f["train"]["label"][...]
        f["train"]["label"][...] = (labels + 1) % 3
    with pytest.raises(GeoindexError, match="embeddings.h5 differs"):
        load_index("edited", h)


@pytest.mark.parametrize("damage", ["manifest-garbage", "manifest-missing", "faiss-missing", "faiss-truncated",
                                    "h5-garbage"])
def test_damaged_index_files_give_one_line_and_do_not_hide_the_others(home, tree, tmp_path, damage):
    h = fresh_copy(home, "damaged", tmp_path)
    shutil.copytree(home / "good", h / "good")
    folder = h / "damaged"
    if damage == "manifest-garbage":
        (folder / "manifest.json").write_text("{not json")
    elif damage == "manifest-missing":
        (folder / "manifest.json").unlink()
    elif damage == "faiss-missing":
        (folder / "faiss.index").unlink()
    elif damage == "faiss-truncated":
        data = (folder / "faiss.index").read_bytes()
        (folder / "faiss.index").write_bytes(data[: len(data) // 2])
    else:
        size = (folder / "embeddings.h5").stat().st_size
        (folder / "embeddings.h5").write_bytes(b"garbage!" * (size // 8) + b"g" * (size % 8))
    photo = next(tree.rglob("*.jpg"))
    one_line_error(cli("query", photo, "--index", "damaged", "--index-dir", h), "damaged")
    listed = cli("indexes", "--index-dir", h)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert "BROKEN" in lines["damaged"] and "BROKEN" not in lines["good"]
    assert cli("query", photo, "--index", "good", "--index-dir", h).returncode == 0


# ------------------------------------------------------------------------------------------ names and folders
def test_index_names_are_names_not_paths(tree, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in ("../escaped", "/tmp/escaped", "a/b", ".hidden", ".."):
        one_line_error(cli("build", "--data", tree, "--name", name, "--index-dir", home, "--backbone", "cnn",
                           "--weights", "none"), "not a plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and list(home.iterdir()) == []


def test_overwrite_and_rm_never_delete_a_folder_geoindex_did_not_make(tree, tmp_path):
    home = tmp_path / "home"
    precious = home / "precious"
    precious.mkdir(parents=True)
    (precious / "manifest.json").write_text('{"mine": true}')
    (precious / "thesis.tex").write_text("years of work")
    one_line_error(cli("build", "--data", tree, "--name", "precious", "--overwrite", "--index-dir", home,
                       "--backbone", "cnn", "--weights", "none"), "not made by geoindex")
    one_line_error(cli("rm", "precious", "--yes", "--index-dir", home), "geoindex did not make it")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_rm_removes_an_index_it_made(home, tmp_path):
    h = fresh_copy(home, "gone", tmp_path)
    proc = cli("rm", "gone", "--yes", "--index-dir", h)
    assert proc.returncode == 0 and not (h / "gone").exists()


# ------------------------------------------------------------------------------------------ environment
def test_index_home_that_is_a_file_gives_one_line(tree):
    photo = next(tree.rglob("*.jpg"))
    env = {"GEOINDEX_HOME": "/etc/passwd"}
    for args in (("query", photo), ("indexes",), ("build", "--data", tree, "--backbone", "cnn", "--weights", "none")):
        one_line_error(cli(*args, env=env), "GEOINDEX_HOME=/etc/passwd is a file")


def test_read_only_index_folder_answers_queries_and_refuses_builds_in_one_line(home, tree, tmp_path):
    # A read-only mount: root ignores file permissions, so chmod would prove nothing.
    with small_tmpfs(tmp_path / "ro", "20m") as mount:
        shutil.copytree(home / "good", mount / "good")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        photo = next(tree.rglob("*.jpg"))
        assert cli("query", photo, "--index", "good", "--index-dir", mount).returncode == 0
        one_line_error(cli("build", "--data", tree, "--name", "new", "--index-dir", mount, "--backbone", "cnn",
                           "--weights", "none"), "Read-only file system")


# ------------------------------------------------------------------------------------------ query
def test_query_answers_the_good_photos_and_reports_the_bad(home, tree, tmp_path):
    good = sorted(tree.rglob("*.jpg"))[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a photo")
    proc = cli("query", good[0], bad, good[1], "--index", "good", "--index-dir", home, "--json")
    assert proc.returncode == 1
    payload = json.loads(proc.stdout)
    assert [r["source"] for r in payload["results"]] == [str(good[0]), str(good[1])]
    assert payload["index"] == "good" and payload["errors"] == [{"source": str(bad), "error": "not an image "
                                                                 "(unrecognised format)"}]
    text = cli("query", good[0], bad, "--index", "good", "--index-dir", home)
    assert text.returncode == 1 and "index: good" in text.stdout and "SYNTHETIC" in text.stdout
    assert re.search(r"city: (Barcelona, Spain|London, United Kingdom|Osaka, Japan)", text.stdout)
    assert "similarity" in text.stdout and f"{bad}: not an image" in text.stderr
    csv = cli("query", *good, "--index", "good", "--index-dir", home, "--csv")
    assert csv.returncode == 0 and csv.stdout.splitlines()[0].startswith("source,city,name")
    assert len(csv.stdout.splitlines()) == 3
