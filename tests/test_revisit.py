"""The street-level revisit protocol: who is a query, what a query may match, where capture dates come from, and
the block `geoindex bench` writes."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import build_cnn_index

from geoindex.cli import main
from geoindex.data import scan_dataset
from geoindex.data.gsv import parse_gsv_filename
from geoindex.data.records import parse_capture_date
from geoindex.revisit import masked_top_k, revisit_queries

M_PER_DEG_LAT = 111_195.0  # metres per degree of latitude on the mean Earth radius


def north(lat, lon, metres):
    return lat + metres / M_PER_DEG_LAT, lon


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_the_newest_capture_with_another_date_within_25m_is_the_query():
    spot, far = (51.5, -0.1), (51.6, -0.2)
    rows = [  # (name, position, yyyymm)
        ("old", spot, 201405),
        ("new", north(*spot, 10), 202208),        # newest within 25 m of the old one: a query
        ("new-twin", north(*spot, 5), 202208),    # same newest date, 5 m away: a query too (ties are all queries)
        ("older-far", north(*spot, 60), 201001),  # 60 m from the others: alone within 25 m, so no query
        ("same-date-a", far, 202001),             # two photos of one drive: no other date, no query
        ("same-date-b", north(*far, 3), 202001),
        ("undated", north(*far, 1), -1),          # no date: takes no part
        ("middle", north(*spot, 20), 201801),     # between the dates and within 25 m of a newer one: not a query
    ]
    lat = np.array([r[1][0] for r in rows])
    lon = np.array([r[1][1] for r in rows])
    dates = np.array([r[2] for r in rows])
    queries = {r[0] for r, q in zip(rows, revisit_queries(lat, lon, dates)) if q}
    assert queries == {"new", "new-twin"}


def test_a_query_never_matches_itself_or_a_photo_of_its_own_capture_date():
    # Photo 1 is a same-date twin of query 0 and its closest match; photo 2 is the older capture of the spot.
    vectors = np.array([[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.9, 0.0, 0.44], [0.0, 1.0, 0.0], [0.5, 0.0, 0.87]],
                       dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dates = np.array([202208, 202208, 201405, 201405, 201901])
    sims, ids = masked_top_k(vectors[[0]], vectors, np.array([0]), dates[[0]], dates, k=5)
    assert ids[0, 0] == 2, "the older capture must come first once the query and its same-date twin are left out"
    found = ids[0][ids[0] >= 0]
    assert 0 not in found and 1 not in found
    assert len(found) == 3 and np.isneginf(sims[0, 3:]).all() and (ids[0, 3:] == -1).all()
    # Blocks of queries give the same answer as one query at a time.
    all_sims, all_ids = masked_top_k(vectors, vectors, np.arange(5), dates, dates, k=3, block=2)
    for q in range(5):
        one_sims, one_ids = masked_top_k(vectors[[q]], vectors, np.array([q]), dates[[q]], dates, k=3)
        assert (all_ids[q] == one_ids[0]).all()
        assert not (dates[all_ids[q][all_ids[q] >= 0]] == dates[q]).any()


@pytest.mark.parametrize("text, expected", [
    ("202108", (2021, 8)), ("2021-08", (2021, 8)), ("2021/8", (2021, 8)), ("2021-08-15", (2021, 8)),
    ("20210815", (2021, 8)), ("2021-08-15T10:20:00", (2021, 8)), ("2019:07:04 12:00:00", (2019, 7)),
    ("summer 2021", None), ("2021", None), ("", None), ("21-08", None)])
def test_capture_date_formats(text, expected):
    assert parse_capture_date(text) == expected


def test_gsv_file_names_give_yyyymm(tmp_path):
    assert parse_gsv_filename("London_0000042_2017_03_090_51.500000_-0.100000_ab_cd", "London")["month"] == 3
    images = tmp_path / "GSV" / "Images" / "London"
    images.mkdir(parents=True)
    for place, year, month in ((1, 2017, 3), (2, 2009, 11)):
        Image.new("RGB", (8, 8)).save(images / f"London_{place:07d}_{year}_{month:02d}_090_51.5_-0.1_pano{place}.jpg")
    records = scan_dataset(tmp_path / "GSV").records.sort_values("place_id")
    assert records["yyyymm"].tolist() == [201703, 200911]


def _photos(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"p{i}.jpg")
        names.append(f"p{i}.jpg")
    return names


@pytest.mark.parametrize("column", ["yyyymm", "date", "Date"])
def test_csv_date_columns_give_yyyymm_and_bad_dates_are_refused_with_their_reason(tmp_path, column):
    names = _photos(tmp_path, 5)
    values = ["202108", "2019-03-02", "", "March", "202113"]
    pd.DataFrame({"path": names, "city": "London", "lat": 51.5, "lon": -0.1, column: values}).to_csv(
        tmp_path / "photos.csv", index=False)
    dataset = scan_dataset(tmp_path / "photos.csv")
    got = dict(zip([Path(p).name for p in dataset.records["path"]], dataset.records["yyyymm"]))
    assert got == {"p0.jpg": 202108, "p1.jpg": 201903, "p2.jpg": -1}
    reasons = {Path(s["path"]).name: s["reason"] for s in dataset.skipped}
    assert "'March'" in reasons["p3.jpg"] and "YYYYMM" in reasons["p3.jpg"]
    assert reasons["p4.jpg"] == "month 13 is not 1..12"


def test_exif_date_time_original_gives_yyyymm_when_the_csv_has_no_date(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2016:05:30 08:15:00"
    Image.new("RGB", (8, 8)).save(tmp_path / "dated.jpg", exif=exif)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    pd.DataFrame({"path": ["dated.jpg", "plain.jpg"], "city": "London", "lat": 51.5, "lon": -0.1}).to_csv(
        tmp_path / "photos.csv", index=False)
    dataset = scan_dataset(tmp_path / "photos.csv")
    got = dict(zip([Path(p).name for p in dataset.records["path"]], dataset.records["yyyymm"]))
    assert got == {"dated.jpg": 201605, "plain.jpg": -1}
    assert any("EXIF DateTimeOriginal" in note for note in dataset.notes)


@pytest.fixture(scope="module")
def dated_index(tmp_path_factory):
    """A GSV-layout index whose places were each photographed in several years (the dates are in the file names)."""
    from geoindex.synthetic import make_synthetic_gsv
    root = make_synthetic_gsv(tmp_path_factory.mktemp("dated") / "GSV", cities=("Barcelona", "London", "Osaka"),
                              places_per_city=10, images_per_place=3, image_size=(40, 32))
    index_dir = tmp_path_factory.mktemp("dated-idx")
    build_cnn_index(root, index_dir, "dated")
    return root, index_dir


def test_the_store_keeps_each_photos_capture_month(dated_index):
    from geoindex.geo_index import load_index
    _, index_dir = dated_index
    index = load_index("dated", index_dir)
    for split in ("train", "val", "test"):
        meta = index.store.metadata(split)
        for path, yyyymm in zip(meta["path"], meta["yyyymm"]):
            fields = Path(path).stem.split("_")
            assert yyyymm == int(fields[2]) * 100 + int(fields[3])
    index.close()


def test_bench_writes_the_revisit_block_to_results_json_and_md(dated_index):
    from geoindex.geo_index import load_index
    _, index_dir = dated_index
    result = run("bench", "--index", "dated", "--index-dir", index_dir, "--methods", "knn")
    assert result.exit_code == 0, result.output
    assert "kNN on revisits" in result.output
    folder = index_dir / "dated" / "bench"
    results = json.loads((folder / "results.json").read_text())
    revisit = results["revisit"]
    # The queries the rule must pick, worked out from the file names of the test photos: a place is one spot; its
    # newest shot is a query when the place has more than one capture date.
    index = load_index("dated", index_dir)
    meta = pd.concat([index.store.metadata(s).assign(split=s) for s in ("train", "val", "test")])
    index.close()
    meta["place"] = [Path(p).stem.split("_")[0] + Path(p).stem.split("_")[1] for p in meta["path"]]
    expected = 0
    for _, shots in meta.groupby("place"):
        if shots["yyyymm"].nunique() > 1:
            newest = shots[shots["yyyymm"] == shots["yyyymm"].max()]
            expected += int((newest["split"] == "test").sum())
    assert expected > 0 and revisit["n_queries"] == expected
    assert revisit["split"] == "test" and "newest capture within 25 m" in revisit["rule"]
    assert set(revisit["recall"]) == {"r@1_25m", "r@5_25m", "r@10_25m"}
    assert 0 <= revisit["recall"]["r@1_25m"] <= revisit["recall"]["r@5_25m"] <= revisit["recall"]["r@10_25m"] <= 1
    for answer in ("city", "cluster", "answer"):
        figures = revisit["gps"][answer]
        assert figures["n_located"] == expected
        assert {"median_m", "within_25m", "within_100m", "within_1000m"} <= set(figures)
    markdown = (folder / "results.md").read_text()
    assert "## Street level: does kNN find the spot?" in markdown and "r@1 25 m" in markdown
    assert "city-level mean (the old answer)" in markdown
    # The city table carries the street thresholds for every method.
    assert "<=25 m" in markdown and results["sets"]["test"]["methods"]["knn"]["within_25m"] is not None


def test_bench_says_why_there_is_no_revisit_block_without_dates(tmp_path):
    names = _photos(tmp_path / "photos", 24)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"path": [f"photos/{n}" for n in names], "city": ["a", "b"] * 12,
                          "lat": 51.5 + rng.uniform(0, 0.2, 24), "lon": -0.1 + rng.uniform(0, 0.2, 24)})
    table.to_csv(tmp_path / "photos.csv", index=False)
    assert run("build", "--data", tmp_path / "photos.csv", "--backbone", "cnn", "--weights", "none", "--image-size",
               "32", "--workers", "0", "--split-by", "image", "--name", "undated", "--index-dir",
               tmp_path / "idx").exit_code == 0
    result = run("bench", "--index", "undated", "--index-dir", tmp_path / "idx", "--methods", "knn")
    assert result.exit_code == 0, result.output
    revisit = json.loads((tmp_path / "idx" / "undated" / "bench" / "results.json").read_text())["revisit"]
    assert "capture date" in revisit["skipped"]
    assert "revisit protocol skipped" in (tmp_path / "idx" / "undated" / "bench" / "results.md").read_text()


def test_street_calibration_never_reads_the_test_split(dated_index, monkeypatch):
    from geoindex.geo_index import load_index
    from geoindex.revisit import calibrate_street
    _, index_dir = dated_index
    index = load_index("dated", index_dir)
    knn = index.knn_method(k=3)
    real_metadata, real_embeddings = index.store.metadata, index.store.embeddings

    def refuse_test(real):
        def read(split, *args, **kwargs):
            assert split != "test", "calibration read the test split"
            return real(split, *args, **kwargs)
        return read

    monkeypatch.setattr(index.store, "metadata", refuse_test(real_metadata))
    monkeypatch.setattr(index.store, "embeddings", refuse_test(real_embeddings))
    street, _ = calibrate_street(index, knn)
    assert street["calibrated_on"] == "val" and street["n_val"] == index.store.count("val")
    assert street["threshold"] is None or 0 < street["threshold"] <= 1
    assert street["spot_threshold"] is None or street["spot_threshold"] <= (street["threshold"] or 1.0)
    assert math.isfinite(street["city_radius_m"] or 0.0)
    index.close()


def test_the_place_benchmark_runs_on_a_dated_index(dated_index, tmp_path):
    import os
    import subprocess
    import sys
    _, index_dir = dated_index
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "place.py"
    proc = subprocess.run([sys.executable, str(script), "--index", "dated", "--index-dir", str(index_dir), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(script.parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "place_dated.json").read_text())
    assert saved["issue_rule_raw"]["queries"] + saved["issue_rule_raw"]["gallery"] > 0
    assert {"val", "test", "val_threshold"} <= set(saved["raw cosine"])
    assert saved["query_test"]["n"] > 0


def test_the_street_threshold_moves_runs_of_equal_supports_whole(monkeypatch):
    from geoindex import revisit

    monkeypatch.setattr(revisit, "MIN_STREET_ANSWERS", 2)
    # the first two of three equal supports would be right, but `support >= 0.5` answers all three at street level
    support, hits = np.array([0.9, 0.5, 0.5, 0.5]), np.array([True, True, False, False])
    assert revisit.lowest_precise_threshold(support, hits) == (None, 0)
    assert revisit.lowest_precise_threshold(support, np.array([True, True, True, True])) == (0.5, 4)
    assert revisit.lowest_precise_threshold(np.array([0.9, 0.7, 0.5]), np.array([True, True, False])) == (0.7, 2)
