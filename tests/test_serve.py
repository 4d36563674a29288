"""`geoindex serve`: the real server in a subprocess on a free loopback port, spoken to over HTTP."""
import io
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

from geoindex.catalog import DEFAULT_MAX_PIXELS
from geoindex.serve.batching import MicroBatcher

REPO = Path(__file__).resolve().parents[1]
MAX_UPLOAD_MB = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def skip_without_the_serve_extra():
    """Tests of the running service skip, saying why, where the serve extra is not installed."""
    from geoindex.serve import INSTALL_HINT, missing_packages

    missing = missing_packages()
    if missing:
        pytest.skip(f"the serve extra is not installed ({', '.join(missing)}): {INSTALL_HINT}")


class ServerProcess:
    """`python -m geoindex.serve ...` on a free port; stopped with SIGTERM as a service manager would."""

    def __init__(self, *args, env=None, preexec_fn=None):
        skip_without_the_serve_extra()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "geoindex.serve", "--port", str(self.port), "--device", "cpu",
                                      "--log-level", "warning", *map(str, args)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=REPO, preexec_fn=preexec_fn)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def build_tiny_index(gsv_tree, index_dir, name="tiny"):
    """A cnn index (seeded random weights, 64 px) with a probe head, so the answer carries both methods."""
    import geoindex
    geoindex.build_index(gsv_tree, name=name, index_dir=index_dir, backbone="cnn", weights="none", image_size=64,
                         batch_size=16, num_workers=0, device="cpu", progress=False, log=lambda m: None)
    index = geoindex.load_index(name, index_dir, device="cpu")
    geoindex.train_probe(index, epochs=3, progress=False, log=lambda m: None)
    return index


