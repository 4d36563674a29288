import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from geoindex.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def cli_index(gsv_tree, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("cli")
    result = run("build", "--data", gsv_tree, "--backbone", "cnn", "--weights", "none", "--image-size", "64",
                 "--batch-size", "16", "--workers", "0", "--name", "tiny", "--index-dir", index_dir)
    assert result.exit_code == 0, result.output
    assert "index 'tiny' written" in result.output and "SYNTHETIC" in result.output
    return index_dir


def test_build_list_query_json(cli_index, gsv_tree):
    listed = run("indexes", "--index-dir", cli_index)
    assert listed.exit_code == 0 and "tiny" in listed.output and "cnn" in listed.output

    photo = next((gsv_tree / "Images" / "Osaka").glob("*.jpg"))
    text = run("query", photo, "--index-dir", cli_index, "--k", "5")
    assert text.exit_code == 0, text.output
    assert "GPS estimate" in text.output and "nearest" in text.output

    out = run("query", photo, photo, "--index", "tiny", "--index-dir", cli_index, "--json")
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["backbone"] == "cnn" and len(payload["results"]) == 2
    first = payload["results"][0]
    assert len(first["top5"]) == 4 and abs(sum(c["probability"] for c in first["top5"]) - 1) < 1e-4
    sims = [n["similarity"] for n in first["neighbours"]]
    assert len(sims) == 5 and sims == sorted(sims, reverse=True) and sims[0] <= 1.001
    assert -90 <= first["gps"]["lat"] <= 90


def test_query_refuses_bad_files_with_one_line(cli_index, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    env = {**os.environ, "GEOINDEX_HOME": str(cli_index)}
    for target, message in ((tmp_path / "missing.jpg", "no such file"), (not_image, "not an image")):
        proc = subprocess.run([sys.executable, "-m", "geoindex.cli", "query", str(target)],
                              capture_output=True, text=True, env=env)
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_query_with_another_backbone_is_refused(cli_index, gsv_tree):
    photo = next((gsv_tree / "Images" / "Osaka").glob("*.jpg"))
    result = run("query", photo, "--index-dir", cli_index, "--backbone", "densenet")
    assert result.exit_code != 0 and "built with backbone 'cnn'" in result.output


def test_unknown_index_lists_what_exists(cli_index, gsv_tree):
    photo = next((gsv_tree / "Images" / "Osaka").glob("*.jpg"))
    result = run("query", photo, "--index", "nope", "--index-dir", cli_index)
    assert result.exit_code != 0 and "tiny" in result.output


def test_build_and_query_with_real_effnet_weights(gsv_tree, tmp_path):
    result = run("build", "--data", gsv_tree, "--backbone", "effnet", "--batch-size", "32", "--workers", "0",
                 "--index-dir", tmp_path)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "GSV-Cities-effnet" / "manifest.json").read_text())
    assert manifest["weights"]["source"] == "pretrained" and manifest["embed_dim"] == 1280
    photo = next((gsv_tree / "Images" / "PRS").glob("*.jpg"))
    out = run("query", photo, "--index-dir", tmp_path, "--json")
    assert json.loads(out.output)["results"][0]["neighbours"][0]["similarity"] > 0.99


