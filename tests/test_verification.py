"""Spatial verification of street-level answers: inliers tell a revisited scene from an unrelated one, the inlier
threshold is chosen on val like the street threshold, and a verified photo's spot is what `query` (file, JSON, text)
and the service answer, the same from both."""
import csv
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFilter

from geoindex.cli import main
from geoindex.geo_index import load_index
from geoindex.layout import KNN_PARAMS
from geoindex.synthetic import make_synthetic_gsv
from geoindex.verification import Verifier, best_verified, opencv

pytestmark = pytest.mark.skipif(opencv() is None, reason="OpenCV is not installed (pip install opencv-python-headless)")
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Textured scenes that ship inside scikit-image (no download): one gallery photo each, at its own spot
SCENES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
UNRELATED = "brick"
VERIFY = {"inliers": 15, "k": 10, "radius_m": 7.0, "val_share": 0.13, "val_precision": 0.8, "n_val": 558}


def scene(name: str) -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB")


def crop(image: Image.Image, box, size=224) -> Image.Image:
    """A photo of part of the scene: a crop, resized as a street-view crop would be."""
    w, h = image.size
    return image.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h))).resize((size, size))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_inliers_tell_another_view_of_a_scene_from_an_unrelated_one(tmp_path):
    verifier = Verifier()
    astronaut = scene("astronaut")
    crop(astronaut, (0.0, 0.0, 0.8, 0.8)).save(tmp_path / "a.jpg", quality=90)
    crop(astronaut, (0.1, 0.05, 0.9, 0.85), size=256).save(tmp_path / "b.jpg", quality=80)  # moved and rescaled
    crop(scene("coffee"), (0.1, 0.1, 0.7, 0.9)).save(tmp_path / "c.jpg")
    a, b, c = (verifier.features(tmp_path / f"{n}.jpg") for n in "abc")
    same, other = verifier.inliers(a, b), verifier.inliers(a, c)
    assert same >= 30 and other < 15, (same, other)
    # a PIL image and a (3, H, W) uint8 tensor (the service's model input) are read as the file is
    import torch
    pil = Image.open(tmp_path / "b.jpg").convert("RGB")
    assert verifier.inliers(a, verifier.features(pil)) >= 30
    assert verifier.inliers(a, verifier.features(torch.from_numpy(np.array(pil)).permute(2, 0, 1))) >= 30
    # an unreadable file or no photo at all is never verified, and does not raise
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert verifier.features(tmp_path / "broken.jpg") is None and verifier.features(tmp_path / "gone.jpg") is None
    assert verifier.features(None) is None and verifier.inliers(a, None) == 0
    counts = verifier.shortlist_inliers([tmp_path / "b.jpg"], np.array([[1, 0, -1]]),
                                        [str(tmp_path / "a.jpg"), str(tmp_path / "c.jpg")])
    assert counts[0, 1] == verifier.inliers(b, a) >= 30 and counts[0, 2] == 0
    assert counts[0, 0] == verifier.inliers(b, c) < 15
    assert best_verified(counts)[0].tolist() == [1]
    # ties go to the search's earlier neighbour
    assert best_verified(np.array([[3, 9, 9], [0, 0, 0]]))[0].tolist() == [1, 0]
    assert [len(x) for x in best_verified(np.zeros((0, 10), dtype=np.int32))] == [0, 0]