@pytest.fixture(scope="module")
def tiny_index(gsv_tree, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("serve-index")
    return build_tiny_index(gsv_tree, index_dir), index_dir


def fake_ghostscript(folder: Path) -> tuple[dict, Path]:
    """(env, marker): a PATH whose first `gs` leaves the marker file when run. PIL decodes EPS by running `gs`."""
    bin_dir = folder / "fake-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    marker = folder / "gs-ran"
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, marker


@pytest.fixture(scope="module")
def ghostscript_marker(tmp_path_factory):
    return fake_ghostscript(tmp_path_factory.mktemp("gs"))


@pytest.fixture(scope="module")
def server(tiny_index, ghostscript_marker):
    index, index_dir = tiny_index
    server = ServerProcess("--index", "tiny", "--index-dir", index_dir, "--max-upload-mb", MAX_UPLOAD_MB,
                           "--max-batch", 8, "--max-wait-ms", 20, "--model-threads", 2, env=ghostscript_marker[0])
    yield server
    server.stop()


def photo_of(gsv_tree, city, i=0) -> Path:
    return sorted((gsv_tree / "Images" / city).glob("*.jpg"))[i]


def locate(server, path: Path, **params):
    with open(path, "rb") as fh:
        return httpx.post(server.url + "/v1/locate", files={"image": (path.name, fh, "image/jpeg")}, params=params,
                          timeout=60)


def assert_still_serving(server, gsv_tree):
    response = locate(server, photo_of(gsv_tree, "London"))
    assert response.status_code == 200, response.text
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


def test_locate_answers_like_query_json(server, tiny_index, gsv_tree):
    index, _ = tiny_index
    path = photo_of(gsv_tree, "Osaka", 3)
    response = locate(server, path)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    payload = strict_loads(response.text)
    assert payload["index"] == "tiny" and payload["backbone"] == "cnn"
    (got,) = payload["results"]
    expected = index.query([str(path)], k=20)[0].to_dict()  # what `geoindex query --json` prints for this file
    assert got["source"] == path.name
    assert got["city"] == expected["city"] and got["name"] == expected["name"]
    for key in ("top5", "classifier_top5"):
        assert [c["city"] for c in got[key]] == [c["city"] for c in expected[key]]
        assert [c["probability"] for c in got[key]] == pytest.approx([c["probability"] for c in expected[key]], abs=1e-4)
    assert got["gps"]["lat"] == pytest.approx(expected["gps"]["lat"], abs=1e-4)
    assert got["gps"]["lon"] == pytest.approx(expected["gps"]["lon"], abs=1e-4)
    assert [n["row"] for n in got["neighbours"]] == [n["row"] for n in expected["neighbours"]]
    assert payload["build_id"] == index.manifest["build_id"]
    for n in got["neighbours"]:  # a row and its thumbnail's URL, never a path on the server
        assert "path" not in n and n["thumbnail"] == f"v1/photos/{n['row']}?build={payload['build_id']}"
    assert str(REPO) not in response.text and str(path.parent) not in response.text
    train = index.store.metadata("train")
    assert train["path"].iat[got["neighbours"][0]["row"]] == str(path)
    assert got["neighbours"][0]["similarity"] > 0.99  # the photo itself is in the index
    timings = got["timings_ms"]
    assert timings["batch_size"] >= 1 and timings["model_batch"] > 0 and payload["timings_ms"]["total"] > 0


def test_locate_accepts_a_raw_image_body_and_k(server, gsv_tree):
    path = photo_of(gsv_tree, "Barcelona", 2)
    raw = httpx.post(server.url + "/v1/locate", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"},
                     params={"k": 3}, timeout=60)
    form = locate(server, path, k=3)
    assert raw.status_code == 200 and form.status_code == 200
    raw_result, form_result = raw.json()["results"][0], form.json()["results"][0]
    assert raw_result["source"] == "body"
    assert raw_result["top5"] == form_result["top5"] and raw_result["neighbours"] == form_result["neighbours"]
    assert len([c for c in raw_result["top5"] if c["probability"] > 0]) <= 3  # only 3 neighbours voted


def test_batch_answers_each_photo_in_order(server, gsv_tree):
    paths = [photo_of(gsv_tree, c, 1) for c in ("London", "PRS", "Osaka")]
    files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    response = httpx.post(server.url + "/v1/locate/batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    results = strict_loads(response.text)["results"]
    assert [r["source"] for r in results] == [p.name for p in paths]
    for path, result in zip(paths, results):
        single = locate(server, path).json()["results"][0]
        assert same_answer(result, single)


def same_answer(a: dict, b: dict, tol: float = 1e-5) -> bool:
    """The same cities in the same order and the same neighbours; numbers equal up to float rounding (a batch of
    three and a batch of one go through different BLAS blockings on a CPU: embeddings differ by ~1e-7, which a
    probability rounded to 6 decimals can show)."""
    def close(x, y):
        return abs(x - y) <= tol
    return ([c["city"] for c in a["top5"]] == [c["city"] for c in b["top5"]]
            and all(close(x["probability"], y["probability"]) for x, y in zip(a["top5"], b["top5"]))
            and [n["row"] for n in a["neighbours"]] == [n["row"] for n in b["neighbours"]]
            and all(close(x["similarity"], y["similarity"]) for x, y in zip(a["neighbours"], b["neighbours"])))


def png_bomb(width=30000, height=30000) -> bytes:
    """A valid 1-bit PNG of width x height (900 megapixels) that compresses to about a hundred kilobytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def truncated_jpeg(gsv_tree) -> bytes:
    data = photo_of(gsv_tree, "PRS").read_bytes()
    return data[: len(data) // 2]


def lying_jpeg(claimed: int = 2000) -> bytes:
    """A 160 x 120 JPEG whose header claims claimed x claimed pixels: libjpeg would pad the rest with grey."""
    import numpy as np
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
    data = bytearray(out.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", claimed, claimed)
    return bytes(data)


def big_jpeg(megabytes: float) -> bytes:
    """A real JPEG over `megabytes`: random pixels do not compress."""
    import numpy as np
    side = int((megabytes * 2**20 / 3) ** 0.5 * 1.6)
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, "JPEG", quality=100)
    assert len(out.getvalue()) > megabytes * 2**20
    return out.getvalue()


BAD_INPUTS = {
    # name: (how it is sent, status, code)
    "text file": ("form", lambda t: b"this is not a picture\n", 415, "not_an_image"),
    "empty file": ("form", lambda t: b"", 400, "empty"),
    "empty body": ("raw", lambda t: b"", 400, "empty"),
    "truncated jpeg": ("form", truncated_jpeg, 422, "corrupt"),
    "jpeg whose header lies about its size": ("raw", lambda t: lying_jpeg(), 422, "corrupt"),
    "decompression bomb": ("form", lambda t: png_bomb(), 413, "too_many_pixels"),
    "over --max-upload-mb": ("form", lambda t: big_jpeg(MAX_UPLOAD_MB + 0.5), 413, "too_large"),
    "over --max-upload-mb, raw": ("raw", lambda t: big_jpeg(MAX_UPLOAD_MB + 0.5), 413, "too_large"),
    "text/plain body": ("text", lambda t: b"hello", 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server, gsv_tree, case):
    how, make, status, code = BAD_INPUTS[case]
    data = make(gsv_tree)
    if how == "form":
        response = httpx.post(server.url + "/v1/locate", files={"image": ("upload.jpg", data, "image/jpeg")}, timeout=60)
    else:
        content_type = "image/jpeg" if how == "raw" else "text/plain"
        response = httpx.post(server.url + "/v1/locate", content=data, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == status, response.text
    payload = strict_loads(response.text)
    assert payload["code"] == code and payload["error"] and "Traceback" not in response.text
    assert_still_serving(server, gsv_tree)


@pytest.mark.parametrize("fmt", ["EPS", "GIF", "TGA", "PCX"])
def test_formats_the_service_does_not_read_get_415_and_never_run_ghostscript(server, gsv_tree, ghostscript_marker, fmt):
    picture = Image.open(photo_of(gsv_tree, "London")).convert("RGB")
    out = io.BytesIO()
    picture.save(out, format=fmt)
    for how in ("form", "raw"):
        if how == "form":
            response = httpx.post(server.url + "/v1/locate", files={"image": ("photo.jpg", out.getvalue(), "image/jpeg")},
                                  timeout=60)
        else:
            response = httpx.post(server.url + "/v1/locate", content=out.getvalue(),
                                  headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert response.status_code == 415, response.text
        assert response.json()["code"] == "not_an_image"
    assert not ghostscript_marker[1].exists(), "the server ran gs on an upload"
    assert_still_serving(server, gsv_tree)


def test_a_bad_photo_in_a_batch_gets_its_error_and_the_others_their_answers(server, gsv_tree):
    """As `geoindex query` answers each readable photo: one bad photo does not fail the batch."""
    good, other = photo_of(gsv_tree, "London"), photo_of(gsv_tree, "Osaka")
    files = [("image", (good.name, good.read_bytes(), "image/jpeg")), ("image", ("notes.txt", b"hello", "text/plain")),
             ("image", ("huge.jpg", big_jpeg(MAX_UPLOAD_MB + 0.5), "image/jpeg")),
             ("image", (other.name, other.read_bytes(), "image/jpeg"))]
    response = httpx.post(server.url + "/v1/locate/batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    results = strict_loads(response.text)["results"]
    assert [r["source"] for r in results] == [good.name, "notes.txt", "huge.jpg", other.name]
    assert results[0]["city"] and results[3]["city"] and "error" not in results[0]
    assert results[1]["code"] == "not_an_image" and results[1]["error"].startswith("not an image")
    assert results[2]["code"] == "too_large" and "--max-upload-mb" in results[2]["error"]
    assert_still_serving(server, gsv_tree)


def test_bad_query_parameter_and_unknown_route_are_json(server):
    response = httpx.post(server.url + "/v1/locate", params={"k": 0}, content=b"x", headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 422 and response.json()["code"] == "invalid_request" and "k" in response.json()["error"]
    response = httpx.get(server.url + "/v1/nothing-here")
    assert response.status_code == 404 and response.json()["code"] == "http_404"


def test_16_concurrent_requests_all_answer_and_share_batches(server, tiny_index, gsv_tree):
    before = httpx.get(server.url + "/healthz").json()["batching"]
    cities = ["Barcelona", "London", "Osaka", "PRS"]
    paths = [photo_of(gsv_tree, cities[i % 4], i // 4) for i in range(16)]
    barrier = threading.Barrier(16)

    def one(path):
        with httpx.Client(timeout=120) as client:
            data = path.read_bytes()
            barrier.wait()
            return client.post(server.url + "/v1/locate", files={"image": (path.name, data, "image/jpeg")})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, paths))
    assert [r.status_code for r in responses] == [200] * 16
    expected = tiny_index[0].query([str(p) for p in paths], k=20)
    for path, response, truth in zip(paths, responses, expected):  # nobody got somebody else's answer
        result = response.json()["results"][0]
        assert result["source"] == path.name
        assert [n["row"] for n in result["neighbours"]] == [n.row for n in truth.neighbours]
    health = httpx.get(server.url + "/healthz").json()
    after = health["batching"]
    assert after["items"] - before["items"] == 16 and after["workers"] == 2
    if sys.platform == "linux":  # where the server's CPU went, by thread: the model threads did the embedding
        assert health["cpu_seconds_by_thread"]["geoindex-batcher"] > 0
    assert max(r.json()["results"][0]["timings_ms"]["batch_size"] for r in responses) > 1  # embedded together


def test_uploads_never_touch_the_disk(tiny_index, monkeypatch):
    """Starlette spools form files over 1 MB to a temporary file; this app must not: any temporary
    file created while the real app (uvicorn, in a thread here so tempfile can be watched) serves a
    1.5 MB upload fails the test."""
    import tempfile as tempfile_module

    import numpy as np
    skip_without_the_serve_extra()
    import uvicorn

    from geoindex.serve.app import create_app

    created = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        original = getattr(tempfile_module, name)
        monkeypatch.setattr(tempfile_module, name, lambda *a, _o=original, _n=name, **k: created.append(_n) or _o(*a, **k))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(tiny_index[0], max_upload_mb=MAX_UPLOAD_MB), port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(out, "JPEG", quality=98)
        assert 1 * 2**20 < len(out.getvalue()) < MAX_UPLOAD_MB * 2**20
        response = httpx.post(f"http://127.0.0.1:{port}/v1/locate", files={"image": ("big.jpg", out.getvalue(), "image/jpeg")},
                              timeout=60)
        assert response.status_code == 200, response.text
    finally:
        uv.should_exit = True
        thread.join(20)
    assert created == []


def test_thumbnails_only_for_rows_of_the_index(server, tiny_index):
    index, _ = tiny_index
    n = len(index.store.metadata("train"))
    response = httpx.get(f"{server.url}/v1/photos/{n - 1}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size[0] > 0
    for row in (n, -1, 10**12):
        response = httpx.get(f"{server.url}/v1/photos/{row}")
        assert response.status_code == 404 and response.json()["code"] == "no_such_row"
    for attempt in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "0.5", "abc"):
        response = httpx.get(f"{server.url}/v1/photos/{attempt}")
        assert response.status_code in (404, 422) and "error" in response.json()
        assert b"root:" not in response.content


def test_index_healthz_openapi_and_page(server, tiny_index):
    index, _ = tiny_index
    described = strict_loads(httpx.get(server.url + "/v1/index").text)
    assert described["name"] == "tiny" and described["backbone"] == "cnn" and described["synthetic"] is True
    assert [c["city"] for c in described["cities"]] == index.classes
    assert described["counts"] == index.manifest["counts"] and described["methods"] == ["knn", "classifier"]
    assert all(-90 <= c["lat"] <= 90 for c in described["cities"])
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["build_id"] == health["build_id_on_disk"] == index.manifest["build_id"]
    assert described["build_id"] == index.manifest["build_id"]
    limits = described["limits"]
    assert limits["max_upload_mb"] == MAX_UPLOAD_MB and limits["max_pixels"] == DEFAULT_MAX_PIXELS
    schema = httpx.get(server.url + "/openapi.json").json()
    for route in ("/v1/locate", "/v1/locate/batch"):  # the limits the service enforces, stated where clients read
        text = schema["paths"][route]["post"]["description"]
        for stated in (f"{MAX_UPLOAD_MB:g} MB", f"{limits['max_request_mb']:g} MB", f"{limits['max_files_per_batch']} photos",
                       f"{DEFAULT_MAX_PIXELS / 1e6:g} MP", f"{limits['max_unscaled_pixels'] / 1e6:g} MP"):
            assert stated in text, (route, stated)
    locate_body = schema["paths"]["/v1/locate"]["post"]["requestBody"]["content"]
    assert "image" in locate_body["multipart/form-data"]["schema"]["properties"] and "image/jpeg" in locate_body
    assert {"/v1/locate/batch", "/v1/index", "/v1/photos/{row}", "/healthz"} <= set(schema["paths"])
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'id="map"' in page.text and "static/app.js" in page.text
    topo = httpx.get(server.url + "/static/map/countries-50m.json").json()
    assert topo["type"] == "Topology" and len(topo["objects"]["countries"]["geometries"]) > 200


def test_help_says_how_to_run_behind_a_reverse_proxy():
    from geoindex.serve.cli import serve
    result = CliRunner().invoke(serve, ["--help"])
    assert result.exit_code == 0
    for needle in ("location /geoindex/", "proxy_pass http://127.0.0.1:8000/", "--root-path /geoindex",
                   "X-Forwarded-Proto", "--max-upload-mb", "--max-batch", "--workers"):
        assert needle in result.output


def test_unknown_index_is_one_line_and_no_traceback(tiny_index):
    skip_without_the_serve_extra()
    _, index_dir = tiny_index
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "geoindex.serve", "--index", "nope", "--index-dir", str(index_dir),
                           "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no index named 'nope'" in proc.stderr and "tiny" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("blocked", [("uvicorn",), ("fastapi", "uvicorn", "python_multipart")])
def test_serve_without_its_extra_says_what_to_install_in_one_line(tmp_path, blocked):
    script = ("import sys; sys.modules.update(dict.fromkeys(sys.argv[2:])); from geoindex.cli import main; "
              "main(['serve', '--index', 'any', '--index-dir', sys.argv[1]], prog_name='geoindex')")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), *blocked], capture_output=True, text=True,
                          timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    named = "uvicorn is" if len(blocked) == 1 else "fastapi, uvicorn, python-multipart are"
    assert proc.stderr.strip().splitlines() == [
        f"Error: geoindex serve needs its extra, and {named} not installed: pip install 'geoindex[serve]'"]


# ---------------------------------------------------------------------------- the micro-batcher alone
def test_batcher_runs_items_that_arrive_together_in_one_call():
    calls = []
    gate = threading.Event()

    def run(items, group):
        gate.wait(5)  # the first call holds the model while the others queue up
        calls.append((list(items), group))
        return [x * 10 for x in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_ms=50)
    futures = [batcher.submit(i, group="k20") for i in range(7)]
    gate.set()
    results = [f.result(5) for f in futures]
    batcher.close()
    assert [r for r, _ in results] == [i * 10 for i in range(7)]
    assert all(len(items) <= 4 for items, _ in calls) and len(calls) < 7
    assert sorted(x for items, _ in calls for x in items) == list(range(7))
    assert max(timing.batch_size for _, timing in results) > 1


def test_batcher_keeps_groups_apart_and_isolates_a_failing_item():
    def run(items, group):
        if "bad" in items:
            raise ValueError("bad item")
        return [(group, x) for x in items]

    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=30)
    futures = [batcher.submit(x, group=g) for x, g in [("a", 1), ("b", 2), ("bad", 1), ("c", 1)]]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(5)[0])
        except ValueError as exc:
            outcomes.append(str(exc))
    batcher.close()
    assert outcomes == [(1, "a"), (2, "b"), "bad item", (1, "c")]


def test_batcher_with_two_model_threads_runs_two_batches_at_once_and_loses_nothing():
    both_running = threading.Barrier(2, timeout=5)  # passes only if two run_batch calls are inside at the same time
    calls, overlapped = itertools.count(), []

    def run(items, group):
        if next(calls) < 2:  # the first two batches wait for each other
            try:
                both_running.wait()
                overlapped.append(True)
            except threading.BrokenBarrierError:
                overlapped.append(False)
        time.sleep(0.005)
        return [x + 1 for x in items]

    batcher = MicroBatcher(run, max_batch=3, max_wait_ms=5, workers=2)
    futures = [batcher.submit(i) for i in range(40)]
    results = [f.result(10) for f in futures]
    assert batcher.stats()["workers"] == 2 and batcher.stats()["items"] == 40
    batcher.close(timeout=5)
    assert overlapped == [True, True]
    assert [r for r, _ in results] == [i + 1 for i in range(40)]  # each answer goes back to its own item
    assert all(1 <= timing.batch_size <= 3 for _, timing in results)
    assert not any(t.is_alive() for t in batcher._threads)  # close() stops every model thread


def test_batcher_refuses_zero_workers():
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(lambda items, g: list(items), workers=0)


def test_service_and_cli_share_each_default():
    """One value each, defined once: the CLI's options and create_app's keywords agree."""
    import inspect

    from geoindex.cli import build
    from geoindex.serve.app import create_app
    from geoindex.serve.cli import serve
    defaults = {p.name: p.default for p in serve.params}
    keywords = inspect.signature(create_app).parameters
    for name in ("max_upload_mb", "max_request_mb", "max_inflight_mb", "max_files", "max_pixels", "reload_check_s",
                 "max_batch", "max_wait_ms"):
        assert defaults[name] == keywords[name].default, name
    assert defaults["max_pixels"] == {p.name: p.default for p in build.params}["max_pixels"] == DEFAULT_MAX_PIXELS


def test_serve_splits_its_threads_between_model_threads():
    from geoindex.serve.cli import split_threads
    assert split_threads(2, None, "cpu") == (2, 1)   # two one-thread batches side by side on 2 cores
    assert split_threads(16, None, "cpu") == (2, 8)
    assert split_threads(1, None, "cpu") == (1, 1)
    assert split_threads(8, None, "cuda") == (1, 8)  # a GPU runs one batch at a time anyway
    assert split_threads(4, 3, "cpu") == (3, 1)


def test_batcher_does_not_wait_when_nothing_else_is_coming():
    batcher = MicroBatcher(lambda items, g: list(items), max_batch=8, max_wait_ms=2000, expecting=lambda: 0)
    start = time.perf_counter()
    result, timing = batcher.submit("alone").result(5)
    batcher.close()
    assert result == "alone" and timing.batch_size == 1
    assert time.perf_counter() - start < 1.0  # not the 2 s window
