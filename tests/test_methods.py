"""The method objects that query, bench and the service share: ties, tuning on val, GPS guesses."""
import numpy as np
import pandas as pd
import pytest

from geoindex.methods import Answer, KNNMethod, Method, Photos, break_ties, city_centres


class FixedNeighbours:
    """An index whose search returns given neighbours: enough to exercise the vote and the tuning."""

    def __init__(self, sims, ids, train_labels, classes, lats=None, lons=None):
        self.sims, self.ids, self.classes = np.asarray(sims, float), np.asarray(ids), classes
        n = len(train_labels)
        self.train_meta = pd.DataFrame({"label": train_labels, "lat": lats if lats is not None else np.zeros(n),
                                        "lon": lons if lons is not None else np.zeros(n)})
        self.ntotal = n

    def search(self, embeddings, k):
        return self.sims[:, :k], self.ids[:, :k]


def test_majority_ties_go_to_the_nearest_neighbours_city():
    # Neighbours: city 2 (nearest), city 0, city 2, city 0 -> a 2-2 tie; the old rule gave it to class 0.
    index = FixedNeighbours([[0.9, 0.8, 0.7, 0.6]], [[0, 1, 2, 3]], [2, 0, 2, 0], ["a", "b", "c"])
    answer = KNNMethod(index, k=4, vote="majority").predict(Photos(np.zeros((1, 2)), [None]))
    assert answer.probs.argmax(1).tolist() == [2]
    assert answer.probs[0, 2] == pytest.approx(0.5, abs=1e-6) and answer.probs.sum() == pytest.approx(1)


def test_geoindex_knn_predict_passes_its_settings_to_the_method():
    # knn_predict names temperature and gps (KNNMethod is keyword-only past vote): each must reach the method.
    from geoindex.geo_index import GeoIndex
    index = FixedNeighbours([[0.9, 0.8, 0.7, 0.6]], [[0, 1, 2, 3]], [2, 0, 1, 0], ["a", "b", "c"],
                            lats=[10.0, 0.0, 0.0, 0.0], lons=[20.0, 0.0, 0.0, 0.0])
    photos = Photos(np.zeros((1, 2)), [None])
    for temperature in (0.05, 1.0):
        got = GeoIndex.knn_predict(index, photos.embeddings, k=4, vote_method="softmax", temperature=temperature,
                                   gps_method="mean")
        expected = KNNMethod(index, k=4, vote="softmax", temperature=temperature, gps="mean").predict(photos)
        assert np.allclose(got["probs"], expected.probs) and np.allclose(got["coords"], expected.coords)
    sharp = GeoIndex.knn_predict(index, photos.embeddings, k=4, temperature=0.05)["probs"]
    flat = GeoIndex.knn_predict(index, photos.embeddings, k=4, temperature=1.0)["probs"]
    assert sharp.max() > flat.max(), "the temperature given did not reach the vote"


def test_break_ties_leaves_clear_winners_alone():
    probs = np.array([[0.2, 0.8], [0.5, 0.5]])
    out = break_ties(probs, np.array([0, 1]))
    assert out.argmax(1).tolist() == [1, 1]
    assert out[0].tolist() == [0.2, 0.8]


def test_knn_fit_tunes_on_the_validation_photos_and_records_it():
    # On val, the single nearest neighbour is right and the crowd behind it is wrong: k=1 must win.
    rng = np.random.default_rng(0)
    n_val, k = 40, 50
    train_labels = np.array([0, 1] * 100)
    ids = np.zeros((n_val, k), dtype=int)
    truth = rng.integers(0, 2, n_val)
    for q in range(n_val):
        right = np.flatnonzero(train_labels == truth[q])
        wrong = np.flatnonzero(train_labels != truth[q])
        ids[q] = np.concatenate([[right[q]], wrong[: k - 1]])
    sims = np.tile(np.linspace(0.9, 0.5, k), (n_val, 1))
    index = FixedNeighbours(sims, ids, train_labels, ["a", "b"])
    knn = KNNMethod(index)
    val = Photos(np.zeros((n_val, 2)), [None] * n_val, truth, name="val")
    assert knn.fit(val) is knn  # an estimator: fit returns self
    params = knn.best_params_
    assert knn.k == 20 and knn.k_ == 1, "fit keeps the given hyperparameter and stores its choice in k_"
    assert params["k"] == 1 and params["tuned_on"] == "val" and params["val_accuracy"] == 1.0
    assert params["unlike_threshold"] == pytest.approx(0.9)


def test_city_centres_are_spherical_means_of_train_photos():
    meta = pd.DataFrame({"label": [0, 0, 1], "lat": [10.0, 20.0, -5.0], "lon": [179.0, -179.0, 3.0]})
    centres = city_centres(meta, ["x", "y", "z"])
    assert centres[0, 0] == pytest.approx(15.0, abs=0.1) and abs(abs(centres[0, 1]) - 180) < 0.5  # across the date line
    assert centres[1] == pytest.approx([-5.0, 3.0]) and np.isnan(centres[2]).all()


