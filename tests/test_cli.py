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
    payload = json.loads(out.output)
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
    name = f"demo-{gsv_tree.name}-cnn"
    assert f"built '{name}'" in out and "kNN tuned on val" in out and "query " in out
    assert (tmp_path / name / "bench" / "results.json").is_file()
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
