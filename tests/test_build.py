import json
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from conftest import write_bad_files
from geoindex import build_index, create_backbone
from geoindex.errors import BackboneMismatch, GeoindexError
from geoindex.geo_index import load_index
from geoindex.images import load_image

FAST = dict(backbone="resnet18", weights="none", image_size=64, batch_size=8, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def built(gsv_tree, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("idx")
    report = build_index(gsv_tree, name="r18", index_dir=index_dir, log=lambda m: None, **FAST)
    return report, index_dir


def test_manifest_describes_the_build(built):
    report, _ = built
    m = json.loads((report.path / "manifest.json").read_text())
    assert m["backbone"] == "resnet18" and m["embed_dim"] == 512 and m["normalization"] == "l2"
    assert m["weights"]["source"] == "random" and m["synthetic"] is True
    assert {k: m["split"][k] for k in ("seed", "fractions", "by", "per_city", "warning")} == \
        {"seed": 0, "fractions": [0.8, 0.1, 0.1], "by": "place", "per_city": None, "warning": None}
    assert sum(m["counts"].values()) == 64 and m["skipped"]["count"] == 0
    assert json.loads((report.path / "skipped.json").read_text()) == {"skipped": [], "duplicates": []}
    assert set(m["counts_per_city"]["test"]) == {"Barcelona", "London", "Osaka", "PRS"}
    assert {"torch", "faiss", "h5py"} <= set(m["versions"])
    assert not (report.path / ".partial").exists() and not (report.path.parent / ".staging").exists()
    assert set(m["files"]) == {"embeddings.h5", "faiss.index", "skipped.json"}


def test_stored_embeddings_match_a_direct_forward_pass(built):
    report, _ = built
    bb = create_backbone("resnet18", weights="none", image_size=64)
    with h5py.File(report.path / "embeddings.h5") as f:
        paths = f["test"]["path"].asstr()[:5]
        stored = f["test"]["embeddings"][:5].astype(np.float32)
    # The reference is computed by hand: decode, preprocess, forward, L2-normalise, no geoindex pipeline.
    x = torch.stack([bb.preprocess(load_image(p, draft_size=bb.transform.resize_size)) for p in paths])
    with torch.inference_mode():
        direct = torch.nn.functional.normalize(bb.model.eval()(x), dim=1).numpy()
    np.testing.assert_allclose(stored, direct, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, atol=2e-3)


def test_a_training_image_finds_itself(built):
    report, index_dir = built
    index = load_index("r18", index_dir)
    train = index.store.metadata("train")
    prediction = index.query([train["path"][3]], k=5)[0]
    assert prediction.neighbours[0].path == train["path"][3]
    assert prediction.neighbours[0].similarity == pytest.approx(1, abs=2e-3)
    assert prediction.city == train["city"][3]
    assert abs(prediction.lat - train["lat"][3]) < 1


def test_a_different_backbone_is_refused(built):
    _, index_dir = built
    index = load_index("r18", index_dir)
    with pytest.raises(BackboneMismatch, match="built with backbone 'resnet18'"):
        index.query([index.store.metadata("train")["path"][0]], backbone=create_backbone("cnn", weights="none"))
    with pytest.raises(BackboneMismatch, match="512-d"):
        index.search(np.zeros((1, 1024), dtype=np.float32))


def test_existing_index_is_not_overwritten_by_accident(built, gsv_tree):
    _, index_dir = built
    with pytest.raises(GeoindexError, match="already exists"):
        build_index(gsv_tree, name="r18", index_dir=index_dir, log=lambda m: None, **FAST)


def test_bad_files_are_skipped_with_reasons_and_odd_ones_embedded(gsv_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(gsv_tree, tree)
    bad = write_bad_files(tree / "Images" / "Barcelona", "Barcelona")
    report = build_index(tree, name="bad", index_dir=tmp_path / "idx", log=lambda m: None, **FAST)
    reasons = {item["path"]: item["reason"] for item in report.skipped}
    assert report.manifest["skipped"]["count"] == 3 and report.failed_rows == 3 and report.extracted_rows == 64 + 3
    assert set(reasons) == {bad["empty"], bad["truncated"], bad["text"]}
    assert "empty" in reasons[bad["empty"]] and "truncated" in reasons[bad["truncated"]]
    assert "not an image" in reasons[bad["text"]]
    with h5py.File(report.path / "embeddings.h5") as f:
        stored = set().union(*(f[s]["path"].asstr()[...] for s in ("train", "val", "test")))
    assert {bad["alpha"], bad["gray"], bad["cmyk"]} <= stored
    assert sum(report.manifest["counts"].values()) == 64 + 3


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_indexes_record_their_measured_recall(built, gsv_tree, tmp_path, kind):
    report = build_index(gsv_tree, name=kind, index_dir=tmp_path, index_type=kind, log=lambda m: None, **FAST)
    info = report.manifest["index"]
    assert info["type"] == kind and info["ntotal"] == report.manifest["counts"]["train"]
    assert 0.5 < info["recall@20"] <= 1.0
    index = load_index(kind, tmp_path)
    assert index.query([index.store.metadata("train")["path"][0]], k=5)[0].neighbours


def test_a_killed_build_resumes_without_redoing_finished_rows(gsv_tree, tmp_path):
    # A real SIGKILL mid-extraction, from inside the build process after its 3rd batch.
    script = textwrap.dedent(f"""
        import os, signal
        from geoindex import build_index
        def die(batch):
            if batch == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        build_index({str(gsv_tree)!r}, name="killed", index_dir={str(tmp_path)!r}, backbone="resnet18",
                    weights="none", image_size=64, batch_size=8, num_workers=0, progress=False,
                    checkpoint_rows=8, on_batch=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    partial = tmp_path / ".staging" / "killed" / "cache"
    assert len(list(partial.glob("shard-*.npz"))) == 3  # each batch is checkpointed before the hook runs
    assert not (tmp_path / "killed").exists()

    resumed = build_index(gsv_tree, name="killed", index_dir=tmp_path, checkpoint_rows=8, log=lambda m: None, **FAST)
    assert resumed.resumed_rows == 24 and resumed.extracted_rows == 64 - 24
    fresh = build_index(gsv_tree, name="fresh", index_dir=tmp_path, log=lambda m: None, **FAST)
    with h5py.File(resumed.path / "embeddings.h5") as a, h5py.File(fresh.path / "embeddings.h5") as b:
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(a[split]["path"][...], b[split]["path"][...])
            np.testing.assert_allclose(a[split]["embeddings"][...], b[split]["embeddings"][...], atol=1e-3)


def test_an_unfinished_build_with_other_settings_is_not_mixed_in(gsv_tree, tmp_path):
    def stop(batch):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build_index(gsv_tree, name="x", index_dir=tmp_path, on_batch=stop, log=lambda m: None, **FAST)
    assert list((tmp_path / ".staging" / "x" / "cache").glob("shard-*.npz")), "Ctrl-C must keep finished rows"
    with pytest.raises(GeoindexError, match="unfinished build"):
        build_index(gsv_tree, name="x", index_dir=tmp_path, log=lambda m: None, **{**FAST, "backbone": "cnn"})