class ExactIndex:
    """A tiny index over given train vectors: exact cosine search, and a store that hands them back."""

    def __init__(self, train, labels, classes):
        from geoindex.whitening import flat_index
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        self.faiss, self.classes, self.ntotal = flat_index(train), classes, len(train)
        self.train_meta = pd.DataFrame({"label": labels, "lat": np.zeros(len(train)), "lon": np.zeros(len(train))})
        self.store = type("Store", (), {"embeddings": lambda _self, split: train})()

    def search(self, embeddings, k):
        x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        return self.faiss.search(np.ascontiguousarray(x, dtype=np.float32), k)


def test_knn_fit_whitens_when_a_shared_direction_swamps_the_city_signal():
    # The city lives in a weak direction; a strong nuisance direction (light, sky) dominates cosine similarity.
    rng = np.random.default_rng(0)

    def photos(n):
        labels = rng.integers(0, 2, n)
        x = rng.normal(0, 0.05, (n, 16))
        x[:, 0] += np.where(labels == 1, 0.3, -0.3)           # the city signal
        x[:, 1:4] += rng.normal(0, 3.0, (n, 3))               # shared nuisance, large variance
        x[:, 5] += 10.0                                        # every photo's common component
        return x.astype(np.float32), labels

    train, y_train = photos(400)
    val, y_val = photos(200)
    index = ExactIndex(train, y_train, ["a", "b"])
    raw = KNNMethod(index, k=10, vote="majority").predict(Photos(val, [None] * 200))
    raw_accuracy = (raw.probs.argmax(1) == y_val).mean()
    knn = KNNMethod(index)
    params = knn.fit(Photos(val, [None] * 200, y_val, name="val")).best_params_
    assert params["whiten"] is not None and params["tuned_on"] == "val"
    test, y_test = photos(200)
    tuned_accuracy = (knn.predict(Photos(test, [None] * 200)).probs.argmax(1) == y_test).mean()
    assert raw_accuracy < 0.7 and tuned_accuracy > raw_accuracy + 0.2, (raw_accuracy, tuned_accuracy)


def test_whitening_round_trips_as_plain_arrays(tmp_path):
    from geoindex.whitening import Whitening
    x = np.random.default_rng(1).normal(size=(300, 12)).astype(np.float32)
    w = Whitening.fit(x, max_dims=8).using(6, 1.0)
    w.save(tmp_path / "w.npz")
    back = Whitening.load(tmp_path / "w.npz")
    np.testing.assert_allclose(back(x), w(x), atol=1e-6)
    assert back(x).shape == (300, 6) and np.allclose(np.linalg.norm(back(x), axis=1), 1, atol=1e-5)


def test_an_unfitted_hybrid_raises_not_fitted_and_fit_returns_self():
    from geoindex.errors import NotFittedError
    from geoindex.methods import HybridMethod

    rng = np.random.default_rng(0)
    n, labels = 30, rng.integers(0, 2, 30)

    class Fixed(Method):
        def __init__(self, name, probs):
            self.name, self.probs = name, probs

        def predict(self, photos):
            return Answer(self.name, self.probs[:len(photos)], ["a", "b"], np.zeros((len(photos), 2)))

    right = np.eye(2)[labels] * 0.8 + 0.1
    index = type("Index", (), {"classes": ["a", "b"], "city_centres": np.zeros((2, 2))})()
    hybrid = HybridMethod(index, [Fixed("knn", right), Fixed("other", np.full((n, 2), 0.5))])
    photos = Photos(np.zeros((n, 2)), [None] * n, labels, name="val")
    with pytest.raises(NotFittedError, match="fit"):
        hybrid.predict(photos)
    with pytest.raises(RuntimeError):  # what it raised before, still caught by the same handlers
        hybrid.predict_proba(photos)
    assert hybrid.fit(photos) is hybrid
    assert hybrid.weights_[0] > 0 and hybrid.best_params_["tuned_on"] == "val" and hybrid.val_accuracy_ == 1.0
    assert hybrid.predict_proba(photos).shape == (n, 2)


def test_methods_are_found_through_one_registry_and_share_one_predict_proba():
    import ast
    from pathlib import Path

    import geoindex.methods as methods
    from geoindex.bench import METHODS
    from geoindex.methods import registered_methods

    found = registered_methods()
    assert tuple(found) == METHODS == ("knn", "classifier", "zeroshot", "hybrid")
    assert all(issubclass(cls, Method) and cls.family == family for family, cls in found.items())
    folder = Path(methods.__file__).parent
    defining = [p.name for p in folder.glob("*.py")
                for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.FunctionDef) and node.name == "predict_proba"]
    assert defining == ["base.py"], defining
