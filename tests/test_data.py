import numpy as np
import pandas as pd
import pytest

from geoindex.data import SPLITS, assign_splits, parse_gsv_filename, prepare_records, scan_dataset
from geoindex.errors import DatasetError


def test_filename_parser_keeps_underscores_in_panoid():
    meta = parse_gsv_filename("PRS_0000042_2019_07_123_48.85_2.35_ab_c-d_e", "PRS")
    assert meta == {"place_id": 42, "year": 2019, "month": 7, "northdeg": 123, "lat": 48.85, "lon": 2.35,
                    "panoid": "ab_c-d_e"}
    assert parse_gsv_filename("PRS_notanumber_2019_07_123_1_2_x", "PRS") is None
    assert parse_gsv_filename("London_0000001_2019_07_123_1_2_x", "PRS") is None


def test_scan_reads_every_image_with_coordinates(gsv_tree):
    ds = scan_dataset(gsv_tree)
    assert ds.layout == "gsv-cities"
    assert len(ds.records) == 4 * 8 * 2
    assert ds.records["lat"].notna().all() and (ds.records["place_id"] >= 0).all()


def test_split_is_place_disjoint_and_deterministic(gsv_tree):
    ds = scan_dataset(gsv_tree)
    a, _ = prepare_records(ds, seed=0)
    b, _ = prepare_records(ds, seed=0)
    pd.testing.assert_frame_equal(a, b)
    places = a.groupby(["city", "place_id"])["split"].nunique()
    assert (places == 1).all(), "a place appears in two splits"
    for city, group in a.groupby("city"):
        assert set(group["split"]) == set(SPLITS), f"{city} lacks a split"
    c, _ = prepare_records(ds, seed=1)
    assert not a.set_index("path")["split"].equals(c.set_index("path").loc[a["path"], "split"]), "seed has no effect"


def test_split_fractions_follow_places():
    records = pd.DataFrame({"path": [f"p{i}" for i in range(400)], "city": ["A"] * 400,
                            "place_id": np.repeat(np.arange(100), 4)})
    split = assign_splits(records, seed=3)
    per_place = records.assign(split=split).groupby("place_id")["split"].first().value_counts()
    assert per_place.to_dict() == {"train": 80, "val": 10, "test": 10}
    with pytest.raises(DatasetError):
        assign_splits(records, fractions=(0.5, 0.2, 0.2))


def test_plain_folder_splits_by_image(tmp_path):
    from PIL import Image
    for city in ("Rome", "Lisbon"):
        (tmp_path / city).mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / city / f"{i}.jpg")
    (tmp_path / "Rome" / "notes.txt").write_text("ignored")
    ds = scan_dataset(tmp_path)
    assert ds.layout == "folder" and len(ds.records) == 20
    records, _ = prepare_records(ds)
    assert records.groupby("city")["split"].value_counts().loc[("Rome", "test")] == 1


def test_per_city_keeps_whole_places(gsv_tree):
    records, _ = prepare_records(scan_dataset(gsv_tree), per_city=5)
    counts = records["city"].value_counts()
    assert (counts == 6).all()  # 3 places x 2 images: whole places, just past 5
    assert (records.groupby(["city", "place_id"]).size() == 2).all()


def test_missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        scan_dataset(tmp_path)
