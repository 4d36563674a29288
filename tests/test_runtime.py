"""The embedding model's runtimes (geoindex.runtime): OpenVINO's embeddings match PyTorch's photo by photo,
an index built with one runtime answers queries embedded with the other, the export cache follows the weights
and survives damage, and a missing OpenVINO or a bad --runtime is said in one line."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import SHARED

from geoindex import runtime  # noqa: E402

# Through geoindex's own import: a bare `import openvino` would switch on its usage telemetry in this process,
# whose forked sender then hangs the test run at exit.
openvino = runtime._openvino()
if openvino is None:
    pytest.skip("OpenVINO is not installed: pip install openvino", allow_module_level=True)
from geoindex.backbones import create_backbone, tail_split  # noqa: E402
from geoindex.extraction import Embedder, embed_paths, set_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LONDON = SHARED / "data" / "real" / "london-or-london"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """One export cache for this module's tests (exports are reused across them), never the user's."""
    cache = tmp_path_factory.getbasetemp() / "runtime-cache"
    monkeypatch.setenv(runtime.CACHE_ENV, str(cache))
    monkeypatch.delenv(runtime.RUNTIME_ENV, raising=False)
    return cache / "openvino"


def per_photo_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def real_photos(n_per_city: int) -> list[str]:
    if not (LONDON / "index.csv").is_file():
        pytest.skip(f"no real photos at {LONDON} (see ../shared/README.md)")
    table = pd.read_csv(LONDON / "index.csv")
    picked = pd.concat([group.sample(n_per_city, random_state=0) for _, group in table.groupby("city")])
    return [str(LONDON / p) for p in picked["path"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["effnet", "effnet-duo"])
def test_openvino_matches_torch_per_real_photo(name):
    photos = real_photos(12)  # both Londons
    backbone = create_backbone(name)
    set_precision(backbone, "fp32")
    torch_emb, ok_t, _ = embed_paths(backbone, photos, runtime="torch", num_workers=0, progress=False, batch_size=8)
    ov_emb, ok_o, _ = embed_paths(backbone, photos, runtime="openvino", num_workers=0, progress=False, batch_size=8)
    assert ok_t.all() and ok_o.all()
    assert backbone.extras["runtime"]["name"] == "openvino" and backbone.extras["runtime"]["precision"] == "f32"
    cosine = per_photo_cosine(torch_emb, ov_emb)
    print(f"{name}: min cosine OpenVINO vs torch over {len(photos)} real photos {cosine.min():.8f}")
    assert cosine.min() >= runtime.TOLERANCE
    # the same neighbours: each photo's nearest other photo is the same with either runtime's embeddings
    nearest = []
    for emb in (torch_emb, ov_emb):
        sims = emb @ emb.T
        np.fill_diagonal(sims, -1)
        nearest.append(sims.argmax(1))
    assert (nearest[0] == nearest[1]).all()


needs_bf16 = pytest.mark.skipif(not runtime.native_bf16(), reason="this CPU has no native bf16 (AMX or AVX512-BF16): "
                                "OpenVINO would emulate it, so geoindex runs fp32 here")


@pytest.mark.slow
@needs_bf16
@pytest.mark.parametrize("name", ["effnet", "effnet-duo"])
def test_bf16_is_the_default_where_native_and_stays_within_its_tolerance_per_real_photo(name):
    photos = real_photos(24)  # both Londons
    backbone = create_backbone(name)
    bf16, ok_b, _ = embed_paths(backbone, photos, num_workers=0, progress=False, batch_size=16)
    assert backbone.extras["runtime"]["name"] == "openvino" and backbone.extras["runtime"]["precision"] == "bf16"
    fp32, ok_f, _ = embed_paths(backbone, photos, runtime="torch", num_workers=0, progress=False, batch_size=16)
    assert backbone.extras["runtime"]["precision"] == "f32"
    assert ok_b.all() and ok_f.all()
    cosine = per_photo_cosine(bf16, fp32)
    print(f"{name}: bf16 vs fp32 over {len(photos)} real photos: min cosine {cosine.min():.5f}, mean {cosine.mean():.5f}")
    assert cosine.min() >= runtime.BF16_TOLERANCE
    assert cosine.mean() >= 0.995  # measured 0.998-0.999: the tolerance is for the odd photo, not the typical one
    # bf16 queries against fp32 embeddings: each photo's nearest other photo mostly the same
    sims_mixed, sims_fp32 = bf16 @ fp32.T, fp32 @ fp32.T
    np.fill_diagonal(sims_mixed, -1)
    np.fill_diagonal(sims_fp32, -1)
    assert (sims_mixed.argmax(1) == sims_fp32.argmax(1)).mean() >= 0.9


def test_bf16_is_refused_in_one_line_where_it_cannot_run():
    backbone = create_backbone("cnn", weights="none")
    set_precision(backbone, "bf16")
    with pytest.raises(runtime.GeoindexError, match="bf16 runs in OpenVINO"):
        Embedder(backbone, "cpu", runtime="torch")
    set_precision(backbone, "auto")
    assert Embedder(backbone, "cpu", runtime="torch").model.info()["precision"] == "f32"


def test_openvino_matches_torch_on_synthetic_images_and_trunk(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):  # noise, flat colour and gradients: inputs far from street photos
        if i < 2:
            array = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
        elif i < 4:
            array = np.full((300, 400, 3), 40 * i, dtype=np.uint8)
        else:
            array = np.broadcast_to(np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None], (300, 400, 3)).copy()
        Image.fromarray(array).save(tmp_path / f"{i}.jpg")
        paths.append(str(tmp_path / f"{i}.jpg"))
    for backbone in (create_backbone("cnn", weights="none"), create_backbone("effnet")):
        set_precision(backbone, "fp32")
        a, _, _ = embed_paths(backbone, paths, runtime="torch", num_workers=0, progress=False)
        b, _, _ = embed_paths(backbone, paths, runtime="openvino", num_workers=0, progress=False)
        assert per_photo_cosine(a, b).min() >= runtime.TOLERANCE, backbone.name
    # the frozen trunk `geoindex train` computes its features with (unnormalised, 22k values a photo)
    import dataclasses
    split = tail_split(backbone)
    trunk = dataclasses.replace(backbone, model=split.trunk, embed_dim=split.trunk_dim, _embedders={})
    trunk.extras = {}
    set_precision(trunk, "fp32")
    batch = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in paths])
    a = Embedder(trunk, "cpu", normalize=False, runtime="torch")(batch).numpy()
    b_embedder = Embedder(trunk, "cpu", normalize=False, runtime="openvino")
    assert b_embedder.runtime == "openvino"
    b = b_embedder(batch).numpy()
    assert a.shape == b.shape == (len(paths), split.trunk_dim)
    assert per_photo_cosine(a, b).min() >= runtime.TOLERANCE
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()


@pytest.mark.parametrize("built_with, queried_with", [("torch", "openvino"), ("openvino", "torch")])
def test_index_built_with_one_runtime_answers_queries_embedded_with_the_other(tree, tmp_path, monkeypatch,
                                                                                built_with, queried_with):
    from geoindex import build_index, load_index

    monkeypatch.setenv(runtime.RUNTIME_ENV, built_with)
    report = build_index(tree, name="cross", index_dir=tmp_path, backbone="effnet", progress=False, log=lambda m: None)
    assert report.manifest["extraction"]["runtime"]["name"] == built_with
    monkeypatch.setenv(runtime.RUNTIME_ENV, queried_with)
    index = load_index("cross", tmp_path, device="cpu")
    photos = index.store.metadata("train")["path"].tolist()[:4]
    predictions = index.query(photos)
    assert index.backbone.extras["runtime"]["name"] == queried_with
    for photo, prediction in zip(photos, predictions):
        assert prediction.neighbours[0].path == photo  # the photo finds itself
        # OpenVINO's default is bf16 where the CPU computes it natively, fp32 elsewhere
        assert prediction.neighbours[0].similarity >= (runtime.BF16_TOLERANCE if runtime.native_bf16() else 0.999)
    index.close()


def test_export_follows_the_weights_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    private_cache = tmp_path / "cache" / "openvino"
    runtime._loaded.clear()
    backbone = create_backbone("cnn", weights="none")
    batch = torch.randint(0, 255, (3, 3, backbone.image_size, backbone.image_size), dtype=torch.uint8)

    def exports():
        return sorted(p.name for p in private_cache.iterdir() if not p.name.startswith(".")) if private_cache.exists() else []

    before = set(exports())
    embedder = Embedder(backbone, "cpu", runtime="openvino")
    first = set(exports()) - before
    assert embedder.runtime == "openvino" and len(first) == 1
    meta = json.loads((private_cache / next(iter(first)) / runtime.EXPORT_META).read_text())
    assert meta["min_cosine_vs_torch"] >= runtime.TOLERANCE
    assert {"model.xml", "model.bin"} <= set(meta["files"])

    # weights changed in place (as training does): the next call exports again and follows them
    with torch.no_grad():
        next(backbone.model.parameters()).mul_(1.5)
    changed = embedder(batch).numpy()
    reference = Embedder(backbone, "cpu", runtime="torch")(batch).numpy()
    assert per_photo_cosine(changed, reference).min() >= runtime.TOLERANCE
    second = set(exports()) - before - first
    assert len(second) == 1

    # weights from a file (a tuned backbone): its own key, its own export
    weights = tmp_path / "tuned.pt"
    state = {k: v * 0.5 if v.is_floating_point() else v for k, v in backbone.model.state_dict().items()}
    torch.save(state, weights)
    tuned = create_backbone("cnn", weights=weights)
    Embedder(tuned, "cpu", runtime="openvino")
    assert len(set(exports()) - before - first - second) == 1

    # a damaged export is said, exported again, and the result is right
    folder = private_cache / next(iter(second))
    data = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    runtime._loaded.clear()  # as in a fresh process
    capsys.readouterr()
    again = Embedder(backbone, "cpu", runtime="openvino")
    assert again.runtime == "openvino"
    assert "damaged" in capsys.readouterr().err
    assert per_photo_cosine(again(batch).numpy(), reference).min() >= runtime.TOLERANCE
    assert json.loads((folder / runtime.EXPORT_META).read_text())["files"]["model.bin"]["size"] == len(data)


def test_model_threads_share_one_compiled_model():
    """`geoindex serve` calls Backbone.embed from two model threads at once: each gets its own infer request."""
    backbone = create_backbone("cnn", weights="none")
    rng = np.random.default_rng(1)
    batches = [torch.from_numpy(rng.integers(0, 255, (4, 3, 64, 64), dtype=np.uint8)) for _ in range(6)]
    batches = [torch.nn.functional.interpolate(b.float(), size=backbone.image_size).to(torch.uint8) for b in batches]
    runtime.set_default_runtime("openvino")
    try:
        expected = [backbone.embed(list(b)) for b in batches]
        results = [None] * len(batches)

        def run(i):
            for _ in range(3):
                results[i] = backbone.embed(list(batches[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        runtime.set_default_runtime(None)
    assert backbone.extras["runtime"]["name"] == "openvino"
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


def _cli(args, env_extra=None, hide_openvino=False, cwd=None):
    prelude = "import sys; sys.modules['openvino'] = None; " if hide_openvino else ""
    code = prelude + "from geoindex.cli import main; main(sys.argv[1:], prog_name='geoindex')"
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", f"import sys; {code}", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_missing_openvino_is_said_once_and_torch_runs(tree, tmp_path):
    proc = _cli(["build", "--data", str(tree), "--backbone", "cnn", "--weights", "none", "--name", "noov",
                 "--index-dir", str(tmp_path), "--runtime", "openvino", "--workers", "0"], hide_openvino=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert output.count("OpenVINO is not installed") == 1
    assert runtime.OPENVINO_INSTALL in output
    manifest = json.loads((tmp_path / "noov" / "manifest.json").read_text())
    assert manifest["extraction"]["runtime"]["name"] == "torch"
    # querying it the same way: said once again, answered by torch
    query = _cli(["query", "--index", "noov", "--index-dir", str(tmp_path), "--runtime", "openvino", "--json",
                  str(next(Path(tree).rglob("*.jpg")))], hide_openvino=True)
    assert query.returncode == 0, query.stderr[-2000:]
    assert query.stderr.count("OpenVINO is not installed") == 1
    json.loads(query.stdout)  # the warning never pollutes --json


def test_bad_runtime_is_one_line(tmp_path):
    for args, env in ((["query", "--runtime", "tensorrt", "x.jpg"], {}),
                      (["build", "--data", str(tmp_path), "--runtime", ""], {})):
        proc = _cli(args, env)
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == [f"Error: --runtime {args[args.index('--runtime') + 1]!r} is not "
                                                    "one of: auto, torch, openvino"]
    image = tmp_path / "a.jpg"
    Image.new("RGB", (64, 48)).save(image)
    proc = _cli(["query", "--index-dir", str(tmp_path / "none"), str(image)], {runtime.RUNTIME_ENV: "fast"})
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr


def test_auto_on_a_cuda_device_is_torch():
    assert runtime.resolve_runtime("auto", torch.device("cuda")) == "torch"
    assert runtime.resolve_runtime("auto", torch.device("cpu")) == "openvino"
    assert runtime.resolve_runtime("torch", torch.device("cpu")) == "torch"


def test_importing_openvino_sends_no_telemetry(tmp_path):
    """OpenVINO's usage telemetry writes a client id under ~/intel and posts to Google Analytics; geoindex
    imports it with that off."""
    code = ("import torch; from geoindex.runtime import OpenVinoModel; "
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()); "
            "print(OpenVinoModel(m, 8)(torch.zeros(2, 3, 8, 8)).shape)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
                               runtime.CACHE_ENV: str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "intel").exists()