def test_shortlists_compute_each_candidate_once_a_chunk_and_match_it_with_every_query_listing_it(monkeypatch):
    import geoindex.verification
    from geoindex.verification import _Matcher

    monkeypatch.setattr(geoindex.verification, "CANDIDATE_BATCH", 2)  # several batches of candidates a chunk

    class Counting(_Matcher):
        """Photos are numbers (not files: never cached) and their own features; inliers between a and b are
        10 a + b; photo 9 cannot be read."""

        def __init__(self):
            super().__init__(cache_photos=0)  # no cache: what is computed once is the chunk's doing
            self.computed, self.matched = [], []

        def _one(self, source):
            self.computed.append(source)
            return None if source == 9 else source

        def inliers(self, a, b):
            self.matched.append((a, b))
            return 0 if a is None or b is None else 10 * a + b

    matcher = Counting()
    paths = np.arange(10)
    queries = [1, 2, 9, 3]  # 9 cannot be read: its candidates are never computed for it
    shortlists = np.array([[4, 5, 6, 4], [6, 4, -1, -1], [7, 8, 7, -1], [5, 6, 4, 5]])  # 4, 7, 5 listed twice
    counts = matcher.shortlist_inliers(queries, shortlists, paths, chunk=3)
    expected = np.where(shortlists >= 0, 10 * np.array([1, 2, 0, 3])[:, None] + shortlists, 0)
    expected[2] = 0
    assert counts.tolist() == expected.tolist()
    candidates = [c for c in matcher.computed if c not in queries]
    matched = matcher.matched
    # chunk 1 (1, 2, 9): 4, 5 and 6 once each, 7 and 8 never (only 9 lists them); chunk 2 (3): 4, 5 and 6 again
    assert sorted(candidates[:3]) == [4, 5, 6] and sorted(candidates[3:]) == [4, 5, 6]
    assert sorted(matched) == sorted(set(matched)) and len(matched) == 3 + 2 + 3  # a pair listed twice: matched once


def test_odd_photos_are_left_unverified_without_an_error(tmp_path):
    verifier = Verifier()
    Image.new("RGB", (1, 2000), (90, 90, 90)).save(tmp_path / "thin.png")  # shrinks to under a pixel wide
    Image.new("RGB", (3, 3)).save(tmp_path / "tiny.png")
    Image.new("RGBA", (300, 200), (10, 200, 30, 128)).save(tmp_path / "flat.png")  # no keypoint at all
    for name in ("thin.png", "tiny.png", "flat.png"):
        assert verifier.features(tmp_path / name) is None, name
    assert verifier.features((tmp_path / "thin.png").read_bytes()) is None
    assert verifier.features(np.zeros((1, 1), dtype=np.uint8)) is None


def test_a_verified_photo_counts_only_in_the_city_the_vote_chose():
    from geoindex.revisit import verified_mask, verified_neighbours
    inliers = np.array([[5, 40, 20], [0, 0, 0], [30, 0, 0], [50, 9, 0]], dtype=np.int32)
    ids = np.array([[7, 3, 9], [1, 2, -1], [4, -1, -1], [3, 8, -1]])
    labels = np.zeros(10, dtype=np.int64)
    labels[[3, 8]] = 1  # the 40- and 50-inlier photos lie in the other city, and so does photo 8
    chosen, counts, column = verified_neighbours(inliers, ids, labels, winners=np.array([0, 0, 0, 0]))
    # the next best in the voted city answers; where no neighbour is in it, nothing is verified
    assert chosen.tolist()[:3] == [9, 1, 4] and column.tolist()[:3] == [2, 0, 0]
    assert counts.tolist() == [20, 0, 30, -1]
    for same in (0, np.zeros((4, 1), dtype=np.int64)):  # one city for all, or a column of them: read alike
        assert verified_neighbours(inliers, ids, labels, winners=same)[1].tolist() == counts.tolist()
    assert verified_mask(counts, {"inliers": 15}).tolist() == [True, False, True, False]
    assert not verified_mask(counts, {"inliers": None}).any() and not verified_mask(counts, None).any()
    chosen, counts, _ = verified_neighbours(inliers, ids, labels, winners=np.array([1, 0, 0, 1]))
    assert chosen.tolist() == [3, 1, 4, 3] and counts.tolist() == [40, 0, 30, 50]


