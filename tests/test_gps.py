"""GPS answers that land on the street: figures down to 25 m, the clustered answer, its fallback, and what
`query` prints."""
import csv
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import build_cnn_index

from geoindex.cli import main
from geoindex.methods.knn import KNNSettings
from geoindex.metrics import evaluate
from geoindex.revisit import city_answers, gps_answers, street_answers
from geoindex.voting import estimate_locations, haversine_km, street_clusters

M_PER_DEG_LAT = 111_195.0
SPOT = (51.5074, -0.1278)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def metres(a, b):
    return float(haversine_km(a[0], a[1], b[0], b[1]) * 1000)


def test_evaluate_reports_within_25m_and_100m():
    true = np.array([SPOT] * 4)
    pred = true + np.array([[10 / M_PER_DEG_LAT, 0], [60 / M_PER_DEG_LAT, 0], [5000 / M_PER_DEG_LAT, 0], [np.nan, np.nan]])
    m = evaluate(np.zeros(4, int), np.tile([1.0, 0.0], (4, 1)), ["a", "b"], pred, true)
    assert m["n_located"] == 3
    assert m["within_25m"] == pytest.approx(1 / 3) and m["within_100m"] == pytest.approx(2 / 3)
    assert m["within_1km"] == pytest.approx(2 / 3) and m["within_25km"] == pytest.approx(1.0)


def neighbours(rng, at_spot: int, scattered: int):
    """A London query's neighbours: `at_spot` photos within 15 m of SPOT, the rest scattered over 10 km, each of
    the scattered ones individually a little more similar than any spot photo."""
    spot = np.array(SPOT) + rng.uniform(-10, 10, (at_spot, 2)) / M_PER_DEG_LAT
    spread = np.array(SPOT) + rng.uniform(-5000, 5000, (scattered, 2)) / M_PER_DEG_LAT + [0.02, 0.0]
    coords = np.concatenate([spread, spot])
    sims = np.concatenate([np.full(scattered, 0.79), np.full(at_spot, 0.78)])
    order = np.argsort(-sims, kind="stable")
    return coords[order], sims[order]


def test_the_clustered_answer_lands_on_the_spot_not_the_mean_across_the_city():
    coords, sims = neighbours(np.random.default_rng(0), at_spot=4, scattered=6)
    lats, lons, weights = coords[None, :, 0], coords[None, :, 1], sims[None, :]
    members, support, centre = street_clusters(lats, lons, weights)
    assert metres(centre[0], SPOT) <= 25
    assert members[0].sum() == 4 and support[0] == pytest.approx(4 * 0.78 / (4 * 0.78 + 6 * 0.79))
    city_mean = estimate_locations(np.zeros((1, 10), int), sims[None, :], lats, lons, np.array([0]), "weighted", 1.0)
    assert metres(city_mean[0], SPOT) > 1000, "the constructed city must pull a mean far from the spot"


def knn_like(k=10):
    return SimpleNamespace(settings=KNNSettings(k, "weighted", 1.0, "mean"), classes=["London", "Paris"])


def test_strong_support_answers_street_level_and_weak_support_falls_back_to_the_city_estimate():
    rng = np.random.default_rng(1)
    strong_coords, strong_sims = neighbours(rng, at_spot=5, scattered=5)
    weak_coords, weak_sims = neighbours(rng, at_spot=1, scattered=9)
    coords = np.stack([strong_coords, weak_coords])
    sims = np.stack([strong_sims, weak_sims])
    ids = np.arange(20).reshape(2, 10)
    lats, lons, labels = coords[..., 0].ravel(), coords[..., 1].ravel(), np.zeros(20, int)
    street = street_answers(sims, ids, lats, lons, threshold=0.3)
    city = city_answers(knn_like(), sims, ids, lats, lons, labels)
    assert street["street"].tolist() == [True, False]
    assert metres(street["centre"][0], SPOT) <= 25 and street["members"][0].sum() == 5
    assert street["support"][1] < 0.3
    assert metres(city[0], SPOT) > 100 and metres(city[1], SPOT) > 100, "a mean over the city is off the street"
    # Uncalibrated (no threshold): nothing is street level.
    assert not street_answers(sims, ids, lats, lons, threshold=None)["street"].any()
    # query's answer: the spot at street level; at city level the mean, or the best cluster where its support
    # reaches the second threshold.
    mean = gps_answers(city, street)
    assert metres(mean[0], SPOT) <= 25 and np.allclose(mean[1], city[1])
    clustered = gps_answers(city, street, spot_threshold=street["support"][1])
    assert np.allclose(clustered[0], mean[0]) and np.allclose(clustered[1], street["centre"][1])
    assert np.allclose(gps_answers(city, street, spot_threshold=street["support"][1] + 1e-6)[1], city[1])
    # A best cluster in another city than the vote's is never the answer: the city-level mean is.
    other_city = street_answers(sims, ids, lats, lons, threshold=0.3, labels=labels, winners=np.array([1, 1]))
    assert not other_city["in_city"].any() and not other_city["street"].any()
    assert np.allclose(gps_answers(city, other_city, spot_threshold=0.0), city)


