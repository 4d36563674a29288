"""A running `geoindex serve` while the index under it is rebuilt, retrained and removed: every answer comes whole
from one generation of the index (its vectors, rows, model, head and kNN tuning), names it, and /healthz says
which one is served and whether the disk still holds it."""
import threading
import time

import httpx
from click.testing import CliRunner

import geoindex
from geoindex.geo_index import load_index
from test_serve import ServerProcess, build_tiny_index

LOG = dict(log=lambda m: None)


def generation(index_dir, name) -> tuple[str, dict]:
    """(build_id, {photo path: train row}) of the index as it is on disk now."""
    index = load_index(name, index_dir, device="cpu")
    try:
        return index.manifest["build_id"], {p: i for i, p in enumerate(index.store.metadata("train")["path"])}
    finally:
        index.close()


def retrain(index_dir, name):
    """What `geoindex train --mode probe` writes in place: a probe head, then the kNN tuning."""
    index = load_index(name, index_dir, device="cpu")
    try:
        geoindex.train_probe(index, epochs=2, progress=False, **LOG)
        geoindex.tune_knn(index, **LOG)
    finally:
        index.close()


def health(server) -> httpx.Response:
    return httpx.get(server.url + "/healthz", timeout=30)


def wait_for(server, predicate, what, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = health(server)
        if predicate(response):
            return response.json()
        time.sleep(0.2)
    raise AssertionError(f"/healthz never showed {what}: last {response.status_code} {response.text[:400]}")


def locate(server, path):
    return httpx.post(server.url + "/v1/locate", files={"image": ("photo.jpg", open(path, "rb").read(), "image/jpeg")},
                      timeout=60)


def test_every_answer_comes_from_one_generation_through_rebuild_retrain_and_rm(gsv_tree, tmp_path):
    index_dir = tmp_path / "indexes"
    build_tiny_index(gsv_tree, index_dir, name="live")
    retrain(index_dir, "live")
    generations = {}
    build_a, rows = generation(index_dir, "live")
    generations[build_a] = rows
    photos = sorted(rows)[:12]  # indexed photos: each must find itself, at its own row of the answering generation
    server = ServerProcess("--index", "live", "--index-dir", index_dir, "--reload-check-s", 0.3, "--model-threads", 1,
                           "--log-level", "info")
    answers, stop = [], threading.Event()

    def keep_asking():
        i = 0
        while not stop.is_set():
            path = photos[i % len(photos)]
            i += 1
            response = locate(server, path)
            answers.append((path, response.status_code, response.json()))

    try:
        body = health(server).json()
        assert body["status"] == "ok" and body["build_id"] == build_a == body["build_id_on_disk"]
        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            time.sleep(1)
            # `build --overwrite` over other photos: other rows, other split, other vectors (48 px, not 64), no head
            geoindex.build_index(gsv_tree, name="live", index_dir=index_dir, backbone="cnn", weights="none",
                                 image_size=48, batch_size=16, num_workers=0, device="cpu", progress=False,
                                 overwrite=True, seed=1, per_city=12, **LOG)
            retrain(index_dir, "live")  # then `train`: a head and kNN tuning for the new vectors
            build_b, rows = generation(index_dir, "live")
            generations[build_b] = rows
            assert build_b != build_a and any(generations[build_a].get(p) != rows.get(p) for p in photos)
            body = wait_for(server, lambda r: r.json().get("build_id") == build_b and r.json()["status"] == "ok",
                            f"build {build_b} served")
            assert body["build_id_on_disk"] == build_b and body["reloads"] >= 1
            time.sleep(1)  # a few answers from the new generation too
        finally:
            stop.set()
            asker.join(120)
        assert answers and all(status == 200 for _, status, _ in answers), answers[-1]
        served = set()
        for path, _, payload in answers:
            build = payload["build_id"]
            served.add(build)
            (result,) = payload["results"]
            top = result["neighbours"][0]
            assert build in generations, build
            if path in generations[build]:  # indexed in the generation that answered: it finds itself there
                assert top["row"] == generations[build][path] and top["similarity"] > 0.99, (build, path, top)
            assert top["thumbnail"] == f"v1/photos/{top['row']}?build={build}"
        assert served == {build_a, build_b}

        # A thumbnail URL of the old generation is refused, not answered with another photo.
        assert httpx.get(f"{server.url}/v1/photos/0", params={"build": build_a}).status_code == 410
        assert httpx.get(f"{server.url}/v1/photos/0", params={"build": build_b}).status_code == 200

        # `train` again, in place (same build_id): the new head and tuning are loaded together, then answered from.
        reloads = health(server).json()["reloads"]
        retrain(index_dir, "live")
        wait_for(server, lambda r: r.json()["reloads"] > reloads and r.json()["status"] == "ok", "a reload")

        # `rm`: the service stops answering from an index the disk no longer has, and says so.
        from geoindex.cli import main
        assert CliRunner().invoke(main, ["rm", "live", "--yes", "--index-dir", str(index_dir)]).exit_code == 0
        body = wait_for(server, lambda r: r.status_code == 503, "the index removed")
        assert body["status"] == "index_removed" and body["build_id_on_disk"] is None
        response = locate(server, photos[0])
        assert response.status_code == 503 and response.json()["code"] == "index_removed"
        assert httpx.get(f"{server.url}/v1/photos/0").status_code == 503
        assert httpx.get(f"{server.url}/v1/index").status_code == 503

        # Built again under the same name: served again.
        build_index = geoindex.build_index(gsv_tree, name="live", index_dir=index_dir, backbone="cnn", weights="none",
                                           image_size=64, batch_size=16, num_workers=0, device="cpu", progress=False,
                                           seed=2, **LOG)
        build_c = build_index.manifest["build_id"]
        wait_for(server, lambda r: r.status_code == 200 and r.json()["build_id"] == build_c, f"build {build_c} served")
        response = locate(server, photos[0])
        assert response.status_code == 200 and response.json()["build_id"] == build_c
        log = server.output()
        assert "Traceback" not in log and "reloaded" in log
    finally:
        stop.set()
        server.stop()


def test_an_index_that_changes_into_something_unloadable_is_not_answered_from(gsv_tree, tmp_path):
    index_dir = tmp_path / "indexes"
    build_tiny_index(gsv_tree, index_dir, name="live")
    build_a, rows = generation(index_dir, "live")
    photo = sorted(rows)[0]
    server = ServerProcess("--index", "live", "--index-dir", index_dir, "--reload-check-s", 0.3)
    try:
        manifest = index_dir / "live" / "manifest.json"
        good = manifest.read_text()
        manifest.write_text(good[: len(good) // 2])  # damaged where it lies
        body = wait_for(server, lambda r: r.status_code == 503, "the damaged index refused")
        assert body["status"] == "index_unusable" and "manifest" in body["problem"]
        response = locate(server, photo)
        assert response.status_code == 503 and response.json()["code"] == "index_unusable"
        assert "manifest.json" in response.json()["error"] and str(index_dir) not in response.text  # no server paths
        manifest.write_text(good)  # repaired: loaded again, and answered from
        wait_for(server, lambda r: r.status_code == 200 and r.json()["status"] == "ok", "the repaired index served")
        response = locate(server, photo)
        assert response.status_code == 200 and response.json()["build_id"] == build_a
        assert response.json()["results"][0]["neighbours"][0]["row"] == rows[photo]
    finally:
        server.stop()
