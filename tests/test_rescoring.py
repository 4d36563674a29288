"""Dense re-scoring of the street shortlist: mutual nearest neighbours of two photos' CNN feature maps, held by a
homography, tell another view of a scene from an unrelated one; val weighs the re-scoring (or turns it off); `query`
and the service answer from the re-scored order, and probabilities alone never pay for it."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from geoindex.backbones import default_weights_available
from geoindex.layout import KNN_PARAMS
from geoindex.verification import DenseMatcher, opencv

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_verification import (SCENES, UNRELATED, build_gallery, crop, gallery_knn,  # noqa: E402
                               query_and_service_gps, run, scene)

needs_matcher = pytest.mark.skipif(opencv() is None or not default_weights_available("effnet"),
                                   reason="dense matching needs OpenCV and the EfficientNet-Lite0 weights")
RERANK = {"weight": 1.0, "k": 10, "matcher": DenseMatcher.name, "n_val": 500}


@needs_matcher
def test_dense_inliers_tell_another_view_of_a_scene_from_an_unrelated_one(tmp_path):
    import torch

    from geoindex.verification import DenseMatcher, LocalFeatures

    matcher = DenseMatcher()
    gallery = [crop(scene(name), (0.0, 0.0, 0.8, 0.8)) for name in SCENES]
    revisit = crop(scene(SCENES[2]), (0.1, 0.05, 0.9, 0.85), size=256)  # moved and rescaled
    revisit.save(tmp_path / "revisit.jpg", quality=85)
    found = matcher.features_many(gallery)
    counts = [matcher.inliers(matcher.features(tmp_path / "revisit.jpg"), f) for f in found]
    assert counts[2] >= 100 and max(counts[:2] + counts[3:]) * 4 < counts[2], counts
    elsewhere = matcher.features(crop(scene(UNRELATED), (0.0, 0.0, 0.8, 0.8)))
    assert max(matcher.inliers(elsewhere, f) for f in found) * 4 < counts[2]
    # the file, its bytes, a (3, H, W) uint8 tensor and features computed ahead are read alike
    data = (tmp_path / "revisit.jpg").read_bytes()
    tensor = torch.from_numpy(np.array(revisit)).permute(2, 0, 1)
    for source in (data, tensor, LocalFeatures(dense=matcher.features(data))):
        assert matcher.inliers(matcher.features(source), found[2]) >= 100
    # a photo that cannot be read, a strip too thin for the feature map, or none: never matched, never raising
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    from PIL import Image
    Image.new("RGB", (1, 2000)).save(tmp_path / "thin.png")
    for source in (tmp_path / "broken.jpg", tmp_path / "gone.jpg", tmp_path / "thin.png", None,
                   LocalFeatures(sift=None)):
        assert matcher.features(source) is None, source
    assert matcher.inliers(found[0], None) == 0
    # a shortlist, ids into paths with -1 for none
    paths = []
    for i, image in enumerate(gallery):
        image.save(tmp_path / f"g{i}.jpg", quality=90)
        paths.append(str(tmp_path / f"g{i}.jpg"))
    counts = matcher.shortlist_inliers([tmp_path / "revisit.jpg"], np.array([[0, 2, -1]]), paths, chunk=1)
    assert counts[0, 1] >= 100 and counts[0, 0] < 30 and counts[0, 2] == 0


@needs_matcher
def test_square_photos_run_in_the_compiled_trunk_with_eager_pytorchs_features(tmp_path, monkeypatch):
    import torch

    from geoindex.runtime import _openvino
    from geoindex.verification import DENSE_SIDE, _rgb

    monkeypatch.setenv("GEOINDEX_CACHE", str(tmp_path / "cache"))
    matcher = DenseMatcher(runtime="auto")
    photo = crop(scene(SCENES[1]), (0.0, 0.0, 0.8, 0.8))
    _, compiled = matcher.features(photo)
    assert matcher.runtime == ("openvino" if _openvino() is not None else "torch")
    # --runtime torch is obeyed, and leaves the trunk that non-square photos share as it was: their features do
    # not depend on whether a square photo came first (the service computes an upload before its candidates)
    asked = DenseMatcher(runtime="torch")
    wide = crop(scene(SCENES[2]), (0.0, 0.0, 0.8, 0.4)).resize((448, 224))
    before = asked.features(wide)[1]
    asked.features(photo)
    assert asked.runtime == "torch" and np.array_equal(asked.features(wide)[1], before)
    # in `geoindex serve` a model thread's share of the cores is the process's torch threads: the matcher takes
    # that many, not every core
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = DenseMatcher(runtime="auto")
        one.features(photo)
        if one.runtime == "openvino":
            assert one._square.config["INFERENCE_NUM_THREADS"] == "1" and one._square.config["NUM_STREAMS"] == "1"
    finally:
        torch.set_num_threads(threads)
    x = torch.from_numpy(np.array(_rgb(photo, DENSE_SIDE))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        eager = torch.nn.functional.normalize(matcher.trunk(x), dim=1)[0].flatten(1).T.numpy()
    assert compiled.shape == eager.shape == ((DENSE_SIDE // 16) ** 2, 112)
    cosine = (compiled.astype(np.float32) * eager).sum(1)  # both unit length per cell
    assert cosine.min() > 0.999, cosine.min()  # float16 storage, not the runtime, sets this floor
    assert matcher.features(wide)[1].shape == (28 * 14, 112)  # not square: eager PyTorch


def test_rescoring_adds_weighted_inliers_and_keeps_the_search_order_on_ties():
    from geoindex.revisit import rerank_street

    sims = np.array([[0.9, 0.8, 0.7, -3e38], [0.5, 0.5, 0.4, 0.3]], dtype=np.float32)
    ids = np.array([[4, 2, 7, -1], [1, 3, 5, 6]])
    inliers = np.array([[0, 50, 10, 99], [20, 20, 0, 0]])
    fused, order = rerank_street(sims, ids, inliers, 1.0)
    assert order.tolist() == [[2, 4, 7, -1], [1, 3, 5, 6]]  # a missing neighbour stays last whatever its count
    assert np.allclose(fused[0, :3], [1.3, 0.9, 0.8]) and fused[0, 3] == -np.inf
    assert rerank_street(sims, ids, inliers, 0.0)[1].tolist() == ids.tolist()
    assert rerank_street(sims, ids, inliers, 0.003)[1][0].tolist() == [4, 2, 7, -1]  # 0.8 + 0.0015 < 0.9


def test_rescoring_a_deep_shortlist_keeps_the_rest_and_each_neighbours_own_similarity():
    from geoindex.revisit import rerank_depth, rescore_shortlist

    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, -3e38, -3e38, -3e38]], dtype=np.float32)
    ids = np.array([[4, 2, 7, 9, 3], [5, 6, -1, -1, -1]])
    inliers = np.array([[0, 0, 50, 0], [0, 90, 0, 0]])  # the first 4 re-scored; the fifth stays where it was
    scores, order, own = rescore_shortlist(sims, ids, inliers, 1.0)
    assert order.tolist() == [[7, 4, 2, 9, 3], [6, 5, -1, -1, -1]]
    assert np.allclose(own[0], [0.7, 0.9, 0.8, 0.6, 0.5]) and np.allclose(own[1, :2], [0.8, 0.9])
    assert np.allclose(scores[0], [1.2, 0.9, 0.8, 0.6, 0.5]) and (scores[1, 2:4] == -np.inf).all()
    narrow = rescore_shortlist(sims[:, :2], ids[:, :2], inliers[:, :2], 1.0)[1]  # a gallery narrower than k
    assert narrow.tolist() == [[4, 2], [6, 5]]
    assert rerank_depth({"weight": 1.0, "k": 50}) == 50 and rerank_depth({"weight": 1.0}) == rerank_depth(None) == 10


class _Photos:
    """The protocol's table as RevisitSet has it, over hand-made shortlists: val photo r (of 100) is at its own
    spot, 1.1 km from the next; its older capture, photo 100 + r, is found at `spot_column` (third) by the search;
    every other neighbour is one of photos 200-299, 100 km north."""

    def __init__(self, n_val=20, spot_column=2):
        import pandas as pd

        self.spot_column = spot_column
        self.rows = np.arange(n_val)
        self.lat = np.concatenate([51.0 + 0.01 * (np.arange(200) % 100), 52.0 + 0.01 * np.arange(100)])
        self.lon = np.full(300, -0.1)
        self.labels = np.zeros(300, dtype=np.int64)
        self.table = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(300)], "split": ["val"] * 300})

    def neighbours(self, rows, k, space=None, gallery_splits=None):
        k = min(k, 100)
        ids = 200 + (rows[:, None] + 1 + np.arange(k)[None]) % 100
        if self.spot_column < k:
            ids[:, self.spot_column] = 100 + rows
        return np.tile(np.linspace(0.9, 0.5, k, dtype=np.float32), (len(rows), 1)), ids


class _Matcher:
    """80 inliers with the photo's own spot (right) or with the fifth neighbour, a look-alike (not right)."""

    def __init__(self, right: bool):
        self.right = right

    def shortlist_inliers(self, sources, ids, paths, progress=None):
        rows = np.array([int(Path(source).stem[1:]) for source in sources])
        if self.right:
            return np.where(ids == rows[:, None] + 100, 80, 5)
        return np.where(np.arange(ids.shape[1])[None] % 10 == 4, 80, 5)


