import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import shared_photos_root
from geoindex.backbones import create_backbone
from geoindex.cli import main
from geoindex.errors import GeoindexError
from geoindex.zeroshot import ZeroShotClassifier, place_name, read_templates


def test_place_names_spell_out_codes():
    assert place_name("PRS", "city_country") == "Paris, France"
    assert place_name("TRT", "city") == "Toronto"
    assert place_name("OSL", "country") == "Norway"
    assert place_name("PRG", "city_country") == "Prague, Czech Republic"


@pytest.fixture(scope="module")
def random_clip():
    return create_backbone("clip", weights="none")


def test_country_format_merges_cities_of_one_country(random_clip):
    zs = ZeroShotClassifier(random_clip, ["Boston", "Chicago", "PRS"], "country")
    assert zs.labels == ["United States", "France"]
    assert zs.map_labels(np.array([0, 1, 2])).tolist() == [0, 0, 1]
    probs = zs.predict(np.random.default_rng(0).normal(size=(3, 512)))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1)


def test_prompts_follow_the_text_tower(random_clip):
    # Text embeddings must equal a direct encode of the prompt, or zero-shot silently scores garbage.
    import torch
    zs = ZeroShotClassifier(random_clip, ["Rome"], "city_country", ["a photo in {place}."])
    model, tok = random_clip.extras["clip_model"], random_clip.extras["tokenizer"]
    with torch.inference_mode():
        direct = torch.nn.functional.normalize(model.encode_text(tok(["a photo in Rome, Italy."])).float(), dim=-1)
    np.testing.assert_allclose(zs.text_embeddings, direct.numpy(), atol=1e-5)


def test_templates_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# mine\na view of {city}\n\nstreets of {place}\n")
    assert read_templates(f) == ["a view of {place}", "streets of {place}"]
    f.write_text("no field here\n")
    with pytest.raises(GeoindexError):
        read_templates(f)