def test_the_inlier_threshold_is_the_lowest_that_keeps_val_answers_precise_and_moves_ties_whole(monkeypatch):
    from geoindex import revisit

    monkeypatch.setattr(revisit, "MIN_STREET_ANSWERS", 2)
    # best inliers per val answer, and whether that photo lies within 25 m
    counts = np.array([40, 30, 20, 20, 12, 12, 12, 8, -1])
    hits = np.array([True, True, True, False, True, False, False, True, False])
    assert revisit.inliers_threshold(counts, hits) == 30  # >= 20 would be 3 right of 4
    monkeypatch.setattr(revisit, "STREET_PRECISION", 0.6)
    assert revisit.inliers_threshold(counts, hits) == 8  # 5 of 8 answers right, though >= 12 alone is 4 of 7
    monkeypatch.setattr(revisit, "STREET_PRECISION", 0.75)
    # the first of three 12s would keep 3 of 3 right, but `>= 12` takes all three: 3 of 5
    assert revisit.inliers_threshold(np.array([30, 30, 12, 12, 12]), np.array([1, 1, 1, 0, 0], dtype=bool)) == 30
    monkeypatch.setattr(revisit, "STREET_PRECISION", 1.01)
    assert revisit.inliers_threshold(counts, hits) is None


def build_gallery(base: Path, street: dict, look_alike: bool = False):
    """A source index (tiny CNN) and a gallery of textured photos built `--features-from` it, every photo at its
    own spot in London, with `street` as the gallery's street calibration; queries: another view of the third
    scene, and a scene the gallery does not hold. look_alike: the gallery also holds the revisit query blurred, at a
    spot of its own: its layout and colours (what the tiny CNN embeds), none of the detail matching in place
    checks. (indexes folder, gallery rows, queries folder)"""
    from conftest import build_cnn_index

    source = make_synthetic_gsv(base / "GSV", cities=("Barcelona", "London"), places_per_city=4, images_per_place=2,
                                image_size=(40, 32))
    home = base / "indexes"
    build_cnn_index(source, home, "src")
    photos = base / "photos"
    photos.mkdir()
    rows = []
    for i, name in enumerate(SCENES):
        path = photos / f"{name}.jpg"
        crop(scene(name), (0.0, 0.0, 0.8, 0.8)).save(path, quality=90)
        rows.append({"path": str(path), "city": "London", "lat": 51.50 + 0.01 * i, "lon": -0.12, "yyyymm": 201906})
    revisit = crop(scene(SCENES[2]), (0.1, 0.05, 0.9, 0.85), size=256)
    if look_alike:
        revisit.filter(ImageFilter.GaussianBlur(6)).save(photos / "look-alike.jpg", quality=80)
        rows.append({"path": str(photos / "look-alike.jpg"), "city": "London", "lat": 51.60, "lon": -0.12,
                     "yyyymm": 201906})
    with open(base / "gallery.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run("build", "--data", base / "gallery.csv", "--features-from", home / "src", "--name", "gal",
                 "--index-dir", home, "--workers", "0")
    assert result.exit_code == 0, result.output
    params_file = home / "gal" / KNN_PARAMS
    params_file.parent.mkdir(parents=True, exist_ok=True)
    build_id = json.loads((home / "gal" / "manifest.json").read_text())["build_id"]
    params_file.write_text(json.dumps({"k": 3, "vote": "softmax", "temperature": 0.05, "tuned_on": "val",
                                       "build_id": build_id, "street": street}))
    (base / "queries").mkdir()
    revisit.save(base / "queries" / "revisit.jpg", quality=80)
    crop(scene(UNRELATED), (0.0, 0.0, 0.8, 0.8)).save(base / "queries" / "elsewhere.jpg")
    return home, rows, base / "queries"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """build_gallery's, calibrated as val would leave it: no cluster answers at street level, spatial
    verification at 15 inliers."""
    return build_gallery(tmp_path_factory.mktemp("verify"), {"threshold": None, "spot_threshold": None,
                                                             "radius_m": None, "city_radius_m": 4000.0,
                                                             "verify": VERIFY})