@pytest.mark.parametrize("right", [True, False])
def test_val_weighs_the_rescoring_and_turns_it_off_where_it_does_not_help(monkeypatch, right):
    import geoindex.verification
    from geoindex import revisit

    data = _Photos()
    rows = data.rows
    monkeypatch.setattr(geoindex.verification, "shared_dense_matcher", lambda: _Matcher(right))
    winners = np.zeros(2 * len(rows), dtype=np.int64)
    choice, take, scored = revisit.calibrate_rerank(data, rows, winners, None)
    assert take.tolist() == rows.tolist() and choice["n_val"] == len(rows)
    assert _tried(choice, 10, 0.0)["first_within_25m"] == 0.0  # the search puts the spot third for every photo
    if right:
        assert choice["weight"] in revisit.RERANK_WEIGHTS and choice["weight"] > 0
        assert _tried(choice, choice["k"], choice["weight"])["first_within_25m"] == 1.0
        assert choice["k"] == 10  # deeper re-scoring finds it as well and costs more matches: the fewest win
        assert (scored[0][1][:, 0] == rows + 100).all() and scored[0][1].shape[1] == revisit.STREET_K
    else:  # the matcher favours a look-alike kilometres away: the search's order stands
        assert choice["weight"] is None and scored is None and "did not help" in choice["note"]
    json.dumps(choice)  # saved with the street calibration as it is