def test_real_photos_csv_build_train_bench_external_is_honest(tmp_path):
    """The issue's own scenario on real photos: CSV in, cell split, tuned on val, external set of other places."""
    from conftest import london_csvs
    from geoindex.data import cell_keys
    from geoindex.geo_index import load_index
    index_csv, external_csv, reason = london_csvs(tmp_path)
    if index_csv is None:
        print(f"SKIP reason: {reason}")
        pytest.skip(reason)
    result = run("build", "--data", index_csv, "--backbone", "effnet", "--index-dir", tmp_path / "idx", "--name", "real")
    assert result.exit_code == 0, result.output
    assert "split: by cell (1 km cells)" in result.output
    index = load_index("real", tmp_path / "idx")
    cells = {s: set(cell_keys(index.store.metadata(s)["lat"], index.store.metadata(s)["lon"], 1.0))
             for s in ("train", "val", "test")}
    assert not (cells["train"] & cells["test"]) and not (cells["train"] & cells["val"]) and not (cells["val"] & cells["test"])
    assert run("train", "--index", "real", "--index-dir", tmp_path / "idx").exit_code == 0
    bench = run("bench", "--index", "real", "--index-dir", tmp_path / "idx", "--external", external_csv,
                "--methods", "knn,classifier,hybrid")
    assert bench.exit_code == 0, bench.output
    text = (tmp_path / "idx" / "real" / "bench" / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json: not strict JSON"))
    external = results["sets"]["external"]["methods"]
    for method in ("knn", "classifier:probe", "hybrid"):
        assert external[method]["n_located"] == external[method]["n"] == 80
        assert external[method]["median_km"] is not None and "top5_accuracy" not in external[method]
    print("real photos, external:", {m: round(v["accuracy"], 3) for m, v in external.items()})
    assert external["knn"]["accuracy"] > 0.6  # two cities: real features must beat chance clearly


def test_demo_on_given_data_builds_trains_queries_and_scores(gsv_tree, tmp_path):
    result = run("demo", "--data", gsv_tree, "--backbone", "cnn", "--index-dir", tmp_path)
    assert result.exit_code == 0, result.output
    out = result.output
    name = f"{gsv_tree.name}-cnn"  # what `geoindex build --data` calls it, so the README's commands find it
    assert f"built '{name}'" in out and "kNN tuned on val" in out and "query " in out
    assert "{'train'" not in out and "train " in out  # counts in words, not a Python dict
    assert (tmp_path / name / "bench" / "results.json").is_file()
    # it ends with what to do next, naming its index
    assert out.rstrip().splitlines()[-5].startswith("Next, with the index")
    assert f"geoindex query PHOTO.jpg --index {name} --index-dir {tmp_path}" in out
    assert f"geoindex serve --index {name}" in out
    again = run("demo", "--data", gsv_tree, "--backbone", "cnn", "--index-dir", tmp_path).output
    assert f"reusing index '{name}' at {tmp_path / name}" in again and "built" not in again


def test_relocate_points_an_index_at_moved_photos(gsv_tree, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(gsv_tree, data)
    assert run("build", "--data", data, "--backbone", "cnn", "--index-dir", tmp_path / "idx", "--name", "m").exit_code == 0
    moved = tmp_path / "moved"
    data.rename(moved)
    wrong = run("relocate", "m", tmp_path, "--index-dir", tmp_path / "idx")
    assert wrong.exit_code == 1 and "not at the new place" in wrong.output
    result = run("relocate", "m", moved, "--index-dir", tmp_path / "idx")
    assert result.exit_code == 0, result.output
    from geoindex.geo_index import load_index
    index = load_index("m", tmp_path / "idx")
    paths = index.store.metadata("train")["path"]
    assert all(p.startswith(str(moved)) for p in paths) and all(os.path.isfile(p) for p in paths)
    assert index.manifest["data_root"] == str(moved)


def test_query_answers_with_the_knn_tuned_on_val(gsv_tree, tmp_path):
    # query, bench and serve must share one kNN: the one `train` tuned on val, unless an option overrides it.
    from geoindex.geo_index import load_index
    from geoindex.methods import Photos
    assert run("build", "--data", gsv_tree, "--backbone", "cnn", "--index-dir", tmp_path, "--name", "t").exit_code == 0
    assert run("train", "--index", "t", "--index-dir", tmp_path).exit_code == 0
    index = load_index("t", tmp_path)
    tuned = index.knn_method()
    assert tuned.tuned_on == "val"
    photo = index.store.metadata("test")["path"].iloc[0]
    out = run("query", photo, "--index", "t", "--index-dir", tmp_path, "--json")
    answer = json.loads(out.output)["results"][0]
    expected = tuned.predict(Photos(index.backbone.embed([photo]), [photo]))
    assert [c["city"] for c in answer["top5"]] == [c for c, _ in expected.top(0)]
    assert [c["probability"] for c in answer["top5"]] == pytest.approx([p for _, p in expected.top(0)], abs=1e-5)


@pytest.fixture
def trained_tiny(gsv_tree, tmp_path):
    """A cnn index with a probe head and kNN (and so the fusion and the lead) tuned on val, by the Python API."""
    import geoindex
    index_dir = tmp_path / "indexes"
    geoindex.build_index(gsv_tree, name="tiny", index_dir=index_dir, backbone="cnn", weights="none", image_size=64,
                         batch_size=16, num_workers=0, device="cpu", progress=False, log=lambda m: None)
    index = geoindex.load_index("tiny", index_dir, device="cpu")
    geoindex.train_probe(index, epochs=3, progress=False, log=lambda m: None)
    geoindex.tune_knn(index, log=lambda m: None)
    return index_dir


def query_json(index_dir, *photos):
    out = run("query", *photos, "--index", "tiny", "--index-dir", index_dir, "--device", "cpu", "--json")
    return json.loads(out.stdout)


def test_query_leads_with_the_method_most_accurate_on_val(trained_tiny, gsv_tree):
    """The headline is kNN's, the classifier's or their fusion's: whichever scored best on the validation split
    (each method's val accuracy as saved equals the one recomputed here), said in the answer and the text."""
    from geoindex.geo_index import load_index
    from geoindex.metrics import evaluate
    from geoindex.methods import Photos
    from geoindex.tuning import HYBRID_PARAMS

    photo = photo_path = next((gsv_tree / "Images" / "Osaka").glob("*.jpg"))
    index = load_index("tiny", trained_tiny, device="cpu")
    saved = json.loads((index.path / HYBRID_PARAMS).read_text())
    val = Photos.of_split(index, "val")
    knn_val = evaluate(val.labels, index.knn_method().predict(val).probs, index.classes)["accuracy"]
    head_val = evaluate(val.labels, index.classifier_method().predict(val).probs, index.classes)["accuracy"]
    assert saved["val_accuracy_by_method"]["knn"] == pytest.approx(knn_val)
    assert saved["val_accuracy_by_method"]["classifier"] == pytest.approx(head_val)
    answer = query_json(trained_tiny, photo)["results"][0]
    assert answer["method"] == saved["lead"] and "best on the validation split" in answer["method_note"]
    assert {"top5", "classifier_top5", "hybrid_top5"} <= set(answer)

    text = run("query", photo_path, "--index", "tiny", "--index-dir", trained_tiny, "--device", "cpu").output
    assert f"city: {answer['name']}" in text and "best on the validation split" in text


def test_query_leads_with_the_classifier_where_it_beats_knn_on_val(tmp_path):
    """Noise photos whose city shows only as a slight tint: a trained head sees it better than one nearest
    neighbour in raw embeddings. With kNN so set and compared on val, answers lead with the head (or the
    fusion), say so, and show kNN beside it."""
    import numpy as np
    from PIL import Image

    import geoindex
    from geoindex.tuning import KNN_PARAMS, tune_hybrid

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c, city in enumerate(["Lisbon", "Madrid", "Rome"]):
        (root / city).mkdir(parents=True)
        for i in range(60):
            img = rng.integers(0, 200, (48, 64, 3)).astype(np.int16)
            img[..., c] += 8
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / city / f"{i:03d}.png")
    index_dir = tmp_path / "indexes"
    geoindex.build_index(root, name="tiny", index_dir=index_dir, backbone="cnn", weights="none", image_size=64,
                         batch_size=16, num_workers=0, device="cpu", progress=False, log=lambda m: None)
    index = geoindex.load_index("tiny", index_dir, device="cpu")
    geoindex.train_probe(index, progress=False, log=lambda m: None)
    geoindex.tune_knn(index, log=lambda m: None)
    params = json.loads((index.path / KNN_PARAMS).read_text())
    params.update(k=1, vote="majority", whiten=False)  # kNN as one nearest neighbour in the raw embeddings
    (index.path / KNN_PARAMS).write_text(json.dumps(params))
    index = geoindex.load_index("tiny", index_dir, device="cpu")
    scores = tune_hybrid(index, log=lambda m: None)["val_accuracy_by_method"]
    assert scores["knn"] < max(scores["classifier"], scores["hybrid"]), scores  # the premise
    lead = max(("knn", "classifier", "hybrid"), key=lambda m: (scores[m], -("knn", "classifier", "hybrid").index(m)))
    photo = sorted((root / "Rome").glob("*.png"))[-1]
    answer = query_json(index_dir, photo)["results"][0]
    key = {"classifier": "classifier_top5", "hybrid": "hybrid_top5"}[lead]
    assert answer["method"] == lead and answer["city"] == answer[key][0]["city"]
    assert answer["probability"] == pytest.approx(answer[key][0]["probability"])
    assert f"{scores[lead]:.3f}" in answer["method_note"] and f"kNN {scores['knn']:.3f}" in answer["method_note"]
    text = run("query", photo, "--index", "tiny", "--index-dir", index_dir, "--device", "cpu").output
    method_lines = [line.strip() for line in text.splitlines()
                    if line.strip().startswith(("kNN vote:", "classifier", "hybrid:"))]
    assert method_lines[0].startswith("hybrid:" if lead == "hybrid" else "classifier"), text  # the leader first
    assert any(line.startswith("kNN vote:") for line in method_lines[1:])


def test_a_head_trained_after_the_comparison_makes_kNN_lead_and_says_why(trained_tiny, gsv_tree):
    import geoindex
    index = geoindex.load_index("tiny", trained_tiny, device="cpu")
    geoindex.train_probe(index, epochs=2, lr=3e-3, progress=False, log=lambda m: None)  # a different head
    answer = query_json(trained_tiny, next((gsv_tree / "Images" / "PRS").glob("*.jpg")))["results"][0]
    assert answer["method"] == "knn" and "rerun `geoindex train`" in answer["method_note"]
    assert "hybrid_top5" not in answer  # fusion weights chosen for another head are not used


def test_query_answers_in_the_order_given_and_takes_folders(trained_tiny, gsv_tree, tmp_path):
    """CSV rows (errors included) come in input order; a folder stands for its images, sorted by name."""
    import csv
    import io
    import shutil
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted((gsv_tree / "Images" / "PRS").glob("*.jpg"))[:2]
    shutil.copy(good[0], folder / "b.jpg")
    (folder / "c.jpg").write_text("not a photo")
    shutil.copy(good[1], folder / "d.jpg")
    (folder / "notes.txt").write_text("not an image name: left out")
    out = run("query", good[0], tmp_path / "missing.jpg", folder, "--index", "tiny", "--index-dir", trained_tiny,
              "--device", "cpu", "--csv")
    assert out.exit_code == 1  # some photos could not be read
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["source"] for r in rows] == [str(good[0]), str(tmp_path / "missing.jpg"), str(folder / "b.jpg"),
                                          str(folder / "c.jpg"), str(folder / "d.jpg")]
    assert [bool(r["error"]) for r in rows] == [False, True, False, True, False]
    assert all(r["name"] == "Paris, France" for r in rows if not r["error"] and r["city"] == "PRS")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run("query", empty, "--index", "tiny", "--index-dir", trained_tiny)
    assert refused.exit_code == 2 and "no image files" in refused.output


