"""Places for metric learning (geoindex.places): grouping photos into places, P x K batches, pair masks and the
multi-similarity loss with its miner."""
import json
import math

import numpy as np
import pytest
import torch

from geoindex.places import group_places, multi_similarity_loss, pair_masks, place_batches
from geoindex.training import epoch_generator

# Metres to degrees of latitude
M = 1 / 111_195


def test_photos_within_25_m_form_a_place_and_a_lone_photo_none():
    lat = np.array([51.5, 51.5 + 10 * M, 51.5 + 20 * M, 51.6, 51.6 + 5 * M, 51.7, np.nan])
    lon = np.full(len(lat), -0.1)
    places = group_places(lat, lon)
    assert places[0] == places[1] == places[2] >= 0
    assert places[3] == places[4] >= 0 and places[3] != places[0]
    assert places[5] == -1 and places[6] == -1  # alone at its spot; no coordinates
    assert sorted(set(places[places >= 0])) == [0, 1]


def test_a_place_is_centred_on_the_busiest_spot_not_chained_along_a_street():
    # Photos every 20 m along a street: a chain of "within 25 m" would make one place of all of them
    lat = 51.5 + np.arange(10) * 20 * M
    places = group_places(lat, np.zeros(10))
    for p in set(places[places >= 0]):
        members = lat[places == p]
        assert (members.max() - members.min()) / M <= 2 * 25 + 1e-6


def test_place_ids_win_over_coordinates():
    lat = np.array([51.5, 51.5, 51.5, 51.5])
    places = group_places(lat, np.zeros(4), place_id=np.array([7, 7, 9, -1]))
    assert places[0] == places[1] and places[2] == -1 and places[3] == -1  # place 9 has one photo


def test_place_batches_hold_p_places_of_k_photos_and_repeat_per_epoch():
    places = np.repeat(np.arange(10), 6)  # 10 places of 6 photos
    places = np.concatenate([places, [-1, -1]])
    batches = list(place_batches(places, 4, 3, epoch_generator(0, 1)))
    again = list(place_batches(places, 4, 3, epoch_generator(0, 1)))
    other = list(place_batches(places, 4, 3, epoch_generator(0, 2)))
    assert [b.tolist() for b in batches] == [b.tolist() for b in again]
    assert [b.tolist() for b in batches] != [b.tolist() for b in other]
    seen = np.concatenate(batches)
    assert len(set(places[seen])) == 10 and -1 not in places[seen]  # every place once, lone photos never
    for batch in batches:
        counts = np.bincount(places[batch])
        assert set(counts[counts > 0]) == {3}
    assert [len(set(places[b])) for b in batches] == [4, 4, 2]


def test_pair_masks_use_place_ids_and_distance():
    rows = torch.arange(4)
    places = torch.tensor([0, 0, -1, -1])
    lat = torch.tensor([51.5, 51.5 + 60 * M, 51.5 + 10 * M, 51.5 + 1000 * M], dtype=torch.float64)
    lon = torch.zeros(4, dtype=torch.float64)
    same, apart = pair_masks(rows, places, lat, lon)
    assert same[0, 1] and same[1, 0]          # one place id, 60 m apart
    assert same[0, 2] and not apart[0, 2]     # 10 m apart
    assert not same[1, 2] and not apart[1, 2]  # 50 m: neither pulled nor pushed
    assert apart[0, 3] and apart[2, 3]        # 1 km
    assert not same.diagonal().any() and not apart.diagonal().any()


def test_multi_similarity_loss_matches_the_formula_and_mines():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    same = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    apart = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    loss = multi_similarity_loss(e, same, apart, alpha=2.0, beta=40.0, base=0.5, epsilon=0.1)
    s = e @ e.T
    # anchor 0: positive 1 (s=0.8) kept as 0.8-0.1 < max neg (0.0)? no: not kept; negative 2 (0.0) kept as
    # 0.0+0.1 > min pos 0.8? no: not kept -> anchor 0 has nothing mined
    # anchor 1: positive 0 (0.8) vs hardest negative 2 (0.6): 0.7 < 0.6? no; negative 2: 0.7 > 0.8? no
    assert float(loss) == 0.0
    # Make anchor 1's negative hard: both pairs are mined, the loss is the formula's
    e2 = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.7, 0.71]]), dim=1)
    loss = multi_similarity_loss(e2, same, apart, alpha=2.0, beta=40.0, base=0.5, epsilon=0.1)
    s = e2 @ e2.T
    expected = []
    for anchor, pos, neg in ((0, 1, 2), (1, 0, 2)):
        if s[anchor, pos] - 0.1 < s[anchor, neg] and s[anchor, neg] + 0.1 > s[anchor, pos]:
            expected.append(math.log1p(math.exp(-2 * (s[anchor, pos] - 0.5))) / 2
                            + math.log1p(math.exp(40 * (s[anchor, neg] - 0.5))) / 40)
    assert expected  # the example does mine something
    assert abs(float(loss) - sum(expected) / len(expected)) < 1e-5