def _tried(choice, k, weight):
    (found,) = [t for t in choice["tried"] if t["weight"] == weight and (not weight or t["k"] == k)]
    return found


def test_val_rescores_deep_enough_to_reach_a_spot_the_search_puts_past_the_cluster(monkeypatch):
    import geoindex.verification
    from geoindex import revisit

    data = _Photos(spot_column=30)  # past the first 10 and 25: only re-scoring 50 or more brings it up
    monkeypatch.setattr(geoindex.verification, "shared_dense_matcher", lambda: _Matcher(True))
    choice, _, scored = revisit.calibrate_rerank(data, data.rows, np.zeros(40, dtype=np.int64), None)
    assert choice["k"] == 50 and choice["weight"] > 0
    assert _tried(choice, 25, choice["weight"])["first_within_25m"] == 0.0
    assert (scored[0][1][:, 0] == data.rows + 100).all() and (scored[1][1][:, 0] == data.rows + 100).all()


def test_without_the_matcher_the_street_shortlist_keeps_the_search_order(monkeypatch):
    import geoindex.verification
    from geoindex import revisit

    monkeypatch.setattr(geoindex.verification, "shared_dense_matcher", lambda: None)
    monkeypatch.setattr(geoindex.verification, "_dense_missing", "OpenCV is not installed")
    data = _Photos()
    choice, _, scored = revisit.calibrate_rerank(data, data.rows, np.zeros(40, dtype=np.int64), None)
    assert scored is None and choice["weight"] is None and "OpenCV is not installed" in choice["note"]