def test_a_cold_query_says_it_is_loading_the_backbone_on_a_terminal(cli_index, gsv_tree):
    """The seconds spent building the backbone are announced on stderr when a person watches it (a terminal);
    pipes and scripts get only the answer and the errors."""
    import pty
    photo = next((gsv_tree / "Images" / "Osaka").glob("*.jpg"))
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "geoindex.cli", "query", str(photo), "--index-dir", str(cli_index),
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=follower, text=True, timeout=300)
        os.close(follower)
        follower = None
        said = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            said += chunk
    finally:
        if follower is not None:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert "loading cnn for index 'tiny'" in said.decode()
    piped = subprocess.run([sys.executable, "-m", "geoindex.cli", "query", str(photo), "--index-dir", str(cli_index),
                            "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "loading" not in piped.stderr


def test_indexes_is_a_table_with_a_header_and_aligned_columns(trained_tiny, gsv_tree):
    import shutil
    shutil.copytree(trained_tiny / "tiny", trained_tiny / "a-much-longer-index-name")
    (trained_tiny / "a-much-longer-index-name" / "faiss.index").write_bytes(b"damaged")
    out = run("indexes", "--index-dir", trained_tiny)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    header = lines[0]
    assert header.split() == ["NAME", "BACKBONE", "WEIGHTS", "ADAPTED", "INDEX", "TRAIN", "VAL", "TEST", "CITIES",
                              "TRAINED", "BUILT"]
    tiny = next(line for line in lines if line.startswith("tiny "))
    # each column starts (or, for numbers, ends) where its header does
    for column in ("BACKBONE", "WEIGHTS", "ADAPTED", "INDEX", "TRAINED", "BUILT"):
        assert tiny[header.index(column) - 1] == " " and tiny[header.index(column)] != " ", column
    for column in ("TRAIN", "VAL", "TEST", "CITIES"):
        end = header.index(column) + len(column)
        assert tiny[end - 1].isdigit() and tiny[end] == " ", column
    assert tiny[header.index("ADAPTED"):].startswith("no ")
    assert "probe, kNN tuned" in tiny and "SYNTHETIC" in tiny
    broken = next(line for line in lines if line.startswith("a-much-longer-index-name "))
    assert "BROKEN" in broken
    assert any(line.startswith("a-much-longer-index-name: ") and "faiss.index" in line for line in lines)


def test_indexes_shows_an_adapted_index_as_adapted(tree, tmp_path):
    from test_adapt import EFFNET_RANDOM

    from geoindex import build_index
    build_index(tree, name="ix", index_dir=tmp_path, log=lambda m: None, **EFFNET_RANDOM)
    trained = run("train", "--index", "ix", "--index-dir", tmp_path, "--epochs", "1", "--workers", "0", "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    kept = json.loads((tmp_path / "ix" / "manifest.json").read_text())["adapted"]["best_epoch"]
    lines = run("indexes", "--index-dir", tmp_path).output.splitlines()
    header, row = lines[0], next(line for line in lines if line.startswith("ix "))
    assert row[header.index("WEIGHTS"):].startswith("adapted ")  # not "file"
    assert row[header.index("ADAPTED"):].startswith(f"tail, epoch {kept} ")