def test_query_answers_at_the_verified_photos_spot_at_street_level(gallery):
    home, rows, queries = gallery
    result = run("query", queries / "revisit.jpg", queries / "elsewhere.jpg", "--index", "gal", "--index-dir", home,
                 "--json")
    assert result.exit_code == 0, result.output
    revisit, elsewhere = json.loads(result.output)["results"]
    gps = revisit["gps"]
    assert gps["level"] == "street" and gps["inliers"] >= VERIFY["inliers"] and gps["radius_m"] == VERIFY["radius_m"]
    assert (gps["lat"], gps["lon"]) == (rows[2]["lat"], rows[2]["lon"])
    assert [Path(member["path"]).name for member in gps["cluster"]] == [Path(rows[2]["path"]).name]
    assert elsewhere["gps"]["level"] == "city" and elsewhere["gps"]["inliers"] is None
    assert elsewhere["gps"]["cluster"] == [] and elsewhere["gps"]["radius_m"] == 4000.0

    text = run("query", queries / "revisit.jpg", "--index", "gal", "--index-dir", home).output
    assert f"(street level: an indexed photo shares {gps['inliers']} matched points with it, 80% of val answers " \
           f"within 7 m)" in text

    # above every inlier count the photo holds, the same photo is answered at city level
    params_file = home / "gal" / KNN_PARAMS
    saved = params_file.read_text()
    try:
        params = json.loads(saved)
        params["street"]["verify"] = dict(VERIFY, inliers=gps["inliers"] + 1)
        params_file.write_text(json.dumps(params))
        again = json.loads(run("query", queries / "revisit.jpg", "--index", "gal", "--index-dir", home,
                               "--json").output)["results"][0]["gps"]
        assert again["level"] == "city" and again["inliers"] is None
    finally:
        params_file.write_text(saved)


@contextmanager
def gallery_knn(home: Path, photo: Path):
    """(the gallery index's kNN method, the photo's path, its embedding), the index closed afterwards."""
    index = load_index("gal", home, device="cpu")
    try:
        yield index.knn_method(), str(photo), index.backbone.embed([str(photo)])
    finally:
        index.close()


def query_and_service_gps(home: Path, photo: Path, health: list | None = None) -> tuple[dict, dict]:
    """The `gps` of `query --json` on the file, and of the real service (`python -m geoindex.serve`) on its bytes
    (and its /healthz after that answer, appended to `health`)."""
    import httpx
    from test_serve import ServerProcess

    expected = json.loads(run("query", photo, "--index", "gal", "--index-dir", home,
                              "--json").output)["results"][0]["gps"]
    server = ServerProcess("--index", "gal", "--index-dir", home)
    try:
        with open(photo, "rb") as fh:
            response = httpx.post(server.url + "/v1/locate", files={"image": (photo.name, fh, "image/jpeg")},
                                  timeout=60)
        assert response.status_code == 200, response.text
        if health is not None:
            health.append(httpx.get(server.url + "/healthz", timeout=30).json())
        return expected, response.json()["results"][0]["gps"]
    finally:
        server.stop()


def test_the_service_verifies_an_upload_as_query_verifies_the_file(gallery):
    home, rows, queries = gallery
    health = []
    expected, gps = query_and_service_gps(home, queries / "revisit.jpg", health)
    assert gps["level"] == "street" and gps["inliers"] == expected["inliers"], (gps, expected)
    # the indexed photos it verified against are cached, and /healthz says how much memory that holds
    cached = health[0]["feature_caches"]["sift"]
    assert cached["photos"] >= 1 and 0 < cached["mb"] < 1 and cached["max_photos"] >= cached["photos"], cached
    assert (gps["lat"], gps["lon"]) == (expected["lat"], expected["lon"])
    assert [member["row"] for member in gps["cluster"]] == [member["row"] for member in expected["cluster"]]


def test_probabilities_alone_never_pay_for_verification(gallery, monkeypatch):
    import geoindex.verification
    from geoindex.methods import Photos

    home, rows, queries = gallery
    with gallery_knn(home, queries / "revisit.jpg") as (knn, photo, embeddings):
        photos = Photos(embeddings, [photo])
        verified = knn.predict(photos)
        assert verified.extra["gps_level"][0] == "street" and verified.extra["gps_inliers"][0] >= VERIFY["inliers"]

        def refuse():
            raise AssertionError("verification ran for probabilities alone")
        monkeypatch.setattr(geoindex.verification, "shared_verifier", refuse)
        fresh = Photos(photos.embeddings, [photo])
        assert np.allclose(knn.predict_proba(fresh), verified.probs)  # tuning on val reads only these
        with pytest.raises(AssertionError, match="verification ran"):
            knn.predict(fresh)