@pytest.fixture(scope="module")
def rescored(tmp_path_factory):
    """build_gallery's with the look-alike (the revisit blurred, which the search puts first), the street
    neighbours re-scored at weight 1 and every answer at the best cluster's spot (spot threshold 0), no
    verification: the spot answered is the one the re-scored order puts first."""
    return build_gallery(tmp_path_factory.mktemp("rescore"), {"threshold": None, "spot_threshold": 0.0,
                                                               "radius_m": None, "city_radius_m": 4000.0,
                                                               "rerank": RERANK}, look_alike=True)


@needs_matcher
def test_query_answers_from_the_rescored_order_and_probabilities_alone_never_pay(rescored, monkeypatch):
    import geoindex.verification
    from geoindex.methods import Photos

    home, rows, queries = rescored
    result = run("query", queries / "revisit.jpg", "--index", "gal", "--index-dir", home, "--json")
    assert result.exit_code == 0, result.output
    gps = json.loads(result.output)["results"][0]["gps"]
    assert (gps["lat"], gps["lon"]) == (rows[2]["lat"], rows[2]["lon"]) and gps["level"] == "city"

    with gallery_knn(home, queries / "revisit.jpg") as (knn, photo, embeddings):
        located = Photos(embeddings, [photo])
        _, ids = knn.street_neighbours(located, 6)
        paths = knn.index.train_meta["path"].to_numpy()
        assert Path(paths[ids[0, 0]]).name == Path(rows[2]["path"]).name

        # the wiring, whatever the matcher: the neighbour with the most inliers comes first
        from geoindex import revisit
        searched = knn.street_neighbours(Photos(embeddings, [photo], locate=False), 6)[1][0]
        # the search puts the look-alike first: the answer above is the re-scoring's
        assert Path(paths[searched[0]]).name == "look-alike.jpg"
        monkeypatch.setattr(revisit, "dense_inliers",
                            lambda matcher, sources, ids, paths, depth:
                            np.where(ids[:, :depth] == searched[-1], 90, 0))
        assert knn.street_neighbours(Photos(embeddings, [photo]), 6)[1][0, 0] == searched[-1]

        expected = knn.predict(located).probs

        def refuse():
            raise AssertionError("dense matching ran for probabilities alone")
        monkeypatch.setattr(geoindex.verification, "shared_dense_matcher", refuse)
        fresh = Photos(embeddings, [photo])
        assert np.allclose(knn.predict_proba(fresh), expected)
        with pytest.raises(AssertionError, match="dense matching ran"):
            knn.predict(fresh)


@needs_matcher
def test_the_service_rescores_an_upload_as_query_rescores_the_file(rescored):
    home, rows, queries = rescored
    assert json.loads((home / "gal" / KNN_PARAMS).read_text())["street"]["rerank"]["weight"] == 1.0
    expected, gps = query_and_service_gps(home, queries / "revisit.jpg")
    assert (gps["lat"], gps["lon"]) == (expected["lat"], expected["lon"]) == (rows[2]["lat"], rows[2]["lon"])


