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