def test_the_spot_threshold_is_where_moving_answers_to_the_cluster_gains_most_over_the_scales():
    from geoindex.revisit import choose_spot_threshold
    # Supports 0.9 .. 0.1; the clusters of the top three are right to 25 m where the mean is 10 km off; the next
    # two clusters are 40 km off where the mean is 10 km off (a loss at 25 km); the rest are no better nor worse.
    support = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, -np.inf])
    spot_m = np.array([10, 10, 10, 40e3, 40e3, 10e3, 10e3, 10e3, 10e3, np.nan])
    city_m = np.full(10, 10e3)
    assert choose_spot_threshold(support, spot_m, city_m) == (0.7, 3)
    # Where no cluster beats the mean anywhere, the mean stays.
    assert choose_spot_threshold(support, np.full(10, 40e3), city_m) == (None, 0)
    # `support >= t` moves tied answers together: a cut inside a run of ties is never chosen.
    tied = np.array([1.0, 1.0, 0.5])
    assert choose_spot_threshold(tied, np.array([10, 40e3, 40e3]), np.full(3, 10e3)) == (1.0, 2)
    assert choose_spot_threshold(tied, np.array([10, 40e3, 40e3]), np.full(3, 500.0)) == (None, 0)


def test_the_calibration_line_says_where_city_level_answers_land():
    from geoindex.tuning import street_summary
    assert street_summary(None) == "GPS answers stay city level at a mean over the voted city's neighbours: not calibrated"
    spot_only = street_summary({"threshold": None, "spot_threshold": 0.25, "city_radius_m": 20_900.0, "note": "why"})
    assert spot_only.startswith("GPS answers stay city level at the best cluster in the voted city where it holds "
                                "0.250 of the weight") and "(radius 20.9 km): why" in spot_only


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    from geoindex.synthetic import make_synthetic_gsv
    root = make_synthetic_gsv(tmp_path_factory.mktemp("gps") / "GSV", cities=("Barcelona", "London", "Osaka"),
                              places_per_city=6, images_per_place=3, image_size=(40, 32))
    index_dir = tmp_path_factory.mktemp("gps-idx")
    build_cnn_index(root, index_dir, "gps")
    return index_dir


def write_tuning(index_dir, street):
    from geoindex.tuning import KNN_PARAMS
    path = index_dir / "gps" / KNN_PARAMS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"k": 5, "vote": "softmax", "temperature": 0.01, "tuned_on": "val", "street": street}))


