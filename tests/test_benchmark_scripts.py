"""The benchmark scripts run (tiny sizes) and save what they print; the figures themselves are not judged here."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script, *args, tmp_path):
    env = {**os.environ, "GEOINDEX_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    return proc.stdout, json.loads(files[0].read_text())


def test_knn_benchmark_smoke(tmp_path):
    out, results = run("knn.py", "--n", 3000, "--dim", 32, "--queries", 64, "--batch", 32, tmp_path=tmp_path)
    assert {"faiss-flat", "faiss-ivfpq", "faiss-hnsw", "sklearn-brute", "numpy-matmul"} <= set(results["methods"])
    assert results["methods"]["faiss-flat"]["recall@20"] == 1.0
    assert results["methods"]["numpy-matmul"]["recall@20"] > 0.99
    assert results["methods"]["sklearn-brute"]["top1_city_agreement"] >= 0.95  # float ties may flip
    assert "faiss-flat / sklearn-brute" in out


def test_extract_benchmark_smoke(tmp_path):
    out, results = run("extract.py", "--backbone", "cnn", "--n", 16, "--batch-size", 8, "--repeats", 1,
                       "--workdir", tmp_path / "work", tmp_path=tmp_path)
    assert results["ceiling_img_s"] > 0 and results["pipeline_img_s"] > 0 and results["naive_img_s"] > 0
    assert "(b)/(a)" in out


def test_heldout_benchmark_smoke(tmp_path):
    import pytest
    london = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "london-or-london"
    if not (london / "index.csv").is_file():
        pytest.skip(f"no London-or-London photos at {london} (see ../shared/README.md)")
    out, results = run("heldout.py", "--data", london, "--per-city", 45, "--backbones", "effnet",
                       "--train-modes", "auto,probe", "--workdir", tmp_path / "work", tmp_path=tmp_path)
    scored = [r for r in results["rows"] if "set" in r]
    assert {r["train_mode"] for r in scored} == {"auto", "probe"}
    assert {r["set"] for r in scored} >= {"test", "external"}
    external = [r for r in scored if r["set"] == "external"]
    # A third of each city's 45, east of the index's photos (any that share a 1 km cell with the index are dropped).
    assert external and all(0 < r["n"] <= 30 for r in external)
    assert results["split"]["index_photos"] == 60 and results["split"]["external_photos"] == 30
    timings = [r for r in results["rows"] if "total_seconds" in r]
    assert len(timings) == 2 and all(r["seconds"]["train"] > 0 for r in timings)
    assert "train --mode auto" in out


def test_extract_benchmark_int8_and_stages_smoke(tmp_path, monkeypatch):
    import pytest

    from geoindex import runtime
    pytest.importorskip("nncf")
    monkeypatch.setenv("GEOINDEX_CACHE", str(tmp_path / "cache"))
    out, results = run("extract.py", "--backbone", "cnn", "--n", 16, "--calibration", 16, "--batch-size", 8,
                       "--repeats", 1, "--naive-n", 0, "--kernel-n", 0, "--stages",
                       "--runtimes", "openvino,openvino-fp32,openvino-int8,torch/w1", "--workdir", tmp_path / "work",
                       tmp_path=tmp_path)
    int8 = results["runtimes"]["openvino-int8"]
    assert int8["what_ran"]["precision"] == "i8" and results["runtimes"]["openvino-fp32"]["what_ran"]["precision"] == "f32"
    # bare "openvino" is its default precision: bf16 where the CPU computes it natively
    assert results["runtimes"]["openvino"]["what_ran"]["precision"] == ("bf16" if runtime.native_bf16() else "f32")
    assert results["runtimes"]["torch/w1"]["what_ran"]["name"] == "torch"
    assert 0.9 <= int8["cosine_vs_fp32"]["min"] <= 1 and results["calibration_photos"] == 16
    stages = results["stages_cpu_ms_per_photo"]
    assert stages["decode"] > 0 and stages["model (openvino-int8, all threads)"] > 0
    assert "of a photo's CPU time" in out


def test_dense_matcher_benchmark_smoke(tmp_path):
    import pytest

    from geoindex.verification import dense_unavailable, shared_dense_matcher
    london = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "london-or-london"
    if not (london / "index.csv").is_file():
        pytest.skip(f"no London-or-London photos at {london} (see ../shared/README.md)")
    if shared_dense_matcher() is None:
        pytest.skip(f"no dense matcher: {dense_unavailable()}")
    out, results = run("dense_matcher.py", "--data", london, "--photos", 6, "--rounds", 2, "--pairs", 8,
                       tmp_path=tmp_path)
    assert results["photos"] == 6 and len(results["rounds_seconds"]["torch"]) == 2
    assert results["speedup"] == results["seconds_a_photo"]["torch"] / results["seconds_a_photo"]["compiled"]
    # the two runtimes' features agree to float16 storage: nearly every revisit pair counts the same inliers
    assert results["agreement"]["pairs"] == 8 and results["agreement"]["identical"] >= 0.75
    assert "identical for" in out


def test_street_rerank_ranks_in_chunks_as_one_matrix_would():
    import numpy as np
    sys.path.insert(0, str(BENCH.parent))
    from benchmarks.street_rerank import ranked, similarities

    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(10, 8)), rng.normal(size=(50, 8))
    full = np.argsort(-(queries @ gallery.T), axis=1)[:, :5]
    top = ranked(queries, gallery, 5, chunk=3)  # chunks that do not divide the queries
    assert top.tolist() == full.tolist()
    assert np.allclose(similarities(queries, gallery, top), np.take_along_axis(queries @ gallery.T, full, 1))


def test_street_rerank_benchmark_smoke(tmp_path):
    import numpy as np
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import build_cnn_index

    from geoindex.geo_index import load_index
    from geoindex.layout import KNN_PARAMS, STREET_WHITENING
    from geoindex.synthetic import make_synthetic_gsv
    from geoindex.whitening import Whitening

    root = make_synthetic_gsv(tmp_path / "GSV", cities=("Barcelona", "London"), places_per_city=8,
                              images_per_place=3, image_size=(64, 48))
    build_cnn_index(root, tmp_path / "idx", "rr")
    index = load_index("rr", tmp_path / "idx")
    Whitening.fit(index.store.embeddings("train"), max_dims=16).using(8, 1.0).save(
        tmp_path / "idx" / "rr" / STREET_WHITENING)
    index.close()
    (tmp_path / "idx" / "rr" / KNN_PARAMS).write_text(json.dumps(
        {"k": 5, "vote": "softmax", "temperature": 0.05, "tuned_on": "val",
         "street": {"space": {"dims": 8, "power": 1.0}, "threshold": None}}))
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    out, results = run("street_rerank.py", "--index", "rr", "--index-dir", tmp_path / "idx", "--shortlist", 10,
                       tmp_path=results_dir)
    assert set(results["splits"]) == {"val", "test"}
    for split, found in results["splits"].items():
        assert found["queries"] > 0 and found["gallery_photos"] > found["queries"]
        assert 0 <= found["street_space"]["r@1_25m"] <= found["street_space"]["r@10_25m"] <= 1
        assert len(found["dba"]) == 6 and all(0 <= v["dba"]["r@1_25m"] <= 1 for v in found["dba"].values())
        assert f"{split}: {found['queries']} queries" in out
        if "dense_rescoring" in found:  # the weights and OpenCV at hand: only depths the shortlist holds
            assert list(found["dense_rescoring"]["depths"]) == ["10"]
            assert set(found["dense_rescoring"]["depths"]["10"]) == {"0", "0.03", "0.1", "0.3", "1"}
            # the ceiling of any re-ranking by the dense count: a share of queries
            assert 0 <= found["dense_rescoring"]["spot_outscores_lookalikes"] <= 1


def test_pipeline_timing_records_each_step_and_skips_what_a_failed_step_feeds(tmp_path, tree):
    env = {**os.environ, "GEOINDEX_BENCH_RESULTS": str(tmp_path / "results"), "GEOINDEX_HOME": str(tmp_path / "home")}

    def timing(data, steps):
        proc = subprocess.run([sys.executable, str(BENCH / "pipeline_timing.py"), "--data", str(data), "--name", "t",
                               "--device", "cpu", "--steps", steps, "--logs", str(tmp_path / "logs")],
                              capture_output=True, text=True, env=env, timeout=600)
        return proc, json.loads((tmp_path / "results" / "pipeline_timing.json").read_text())

    proc, results = timing(tree, "build")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results["finished"] and results["steps"]["build"]["exit"] == 0 and results["steps"]["build"]["seconds"] > 0
    assert (tmp_path / "home" / "t" / "manifest.json").is_file()
    assert "--logs" not in results["command"] and str(tmp_path) not in results["command"]
    assert str(tree) not in results["command"] and f"--data {tree.name} " in results["command"]
    assert results["city"] is None and results["street_heldout_test"] is None  # bench and heldout did not run

    proc, results = timing(tmp_path / "no-such-folder", "build,train,bench")
    assert proc.returncode == 1
    assert results["steps"]["build"]["exit"] != 0 and "no-such-folder" in "\n".join(results["steps"]["build"]["log_tail"])
    assert results["steps"]["train"] == {"skipped": "build failed"} and results["steps"]["bench"] == {"skipped":
                                                                                                     "train failed"}