def test_bench_end_to_end_every_method_on_the_same_ids(gsv_tree, tmp_path):
    runner = CliRunner()
    build = runner.invoke(main, ["build", "--data", str(gsv_tree), "--backbone", "resnet18", "--weights", "none",
                                 "--image-size", "64", "--workers", "0", "--name", "b", "--index-dir", str(tmp_path)])
    assert build.exit_code == 0, build.output
    out = tmp_path / "bench-out"
    external = _external_csv(tmp_path)  # fresh photos of other places, as a geotagged CSV
    result = runner.invoke(main, ["bench", "--index", "b", "--index-dir", str(tmp_path), "--out", str(out),
                                  "--clip-weights", "none", "--workers", "0", "--external", str(external)])
    assert result.exit_code == 0, result.output
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not strict JSON"))
    for set_name, n in (("test", 8), ("external", 64)):
        block = results["sets"][set_name]
        methods = block["methods"]
        assert {"knn", "classifier:probe", "zeroshot:bare", "zeroshot:city_country", "zeroshot:city",
                "zeroshot:country", "zeroshot:ensemble", "hybrid"} <= set(methods), block["skipped"]
        assert {m["ids_sha256"] for m in methods.values()} == {block["ids_sha256"]}
        assert all(m["n"] == n for m in methods.values())
        assert methods["zeroshot:country"]["level"] == "country" and len(methods["zeroshot:country"]["classes"]) == 4
    # Every city-level method has km figures on the external CSV's coordinates (classifiers: the city centre).
    for method in ("knn", "classifier:probe", "hybrid", "zeroshot:ensemble"):
        assert results["sets"]["external"]["methods"][method]["n_located"] == 64
        assert results["sets"]["external"]["methods"][method]["median_km"] is not None
    assert "median_km" not in results["sets"]["external"]["methods"]["zeroshot:country"]
    assert results["tuned"]["hybrid"]["tuned_on"] == "val" and results["tuned"]["knn"]["tuned_on"] == "val"
    assert results["sets"]["external"]["methods"]["zeroshot:ensemble"]["notes"].count("RANDOM CLIP") == 1
    assert (out / "results.md").read_text().count("| test |") == 8
    assert (out / "confusion_test_knn.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in result.output and "hybrid" in result.output


def _external_csv(tmp_path):
    from geoindex.synthetic import make_synthetic_gsv
    from geoindex.data import scan_dataset
    tree = make_synthetic_gsv(tmp_path / "fresh", places_per_city=8, images_per_place=2, image_size=(64, 48), seed=1)
    records = scan_dataset(tree).records
    csv = tmp_path / "fresh.csv"
    records[["path", "city", "lat", "lon"]].to_csv(csv, index=False)  # absolute paths, no place ids
    return csv


def test_external_photos_already_in_the_index_are_dropped(gsv_tree, tmp_path):
    runner = CliRunner()
    runner.invoke(main, ["build", "--data", str(gsv_tree), "--backbone", "cnn", "--weights", "none", "--image-size",
                         "32", "--workers", "0", "--name", "d", "--index-dir", str(tmp_path)])
    result = runner.invoke(main, ["bench", "--index", "d", "--index-dir", str(tmp_path), "--methods", "knn",
                                  "--workers", "0", "--external", str(gsv_tree)])
    assert result.exit_code == 1 and "already in index" in result.output
    assert "same file bytes: 64" in result.output


def test_hybrid_is_never_tuned_on_the_scored_photos(tmp_path, gsv_tree):
    from geoindex import build_index
    from geoindex.bench import run_bench
    from geoindex.geo_index import load_index
    # No validation split: fusion weights would have to come from the test photos, so hybrid is skipped.
    build_index(gsv_tree, name="nv", index_dir=tmp_path, backbone="cnn", weights="none", image_size=32,
                num_workers=0, fractions=(0.8, 0.0, 0.2), progress=False, log=lambda m: None)
    index = load_index("nv", tmp_path)
    assert index.store.count("val") == 0
    results = run_bench(index, ["knn", "classifier", "hybrid"], log=lambda m: None, num_workers=0, progress=False)
    block = results["sets"]["test"]
    assert "hybrid" not in block["methods"] and "validation" in block["skipped"]["hybrid"]


def test_zeroshot_without_clip_weights_is_reported_not_fatal(tmp_path, gsv_tree):
    runner = CliRunner()
    runner.invoke(main, ["build", "--data", str(gsv_tree), "--backbone", "cnn", "--weights", "none", "--image-size",
                         "32", "--workers", "0", "--name", "c", "--index-dir", str(tmp_path)])
    result = runner.invoke(main, ["bench", "--index", "c", "--index-dir", str(tmp_path), "--methods", "knn,zeroshot",
                                  "--workers", "0"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "c" / "bench" / "results.json").read_text())
    assert "knn" in results["sets"]["test"]["methods"]
    assert "CLIP" in results["sets"]["test"]["skipped"]["zeroshot"]


def test_real_clip_zero_shot_beats_chance_on_shared_photos(tmp_path):
    root, reason = shared_photos_root()
    if root is None:
        print(f"SKIP reason: {reason}")
        pytest.skip(reason)
    try:
        create_backbone("clip")
    except GeoindexError as exc:
        print(f"SKIP reason: {exc}")
        pytest.skip(f"no CLIP weights on this machine: {exc}")
    runner = CliRunner()
    runner.invoke(main, ["build", "--data", str(root), "--backbone", "clip", "--per-city", "30", "--name", "z",
                         "--index-dir", str(tmp_path)])
    runner.invoke(main, ["bench", "--index", "z", "--index-dir", str(tmp_path), "--methods", "zeroshot"])
    results = json.loads((tmp_path / "z" / "bench" / "results.json").read_text())
    zs = results["sets"]["test"]["methods"]["zeroshot:city_country"]
    assert zs["accuracy"] > 3 / len(zs["classes"])


def test_bench_on_real_effnet_weights(gsv_tree, tmp_path):
    from geoindex import build_index
    from geoindex.bench import run_bench
    from geoindex.geo_index import load_index

    build_index(gsv_tree, name="e", index_dir=tmp_path, backbone="effnet", num_workers=0, batch_size=32,
                progress=False, log=lambda m: None)
    index = load_index("e", tmp_path)
    results = run_bench(index, ["knn", "classifier", "hybrid"], log=lambda m: None, num_workers=0, progress=False)
    methods = results["sets"]["test"]["methods"]
    assert set(methods) == {"knn", "classifier:probe", "hybrid"}
    # Real ImageNet features separate the generated cities' palettes and stripes easily.
    assert methods["knn"]["accuracy"] >= 0.75


def test_names_file_and_humanised_folder_names_feed_the_prompts(tmp_path, monkeypatch):
    from geoindex import cities
    from geoindex.cities import display_name, load_names
    monkeypatch.setattr(cities, "_EXTRA", {})
    from geoindex.zeroshot import place_name
    assert place_name("Kingston_Jamaica", "city") == "Kingston Jamaica"  # a folder name nothing knows: humanised
    assert place_name("WashingtonDC", "city_country") == "Washington, D.C., United States"
    names = tmp_path / "names.csv"
    names.write_text("city_id,name,country\nLondon_Ontario,\"London, Ontario\",Canada\n")
    load_names(names)
    assert place_name("London_Ontario", "city_country") == "London, Ontario, Canada"
    assert display_name("London_Ontario") == "London, Ontario"


def test_bench_never_writes_into_the_index_it_measures(gsv_tree, tmp_path):
    # No head yet: bench trains a probe for its own run, in memory; only its outputs (bench/) are written.
    runner = CliRunner()
    build = runner.invoke(main, ["build", "--data", str(gsv_tree), "--backbone", "resnet18", "--weights", "none",
                                 "--image-size", "64", "--workers", "0", "--name", "w", "--index-dir", str(tmp_path)])
    assert build.exit_code == 0, build.output
    folder = tmp_path / "w"

    def contents():
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.relative_to(folder).parts[0] != "bench"}

    before = contents()
    result = runner.invoke(main, ["bench", "--index", "w", "--index-dir", str(tmp_path), "--methods", "knn,classifier",
                                  "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "not saved" in result.output
    results = json.loads((folder / "bench" / "results.json").read_text())
    assert "classifier:probe" in results["sets"]["test"]["methods"]
    after = contents()
    assert sorted(after) == sorted(before), f"bench added or removed index files: {set(after) ^ set(before)}"
    assert [name for name in after if after[name] != before[name]] == [], "bench changed index files"
    assert not (folder / "heads" / "probe").exists()