def test_the_feature_cache_counts_its_bytes_and_keeps_its_bound(tmp_path):
    verifier = Verifier(cache_photos=2)
    paths = []
    for i, name in enumerate(SCENES[:3]):
        crop(scene(name), (0.0, 0.0, 0.8, 0.8)).save(tmp_path / f"p{i}.jpg", quality=90)
        paths.append(tmp_path / f"p{i}.jpg")
    found = [verifier.features(p) for p in paths]
    sizes = [sum(part.nbytes for part in f) for f in found]
    stats = verifier.cache_stats()
    assert stats["photos"] == 2 and stats["max_photos"] == 2  # the oldest photo was dropped
    assert stats["mb"] == round((sizes[1] + sizes[2]) / 2**20, 2) and stats["mb"] > 0
    verifier.features(tmp_path / "gone.jpg")  # an unreadable file is not cached
    verifier.features(paths[2])  # a hit changes nothing
    assert verifier.cache_stats() == stats


def test_mutual_neighbours_are_the_rows_and_columns_that_are_each_others_first_argmax():
    from geoindex.verification import mutual_neighbours

    def by_definition(similarity):
        forward, backward = similarity.argmax(1), similarity.argmax(0)
        rows = np.flatnonzero(backward[forward] == np.arange(len(forward)))
        return rows, forward[rows]

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((40, 30)).astype(np.float32), rng.standard_normal((30, 40)).astype(np.float32)]
    tied = rng.standard_normal((40, 30)).astype(np.float32)
    tied[[5, 17, 33]] = tied[2]          # equal rows: a column's maximum is reached by several rows
    tied[:, [8, 21]] = tied[:, [3, 3]]   # equal columns: a row's maximum is reached by several columns
    tied[9, :] = tied[9].max()           # a row whose every column is its maximum
    cases += [tied, np.zeros((6, 7), np.float32), rng.integers(0, 3, (50, 50)).astype(np.float32)]
    for similarity in cases:
        found, expected = mutual_neighbours(similarity), by_definition(similarity)
        assert found[0].tolist() == expected[0].tolist() and found[1].tolist() == expected[1].tolist()
    assert len(by_definition(cases[-1])[0]) > 0 and len(by_definition(tied)[0]) > 0


def test_matching_from_several_threads_at_once_gives_blas_its_threads_back(monkeypatch):
    """The service matches several requests' shortlists at once; each holds BLAS to one thread while its pairs run
    on threads of their own. Whatever order they finish in, BLAS is held at one thread while any is inside and
    given back its own limit once the last leaves (threadpoolctl's context alone restores what it found on entry:
    the first in, leaving first, would give BLAS its threads back under the other, which would then restore one)."""
    import threading

    import threadpoolctl

    from geoindex import verification

    state = {"threads": 2}
    events = []

    class Limits:  # threadpoolctl.threadpool_limits, on a BLAS whose limit is `state`
        def __init__(self, limits, user_api):
            assert (limits, user_api) == (1, "blas")
            self.original, state["threads"] = state["threads"], 1
            events.append("held")

        def restore_original_limits(self):
            state["threads"] = self.original
            events.append("restored")

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", Limits)
    inside, release = threading.Barrier(3, timeout=30), [threading.Event(), threading.Event()]
    seen = []

    def request(i):
        with verification._one_blas_thread():
            inside.wait()
            release[i].wait(30)
            seen.append(state["threads"])  # what this request's pairs ran with to the end

    # daemons, and waits with a timeout: a failed assertion must not leave the run waiting on them
    threads = [threading.Thread(target=request, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert state["threads"] == 1
    release[0].set()  # the first to enter leaves first: the other still matches, at one thread
    threads[0].join(30)
    assert state["threads"] == 1
    release[1].set()
    threads[1].join(30)
    assert state["threads"] == 2 and seen == [1, 1] and events == ["held", "restored"]
    with verification._one_blas_thread():  # and again, alone
        assert state["threads"] == 1
    assert state["threads"] == 2 and events == ["held", "restored"] * 2