def test_query_json_and_csv_carry_the_gps_level_radius_and_the_cluster(tiny_index):
    from geoindex.geo_index import load_index
    index = load_index("gps", tiny_index)
    train = index.store.metadata("train")
    index.close()
    photo, spot = train["path"].iloc[0], (train["lat"].iloc[0], train["lon"].iloc[0])

    write_tuning(tiny_index, {"threshold": 0.0, "radius_m": 12.5, "city_radius_m": 4000.0})
    answer = json.loads(run("query", photo, "--index", "gps", "--index-dir", tiny_index, "--json").output)["results"][0]
    gps = answer["gps"]
    assert gps["level"] == "street" and gps["radius_m"] == 12.5 and 0 < gps["support"] <= 1
    assert metres((gps["lat"], gps["lon"]), spot) < 1, "an indexed photo's own spot is the best-supported cluster"
    assert gps["cluster"] and any(member["row"] == 0 for member in gps["cluster"])
    for member in gps["cluster"]:
        assert (member["lat"], member["lon"]) == (train["lat"].iloc[member["row"]], train["lon"].iloc[member["row"]])
        assert metres((member["lat"], member["lon"]), (gps["lat"], gps["lon"])) <= 25

    write_tuning(tiny_index, {"threshold": 1.01, "radius_m": 12.5, "city_radius_m": 4000.0})
    answer = json.loads(run("query", photo, "--index", "gps", "--index-dir", tiny_index, "--json").output)["results"][0]
    assert answer["gps"]["level"] == "city" and answer["gps"]["radius_m"] == 4000.0 and answer["gps"]["cluster"] == []
    rows = list(csv.DictReader(io.StringIO(run("query", photo, "--index", "gps", "--index-dir", tiny_index,
                                                "--csv").output)))
    assert rows[0]["gps_level"] == "city" and rows[0]["gps_radius_m"] == "4000"
    text = run("query", photo, "--index", "gps", "--index-dir", tiny_index).output
    assert "(city level, 80% of val answers within 4,000 m)" in text
    mean = (answer["gps"]["lat"], answer["gps"]["lon"])

    # Where the cluster's support reaches val's spot threshold, the city-level answer is a spot a photo was taken
    # at, still city level with the city radius, and no cluster is shown as the street.
    write_tuning(tiny_index, {"threshold": 1.01, "radius_m": 12.5, "city_radius_m": 4000.0, "spot_threshold": 0.0})
    answer = json.loads(run("query", photo, "--index", "gps", "--index-dir", tiny_index, "--json").output)["results"][0]
    gps = answer["gps"]
    assert gps["level"] == "city" and gps["radius_m"] == 4000.0 and gps["cluster"] == []
    assert metres((gps["lat"], gps["lon"]), spot) < 1 and metres(mean, spot) > 1
    # The same where val found no street-level threshold at all: the spot threshold alone still applies.
    write_tuning(tiny_index, {"threshold": None, "radius_m": None, "city_radius_m": 4000.0, "spot_threshold": 0.0})
    result = run("query", photo, "--index", "gps", "--index-dir", tiny_index, "--json")
    gps = json.loads(result.output)["results"][0]["gps"]
    assert gps["level"] == "city" and gps["radius_m"] == 4000.0 and metres((gps["lat"], gps["lon"]), spot) < 1
    rows = list(csv.DictReader(io.StringIO(run("query", photo, "--index", "gps", "--index-dir", tiny_index,
                                                "--csv").output)))
    assert rows[0]["gps_level"] == "city" and metres((float(rows[0]["lat"]), float(rows[0]["lon"])), spot) < 1


def test_a_whitened_street_space_is_saved_loaded_and_a_damaged_one_falls_back_to_city_level(tiny_index, tmp_path):
    import shutil

    from geoindex.geo_index import load_index
    from geoindex.whitening import Whitening
    from geoindex.tuning import STREET_WHITENING
    shutil.copytree(tiny_index, tmp_path / "idx")
    index_dir = tmp_path / "idx"
    index = load_index("gps", index_dir)
    train = index.store.metadata("train")
    space = Whitening.fit(index.store.embeddings("train"), max_dims=16).using(8, 1.0)
    index.close()
    space.save(index_dir / "gps" / STREET_WHITENING)
    (index_dir / "gps" / "heads" / "knn" / "params.json").write_text(json.dumps(
        {"k": 5, "vote": "softmax", "temperature": 0.01, "tuned_on": "val",
         "street": {"space": {"dims": 8, "power": 1.0}, "threshold": 0.0, "radius_m": 9.0, "city_radius_m": 5000.0}}))
    index = load_index("gps", index_dir)
    knn = index.knn_method()
    assert knn.street_whitening is not None and knn.street_whitening.dims == 8
    index.close()
    photo, spot = train["path"].iloc[3], (train["lat"].iloc[3], train["lon"].iloc[3])
    gps = json.loads(run("query", photo, "--index", "gps", "--index-dir", index_dir, "--json").output)["results"][0]["gps"]
    assert gps["level"] == "street" and gps["radius_m"] == 9.0 and metres((gps["lat"], gps["lon"]), spot) < 1

    (index_dir / "gps" / STREET_WHITENING).write_bytes(b"not an npz file")
    result = run("query", photo, "--index", "gps", "--index-dir", index_dir, "--json")
    assert result.exit_code == 0 and "Traceback" not in result.output
    gps = json.loads(result.output)["results"][0]["gps"]
    assert gps["level"] == "city" and gps["cluster"] == []


def test_train_tunes_and_saves_the_street_calibration_on_val(tiny_index, tmp_path):
    import shutil

    from geoindex.geo_index import load_index
    from geoindex.tuning import STREET_WHITENING, tune_knn
    shutil.copytree(tiny_index, tmp_path / "idx")
    index = load_index("gps", tmp_path / "idx")
    lines = []
    tune_knn(index, log=lines.append)
    saved = json.loads((tmp_path / "idx" / "gps" / "heads" / "knn" / "params.json").read_text())["street"]
    assert saved["calibrated_on"] == "val" and saved["n_val"] == index.store.count("val")
    assert (saved["space"] is None) == (not (tmp_path / "idx" / "gps" / STREET_WHITENING).exists())
    assert any("GPS answers" in line for line in lines)
    index.close()
    reloaded = load_index("gps", tmp_path / "idx").knn_method()
    assert reloaded.street == saved
