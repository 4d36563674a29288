"""--precision int8: the manifest records it, the embeddings stay within INT8_TOLERANCE of fp32 (queries embed in fp32),
the export cache keeps int8 apart from fp32, and int8 without OpenVINO is refused in one line."""
import json

import numpy as np
import pytest
import torch

from geoindex import runtime

if runtime._openvino() is None:
    pytest.skip("OpenVINO is not installed: pip install openvino", allow_module_level=True)
pytest.importorskip("nncf")

from test_runtime import per_photo_cosine, real_photos  # noqa: E402


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(runtime.RUNTIME_ENV, raising=False)
    runtime._loaded.clear()
    return tmp_path / "cache" / "openvino"


@pytest.mark.slow
def test_int8_build_records_its_precision_and_fp32_queries_find_their_photos(tmp_path, private_cache, capsys):
    from conftest import london_csvs
    from geoindex import BuildConfig, build_index, load_index
    from geoindex.config import ExtractionConfig

    data, _, why = london_csvs(tmp_path, n_index=20, n_external=1)
    if data is None:
        pytest.skip(why)

    def build(precision):
        config = BuildConfig(extraction=ExtractionConfig(num_workers=0, precision=precision))
        return build_index(data, name="p", index_dir=tmp_path / "idx", backbone="effnet", config=config,
                           overwrite=True, progress=False, log=lambda m: None)

    report = build("int8")
    extraction, plan = report.manifest["extraction"], report.manifest["embedding"]
    assert extraction["precision"] == "int8" and extraction["runtime"]["precision"] == "i8"
    assert plan["precision"] == "int8"
    calibration = extraction["calibration"]
    assert calibration["photos"] == report.manifest["counts"]["train"] == calibration["in_train"]
    int8_exports = [p for p in private_cache.iterdir() if p.name.endswith("-int8")]
    assert len(int8_exports) == 1
    meta = json.loads((int8_exports[0] / runtime.EXPORT_META).read_text())
    assert meta["precision"] == "int8" and meta["min_cosine_vs_torch"] >= runtime.INT8_TOLERANCE

    index = load_index("p", tmp_path / "idx", device="cpu")
    assert index.backbone.extras.get("precision") is None  # queries embed in fp32
    photos = index.store.metadata("train")["path"].tolist()[:6]
    for photo, prediction in zip(photos, index.query(photos)):
        assert prediction.neighbours[0].path == photo
        assert prediction.neighbours[0].similarity >= runtime.INT8_TOLERANCE
    index.close()

    # fp32 embeddings are not int8 ones: a rebuild at fp32 embeds every photo again, and says fp32
    fp32 = build("fp32")
    assert fp32.resumed_rows == 0 and fp32.manifest["extraction"]["runtime"]["precision"] == "f32"
    assert "precision" not in fp32.manifest["embedding"] and "calibration" not in fp32.manifest["extraction"]
    # int8 again: the calibrated export comes from the cache, not from a second quantization
    capsys.readouterr()
    runtime._loaded.clear()
    build("int8")
    assert "quantizing" not in capsys.readouterr().err


@pytest.mark.slow
def test_int8_that_disagrees_with_fp32_is_refused(tree, tmp_path, monkeypatch, private_cache):
    from geoindex import BuildConfig, build_index
    from geoindex.config import ExtractionConfig
    from geoindex.errors import GeoindexError

    monkeypatch.setattr(runtime, "INT8_TOLERANCE", 0.999999)
    config = BuildConfig(extraction=ExtractionConfig(num_workers=0, precision="int8", image_size=32))
    with pytest.raises(GeoindexError, match="int8 export disagrees with fp32"):
        build_index(tree, name="q", index_dir=tmp_path / "idx", backbone="cnn", weights="none", config=config,
                    progress=False, log=lambda m: None)
    assert not (tmp_path / "idx" / "q" / "manifest.json").exists()
    assert not [p for p in private_cache.iterdir() if p.name.endswith("-int8")]


@pytest.mark.slow
def test_int8_effnet_stays_within_tolerance_on_real_photos():
    """Calibrated on some real photos, checked on others: every photo's int8 embedding within INT8_TOLERANCE."""
    from geoindex.backbones import create_backbone
    from geoindex.extraction import Embedder, set_precision

    photos = real_photos(24)
    backbone = create_backbone("effnet", device="cpu")
    batch = torch.stack([backbone.transform.load(p) for p in photos[1::2]])
    fp32 = Embedder(backbone, "cpu", runtime="openvino")(batch).numpy()
    set_precision(backbone, "int8", photos[0::2])
    embedder = Embedder(backbone, "cpu", runtime="openvino")
    assert embedder.model.info()["precision"] == "i8"
    cosine = per_photo_cosine(embedder(batch).numpy(), fp32)
    assert cosine.min() >= runtime.INT8_TOLERANCE, cosine.min()
    assert cosine.mean() < 0.99999  # it did run in int8


def test_int8_without_openvino_is_one_line(tree, tmp_path):
    from click.testing import CliRunner

    from geoindex.cli import main

    result = CliRunner().invoke(main, ["build", "--data", str(tree), "--backbone", "cnn", "--weights", "none",
                                       "--precision", "int8", "--runtime", "torch", "--workers", "0",
                                       "--index-dir", str(tmp_path)])
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert lines == ["Error: --precision int8 runs in OpenVINO on a CPU; use --precision fp32 with --runtime torch "
                     "or on cpu"], result.output
