"""`geoindex build --data NEW --features-from NAME`: new photos indexed with NAME's backbone, tuned weights and kNN
settings, every one searchable; what is copied, what is refused, and that the new index stands alone."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import build_cnn_index

from geoindex.cli import main
from geoindex.geo_index import load_index
from geoindex.layout import KNN_PARAMS, STREET_INDEX, STREET_WHITENING, TUNED_WEIGHTS, WHITENED_INDEX, WHITENING
from geoindex.search import load_index_file
from geoindex.synthetic import make_synthetic_gsv
from geoindex.tuning import load_knn_tuning
from geoindex.whitening import Whitening

STREET = {"threshold": 0.0, "radius_m": 12.5, "city_radius_m": 4000.0, "space": {"dims": 16, "power": 1.0}}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def photos_of(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "Images").rglob("*.jpg"))


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("fromidx")
    source = make_synthetic_gsv(base / "source", cities=("Barcelona", "London", "Osaka"), places_per_city=6,
                                images_per_place=2, image_size=(40, 32))
    new = make_synthetic_gsv(base / "new", cities=("London", "PRS"), places_per_city=4, images_per_place=2,
                             image_size=(40, 32), seed=5)
    return source, new


@pytest.fixture(scope="module")
def source_home(trees, tmp_path_factory):
    """Index `src`: a tiny CNN whose weights are a file (as a tuned backbone.pt is), trained, with kNN settings that
    whiten and answer at street level, so every part `--features-from` copies is there to copy."""
    home = tmp_path_factory.mktemp("fromidx-home")
    from geoindex.backbones import create_backbone
    model = create_backbone("cnn", weights="none", image_size=32).model
    with torch.no_grad():  # weights of its own, unlike the seeded random ones
        for p in model.parameters():
            p.add_(0.01)
    weights = home.parent / "cnn-tuned.pt"
    torch.save(model.state_dict(), weights)
    result = CliRunner().invoke(main, ["build", "--data", str(trees[0]), "--backbone", "cnn", "--weights", str(weights),
                                       "--image-size", "32", "--workers", "0", "--name", "src", "--index-dir", str(home)])
    assert result.exit_code == 0, result.output
    trained = run("train", "--index", "src", "--index-dir", home, "--epochs", "3")
    assert trained.exit_code == 0, trained.output
    index = load_index("src", home)
    train = index.store.embeddings("train")
    folder = home / "src"
    params = json.loads((folder / KNN_PARAMS).read_text())
    Whitening.fit(train).using(32, 0.5).save(folder / WHITENING)
    Whitening.fit(train).using(STREET["space"]["dims"], STREET["space"]["power"]).save(folder / STREET_WHITENING)
    params.update(whiten={"dims": 32, "power": 0.5}, street=STREET, k=3, vote="weighted")
    (folder / KNN_PARAMS).write_text(json.dumps(params))
    index.close()
    return home


@pytest.fixture(scope="module")
def gallery(source_home, trees):
    result = run("build", "--data", trees[1], "--features-from", "src", "--workers", "0", "--name", "gallery",
                 "--index-dir", source_home)
    assert result.exit_code == 0, result.output
    return source_home / "gallery", result.output


def test_every_photo_is_searchable_with_the_sources_backbone_and_weights(gallery, source_home, trees):
    folder, output = gallery
    assert "features   from index 'src'" in output and "not copied" in output and "searchable" in output
    index = load_index(folder)
    source = load_index(source_home / "src")
    m = index.manifest
    assert index.ntotal == len(photos_of(trees[1])) == m["counts"]["train"]
    assert m["counts"]["val"] == m["counts"]["test"] == 0 and m["split"]["by"] == "none"
    assert sorted(index.classes) == ["London", "PRS"]  # the new data's cities, one the source never saw
    assert m["backbone"] == source.manifest["backbone"] and m["image_size"] == source.manifest["image_size"]
    assert m["weights"]["sha256"] == source.manifest["weights"]["sha256"] and m["weights"]["path"] == TUNED_WEIGHTS
    assert TUNED_WEIGHTS in m["files"] and (folder / TUNED_WEIGHTS).is_file()
    record = m["features_from"]
    assert record["name"] == "src" and record["build_id"] == source.manifest["build_id"]
    assert record["weights"]["sha256"] == source.manifest["weights"]["sha256"] and record["knn"]["k"] == 3
    # The same photo embedded through the source and through the new index: the same vector.
    photo = photos_of(trees[1])[0]
    assert np.allclose(index.backbone.embed([photo]), source.backbone.embed([photo]), atol=1e-5)
    index.close(), source.close()


def test_knn_settings_are_copied_for_the_new_build_and_their_spaces_rebuilt(gallery, source_home):
    folder, _ = gallery
    index = load_index(folder)
    mine = json.loads((folder / KNN_PARAMS).read_text())
    theirs = json.loads((source_home / "src" / KNN_PARAMS).read_text())
    assert mine["build_id"] == index.manifest["build_id"] != theirs["build_id"]
    for key in ("k", "vote", "temperature", "unlike_threshold", "street", "whiten", "tuned_on"):
        assert mine[key] == theirs[key], key
    for space, built in ((WHITENING, WHITENED_INDEX), (STREET_WHITENING, STREET_INDEX)):
        assert (folder / space).read_bytes() == (source_home / "src" / space).read_bytes()
        searchable = load_index_file(folder / built)
        assert searchable.ntotal == index.ntotal and searchable.d == Whitening.load(folder / space).dims
    tuning = load_knn_tuning(index)  # accepted: bound to this build, spaces of this index's rows
    assert tuning["k"] == 3 and tuning["street"] == STREET
    assert tuning["whitened_index"].ntotal == tuning["street_index"].ntotal == index.ntotal
    index.close()


def test_query_json_finds_the_photo_itself_at_street_level(gallery, trees):
    folder, _ = gallery
    photo = photos_of(trees[1])[3]
    result = run("query", photo, "--index", "gallery", "--index-dir", folder.parent, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)["results"][0]
    assert answer["neighbours"][0]["path"] == photo and answer["neighbours"][0]["similarity"] > 0.999
    assert answer["gps"]["level"] == "street" and answer["gps"]["radius_m"] == STREET["radius_m"]
    assert answer["method"] == "knn"


def test_query_reads_a_csv_of_photos_in_its_order_relative_to_its_folder(gallery, trees, tmp_path):
    folder, _ = gallery
    chosen = photos_of(trees[1])[:4][::-1]
    listing = trees[1] / "queries.csv"
    listing.write_text("path,note\n" + "".join(f"{os.path.relpath(p, trees[1])},x\n" for p in chosen)
                       + "missing.jpg,y\n")
    result = run("query", listing, "--index", "gallery", "--index-dir", folder.parent, "--json")
    assert result.exit_code == 1  # one listed photo is missing: reported in its place
    out = json.loads(result.stdout)
    assert [r["neighbours"][0]["path"] for r in out["results"]] == chosen
    assert [r["source"] for r in out["results"]] == chosen
    assert len(out["errors"]) == 1 and out["errors"][0]["source"].endswith("missing.jpg")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,city\na.jpg,London\n")
    refused = run("query", bad, "--index", "gallery", "--index-dir", folder.parent, "--json")
    assert refused.exit_code == 1 and "needs a path column" in refused.output and "Traceback" not in refused.output
    # A dataset folder (no photo at its top level) stands for the photos below it.
    tree = run("query", trees[1] / "Images", "--index", "gallery", "--index-dir", folder.parent, "--json")
    assert tree.exit_code == 0 and len(json.loads(tree.stdout)["results"]) == len(photos_of(trees[1]))


def test_train_and_bench_say_in_one_line_why_not(gallery):
    folder, _ = gallery
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    refused = run("train", "--index", "gallery", "--index-dir", folder.parent)
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and "--features-from src" in refused.output
    assert "geoindex train --index src" in refused.output
    import geoindex
    with pytest.raises(geoindex.GeoindexError, match="features-from"):
        geoindex.train("gallery", index_dir=folder.parent, mode="probe", log=lambda m: None)
    bench = run("bench", "--index", "gallery", "--index-dir", folder.parent, "--methods", "knn")
    assert bench.exit_code != 0 and len(bench.output.strip().splitlines()) == 1 and "--external" in bench.output
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    listed = run("indexes", "--index-dir", folder.parent)
    row = next(line for line in listed.output.splitlines() if line.startswith("gallery"))
    assert "from src" in row and "features from src" in row


@pytest.mark.parametrize("options, said", [
    (["--backbone", "resnet18"], "drop --backbone"), (["--weights", "none"], "drop --weights"),
    (["--image-size", "64"], "drop --image-size"), (["--split-by", "image"], "drop --split-by"),
    (["--features-from", "nope"], "no index named 'nope'"),
    (["--name", "src", "--overwrite"], "names the index being built"),
])
def test_conflicting_options_and_missing_sources_are_refused(source_home, trees, options, said):
    args = ["build", "--data", trees[1], "--workers", "0", "--index-dir", source_home]
    if "--features-from" not in options:
        args += ["--features-from", "src"]
    if "--name" not in options:
        args += ["--name", "refused"]
    result = run(*args, *options)
    assert result.exit_code != 0 and said in result.output and "Traceback" not in result.output, result.output
    assert not (source_home / "refused").exists()


def test_a_source_being_written_is_refused_at_once(source_home, trees):
    lock = source_home / ".locks" / "src.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"os.makedirs({str(lock.parent)!r}, exist_ok=True)\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'{os.getpid()} train\\n'.encode())\n"
        "print('held', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run("build", "--data", trees[1], "--features-from", "src", "--workers", "0", "--name", "busy",
                     "--index-dir", source_home)
        assert result.exit_code != 0 and "is busy" in result.output and "geoindex train" in result.output
    finally:
        holder.kill()
        holder.wait()
    assert not (source_home / "busy").exists()


def test_the_new_index_stands_alone_when_the_source_is_removed(source_home, trees, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(source_home / "src", home / "src")
    built = run("build", "--data", trees[1], "--features-from", "src", "--workers", "0", "--name", "alone",
                "--index-dir", home)
    assert built.exit_code == 0, built.output
    assert run("rm", "src", "--yes", "--index-dir", home).exit_code == 0
    photo = photos_of(trees[1])[5]
    result = run("query", photo, "--index", "alone", "--index-dir", home, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)["results"][0]
    assert answer["neighbours"][0]["path"] == photo and answer["gps"]["level"] == "street"
    # Its copy of the weights is checked like its other files: a changed copy is refused, not used.
    data = bytearray((home / "alone" / TUNED_WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (home / "alone" / TUNED_WEIGHTS).write_bytes(bytes(data))
    refused = run("query", photo, "--index", "alone", "--index-dir", home, "--json", "--verify")
    assert refused.exit_code != 0 and "backbone.pt" in refused.output and "Traceback" not in refused.output


def test_a_query_with_another_backbone_is_refused(gallery, trees):
    folder, _ = gallery
    result = run("query", photos_of(trees[1])[0], "--index", "gallery", "--index-dir", folder.parent,
                 "--backbone", "resnet18")
    assert result.exit_code != 0 and "built with backbone 'cnn'" in result.output


def test_an_adapted_sources_tuned_backbone_is_the_one_used(tree, tmp_path_factory):
    """The path of the issue: build NAME, `train` it (the tail is adapted and the index re-embedded), then index new
    photos with its features: they are embedded with its tuned backbone.pt."""
    import geoindex
    from geoindex import build_index
    from geoindex.backbones import create_backbone

    home = tmp_path_factory.mktemp("fromidx-adapted")
    build_index(tree, name="ix", index_dir=home, backbone="effnet", weights="none", image_size=64, batch_size=8,
                num_workers=0, progress=False, log=lambda m: None)
    geoindex.train("ix", index_dir=home, epochs=1, num_workers=0, device="cpu", progress=False, log=lambda m: None)
    source = load_index("ix", home, device="cpu")
    assert source.manifest["adapted"] and source.manifest["weights"]["path"] == TUNED_WEIGHTS
    new = build_index(tree / "Images", name="osaka", index_dir=home, features_from=source, num_workers=0,
                      progress=False, log=lambda m: None)
    index = load_index("osaka", home, device="cpu")
    record = index.manifest["features_from"]
    assert record["adapted"]["mode"] == "tail" and record["weights"]["sha256"] == source.manifest["weights"]["sha256"]
    assert (home / "osaka" / TUNED_WEIGHTS).read_bytes() == (home / "ix" / TUNED_WEIGHTS).read_bytes()
    assert new.manifest["config"]["features_from"] == "ix"
    photo = index.store.metadata("train")["path"].iat[0]
    ours, theirs = index.backbone.embed([photo]), source.backbone.embed([photo])
    assert np.allclose(ours, theirs, atol=1e-5)
    assert np.allclose(index.store.embeddings("train")[:1], ours, atol=2e-3)  # stored as float16
    untuned = create_backbone("effnet", weights="none", image_size=64).embed([photo])
    assert not np.allclose(ours, untuned, atol=1e-3), "the tuned weights, not the ones the source started from"
    index.close(), source.close()