def test_multi_similarity_loss_pulls_places_together():
    torch.manual_seed(0)
    e = torch.randn(8, 16, requires_grad=True)
    places = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    same = (places[:, None] == places[None, :]) & ~torch.eye(8, dtype=torch.bool)
    apart = places[:, None] != places[None, :]
    optimizer = torch.optim.SGD([e], lr=0.5)
    first = None
    for _ in range(50):
        loss = multi_similarity_loss(torch.nn.functional.normalize(e, dim=1), same, apart)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.nn.functional.normalize(e.detach(), dim=1)
    s = x @ x.T
    assert loss.item() < first / 2
    assert bool((s[same].min() > s[apart].max()))  # every place's photos nearer each other than to any other place


# ---------------------------------------------------------------------------- in `geoindex train`
def _revisited_csv(root, places_per_city=70):
    """Two cities of places 2 km apart, each photographed twice (2016, 2022): the later capture is a revisit query."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for c, (city, lat0, lon0) in enumerate((("London", 51.3, -0.3), ("Ottawa", 45.3, -75.8))):
        (root / city).mkdir(parents=True)
        for p in range(places_per_city):
            pattern = rng.integers(0, 255, (6, 6, 3)).astype(np.float32)
            lat, lon = lat0 + (p // 10) * 2000 * M, lon0 + (p % 10) * 0.03
            for shot, yyyymm in enumerate((201605, 202208)):
                noisy = np.clip(pattern * (0.8 + 0.4 * shot) + rng.normal(0, 20, pattern.shape), 0, 255)
                image = Image.fromarray(noisy.astype(np.uint8)).resize((48, 48), Image.NEAREST)
                path = root / city / f"{p:03d}_{shot}.jpg"
                image.save(path, quality=90)
                rows.append((f"{city}/{path.name}", city, lat + shot * 5 * M, lon, yyyymm))
    import pandas as pd
    pd.DataFrame(rows, columns=["path", "city", "lat", "lon", "yyyymm"]).to_csv(root / "index.csv", index=False)
    return root / "index.csv"


def test_train_learns_places_and_keeps_the_epoch_with_the_best_val_revisit_recall(tmp_path):
    import json

    from click.testing import CliRunner

    from geoindex import build_index
    from geoindex.cli import main

    csv = _revisited_csv(tmp_path / "data")
    home = tmp_path / "home"
    for name in ("places", "cities"):
        build_index(csv, name=name, index_dir=home, backbone="effnet", weights="none", image_size=64, batch_size=32,
                    num_workers=0, progress=False, log=lambda m: None)
    result = CliRunner().invoke(main, ["train", "--index", "places", "--index-dir", str(home), "--epochs", "2",
                                       "--places", "--place-weight", "0.3", "--workers", "0", "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "places of the train photos" in result.output and "revisit recall on val" in result.output
    folder = home / "places" / "heads" / "tail"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["objective"] == "city+places" and meta["places"] >= 100 and meta["val_revisit_queries"] >= 10
    assert meta["place_weight"] == 0.3 and meta["places_per_batch"] == 16
    assert "revisit recall" in meta["stopped_on"]
    history = pd_read(folder / "history.csv")
    recall = history[["val_r1_25m", "val_r5_25m", "val_r10_25m"]].mean(axis=1)
    assert meta["best_epoch"] == int(history["epoch"][recall.idxmax()])  # ties: the first such epoch
    assert meta["best_val_r1_25m"] == history.loc[recall.idxmax(), "val_r1_25m"]
    assert (folder / "curves.png").stat().st_size > 0
    manifest = json.loads((home / "places" / "manifest.json").read_text())
    assert manifest["adapted"]["objective"] == "city+places"

    result = CliRunner().invoke(main, ["train", "--index", "cities", "--index-dir", str(home), "--epochs", "1",
                                       "--workers", "0", "--device", "cpu"], catch_exceptions=False)  # the default
    assert result.exit_code == 0, result.output
    meta = json.loads((home / "cities" / "heads" / "tail" / "meta.json").read_text())
    assert meta["objective"] == "city" and "places" not in meta and meta["stopped_on"] == "validation loss"
    assert "val_r1_25m" not in pd_read(home / "cities" / "heads" / "tail" / "history.csv")


def test_places_asked_for_where_they_cannot_be_learnt_is_one_line(tree, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from geoindex import adapt, build_index
    from geoindex.cli import main
    from geoindex.errors import GeoindexError
    from geoindex.geo_index import load_index

    options = dict(index_dir=tmp_path, backbone="effnet", weights="none", image_size=64, batch_size=8, num_workers=0,
                   progress=False, log=lambda m: None)
    build_index(tree, name="few", per_city=3, **options)  # no validation split: no tail training at all
    result = CliRunner().invoke(main, ["train", "--index", "few", "--index-dir", str(tmp_path), "--places",
                                       "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 1 and "--places trains the backbone's tail" in result.output
    assert "no validation split" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "few" / "heads").exists()  # refused before any training
    # A place weight without places weighs nothing: refused, not ignored.
    result = CliRunner().invoke(main, ["train", "--index", "few", "--index-dir", str(tmp_path), "--place-weight",
                                       "0.3", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 1 and "add --places, or drop --place-weight" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "few" / "heads").exists()

    build_index(tree, name="ix", **options)
    monkeypatch.setattr(adapt, "MIN_PLACES", 1000)
    with pytest.raises(GeoindexError, match="training for places needs 1000 or more"):
        adapt.adapt_index(load_index(tmp_path / "ix", device="cpu"), places=True, epochs=1, device="cpu",
                          num_workers=0, progress=False, log=lambda m: None)
    # Not asked for (the default): the cities alone, said in the tail's meta
    result = adapt.adapt_index(load_index(tmp_path / "ix", device="cpu"), epochs=1, device="cpu", num_workers=0,
                               progress=False, log=lambda m: None)
    assert json.loads((result.folder / "meta.json").read_text())["objective"] == "city"


def pd_read(path):
    import pandas as pd
    return pd.read_csv(path, float_precision="round_trip")  # the last digit as written (pandas 3.0's parser may differ)


def test_place_batches_stay_bounded_and_place_ids_are_per_city():
    from geoindex.adapt import DEFAULTS, TailTraining, TrainPlaces
    import pandas as pd

    # 8 places of 2 photos among 2,000 photos of no place: no batch holds more than P x K + batch_size photos
    n = 2016
    meta = {"train": pd.DataFrame({"lat": np.r_[51.5 + np.repeat(np.arange(8), 2) * 0.01, np.full(n - 16, np.nan)],
                                   "lon": np.zeros(n), "yyyymm": np.full(n, 201601), "place_id": -1,
                                   "label": np.zeros(n, dtype=int)}),
            "val": pd.DataFrame({"lat": [51.0], "lon": [0.0], "yyyymm": [201601], "place_id": [-1], "label": [0]})}
    rows = {"train": np.arange(n), "val": np.arange(1)}
    places = TrainPlaces(meta, rows, "cpu")
    assert places.count == 8
    training = TailTraining.__new__(TailTraining)  # the batches need only the places, settings and seed
    training.places, training.settings, training.seed = places, dict(DEFAULTS), 0
    sizes = [len(y) for _, y in training.batches(1, np.zeros((n, 1), np.float16), np.zeros(n, np.int64))]
    assert sum(sizes) == n and max(sizes) <= 16 + DEFAULTS["batch_size"]
    # GSV-Cities numbers places within each city: London's place 5 and Paris's place 5 are two places
    meta["train"] = pd.DataFrame({"lat": [51.5, 51.5, 48.8, 48.8], "lon": [0.0, 0.0, 2.3, 2.3], "yyyymm": 201601,
                                  "place_id": [5, 5, 5, 5], "label": [0, 0, 1, 1]})
    places = TrainPlaces(meta, {"train": np.arange(4), "val": np.arange(1)}, "cpu")
    assert places.places[0] == places.places[1] != places.places[2] == places.places[3]