def test_train_and_bench_logs_say_what_the_rescoring_chose():
    from geoindex.tuning import street_summary

    street = {"threshold": None, "note": "too few", "rerank": {"weight": 0.3, "k": 25, "tried": [
        {"k": 10, "weight": 0.0, "first_within_25m": 0.25}, {"k": 10, "weight": 0.3, "first_within_25m": 0.28},
        {"k": 25, "weight": 0.3, "first_within_25m": 0.31}]}}
    assert ("the first 25 street neighbours re-scored by dense matching (weight 0.3: the first within 25 m for "
            "25% -> 31% of val photos)") in street_summary(street)
    older = dict(street, rerank={"weight": 0.3, "k": 10, "tried": {"0": {"first_within_25m": 0.25},
                                                                   "0.3": {"first_within_25m": 0.3}}})
    assert "the first 10 street neighbours re-scored by dense matching (weight 0.3: the first within 25 m for " \
        "25% -> 30%" in street_summary(older)
    off = dict(street, rerank={"weight": None, "note": "re-scoring by dense matching did not help on val"})
    assert "street neighbours in the search's order (re-scoring by dense matching did not help on val)" \
        in street_summary(off)
    assert "dense" not in street_summary({"threshold": None, "note": "an index from before re-scoring"})


@needs_matcher
def test_answers_report_each_neighbours_own_similarity_not_its_score(rescored, monkeypatch):
    from geoindex import revisit
    from geoindex.methods import Photos

    home, rows, queries = rescored
    with gallery_knn(home, queries / "revisit.jpg") as (knn, photo, embeddings):
        sims, searched = knn.street_neighbours(Photos(embeddings, [photo], locate=False), 6)
        own = dict(zip(searched[0].tolist(), sims[0].tolist()))
        monkeypatch.setattr(revisit, "dense_inliers",
                            lambda matcher, sources, ids, paths, depth:
                            np.where(ids[:, :depth] == searched[0, -1], 90, 0))
        located = Photos(embeddings, [photo])
        scores, ids = knn.street_neighbours(located, 6)
        reported = knn.street_neighbours(located, 6, similarities=True)[0]
        assert ids[0, 0] == searched[0, -1] and scores[0, 0] == pytest.approx(own[searched[0, -1]] + 0.9)
        assert reported[0].tolist() == pytest.approx([own[i] for i in ids[0].tolist()])


@needs_matcher
def test_query_rescores_as_many_street_neighbours_as_val_chose(rescored, monkeypatch):
    from geoindex import revisit
    from geoindex.methods import Photos

    home, rows, queries = rescored
    with gallery_knn(home, queries / "revisit.jpg") as (knn, photo, embeddings):
        searched = knn.street_neighbours(Photos(embeddings, [photo], locate=False), 6)[1][0]
        asked = []

        def last_one_matches(matcher, sources, ids, paths, depth):
            asked.append(ids[:, :depth].shape[1])
            return np.where(ids[:, :depth] == searched[-1], 90, 0)

        monkeypatch.setattr(revisit, "dense_inliers", last_one_matches)
        street = knn.settings.street
        located = Photos(embeddings, [photo])  # one set: what it cached at one depth never answers for another
        for depth, first in ((3, searched[0]), (10, searched[-1])):  # the sixth is out of reach of the first 3
            monkeypatch.setattr(knn, "street_" if knn.fitted else "street",
                                {**street, "rerank": {**street["rerank"], "k": depth}})
            assert knn.street_neighbours(located, 6)[1][0, 0] == first
        assert asked == [3, min(10, knn.index.store.count("train"))]


@needs_matcher
def test_without_the_matcher_it_was_calibrated_with_cluster_answers_stay_city_level(rescored, monkeypatch):
    import geoindex.verification
    from geoindex.methods import Photos

    home, rows, queries = rescored
    with gallery_knn(home, queries / "revisit.jpg") as (knn, photo, embeddings):
        answer = knn.predict(Photos(embeddings, [photo]))
        assert tuple(answer.coords[0]) == (rows[2]["lat"], rows[2]["lon"])
        monkeypatch.setattr(geoindex.verification, "shared_dense_matcher", lambda: None)
        monkeypatch.setattr(geoindex.verification, "_dense_missing", "OpenCV is not installed")
        lost = knn.predict(Photos(embeddings, [photo]))
        # the spot threshold was set on re-scored neighbours: the answer falls back to the city-level mean
        assert tuple(lost.coords[0]) != (rows[2]["lat"], rows[2]["lon"])
        assert "cannot be re-scored as calibrated (OpenCV is not installed)" in lost.notes
        assert lost.extra["gps_level"][0] == "city"
