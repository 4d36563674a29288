"""CSV manifests, OSV-5M metadata, EXIF GPS, cell splits, and hostile folders: every photo kept or skipped with a reason."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoindex.data import cell_keys, prepare_records, scan_dataset, split_records
from geoindex.errors import DatasetError

from conftest import SHARED

REAL = SHARED / "data" / "real"


def _jpeg(path: Path, value=0, exif=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (16, 12), (value % 256, 40, 90))
    img.save(path, format="JPEG", **({"exif": exif} if exif is not None else {}))
    return path


def _reasons(dataset) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in dataset.skipped}


def test_csv_manifest_relative_and_absolute_paths_bad_rows_and_extra_columns(tmp_path):
    a = _jpeg(tmp_path / "imgs" / "a.jpg")
    b = _jpeg(tmp_path / "elsewhere" / "b.jpg", 1)
    for name in ("badlat", "badlon", "nocity", "nanlat", "dup", "month"):
        _jpeg(tmp_path / "imgs" / f"{name}.jpg", 2)
    rows = [
        ("imgs/a.jpg", "Rome", "41.9", "12.5", "7", "sunny"),
        (str(b), "Oslo", "59.9", "10.7", "", "rain"),
        ("imgs/missing.jpg", "Rome", "41.9", "12.5", "", ""),
        ("imgs/badlat.jpg", "Rome", "999", "12.5", "", ""),
        ("imgs/badlon.jpg", "Rome", "41.9", "200", "", ""),
        ("imgs/nocity.jpg", "", "41.9", "12.5", "", ""),
        ("imgs/nanlat.jpg", "Rome", "nan", "12.5", "", ""),
        ("imgs/a.jpg", "Oslo", "59.9", "10.7", "", ""),
        ("imgs/dup.jpg", "Rome", "", "", "99999999999999999999", ""),
    ]
    pd.DataFrame(rows, columns=["path", "city", "lat", "lon", "place_id", "weather"]).to_csv(tmp_path / "m.csv", index=False)
    ds = scan_dataset(tmp_path / "m.csv")
    assert ds.layout == "csv"
    assert sorted(ds.records["path"]) == sorted([str(a), str(b)])
    assert ds.records.set_index("city").loc["Rome", "place_id"] == 7
    assert ds.records.set_index("city").loc["Oslo", "weather"] == "rain"  # other columns are kept
    reasons = _reasons(ds)
    assert "not found" in reasons["missing.jpg"]
    assert "latitude 999.0" in reasons["badlat.jpg"] and "longitude 200.0" in reasons["badlon.jpg"]
    assert reasons["nocity.jpg"] == "no city given"
    assert "not finite" in reasons["nanlat.jpg"]
    assert "duplicate" in reasons["a.jpg"]
    assert "64 bits" in reasons["dup.jpg"]


def test_csv_without_required_columns_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\nx.jpg,Rome\n")
    with pytest.raises(DatasetError, match="needs columns path and city"):
        scan_dataset(tmp_path / "m.csv")


def test_exif_gps_fills_missing_coordinates(tmp_path):
    exif = Image.Exif()
    gps = {1: "S", 2: (33.0, 52.0, 4.0), 3: "E", 4: (151.0, 12.0, 36.0)}
    exif[0x8825] = gps
    _jpeg(tmp_path / "p" / "sydney.jpg", exif=exif)
    _jpeg(tmp_path / "p" / "plain.jpg")
    (tmp_path / "m.csv").write_text("path,city\np/sydney.jpg,Sydney\np/plain.jpg,Sydney\n")
    ds = scan_dataset(tmp_path / "m.csv")
    by_name = ds.records.assign(name=ds.records["path"].map(lambda p: Path(p).name)).set_index("name")
    assert by_name.loc["sydney.jpg", "lat"] == pytest.approx(-(33 + 52 / 60 + 4 / 3600), abs=1e-6)
    assert by_name.loc["sydney.jpg", "lon"] == pytest.approx(151 + 12 / 60 + 36 / 3600, abs=1e-6)
    assert np.isnan(by_name.loc["plain.jpg", "lat"])


def test_osv5m_metadata_finds_images_by_id_anywhere_below(tmp_path):
    _jpeg(tmp_path / "images" / "111.jpg")
    _jpeg(tmp_path / "Some_Town" / "222.jpg")
    (tmp_path / "select.csv").write_text(",id,longitude,latitude,city,country\n0,111,2.35,48.85,Paris,FR\n"
                                         "1,222,12.5,41.9,Rome,IT\n2,333,0,0,Nowhere,XX\n")
    ds = scan_dataset(tmp_path / "select.csv")
    assert ds.layout == "osv5m"
    assert set(ds.records["city"]) == {"Paris", "Rome"}
    assert ds.records.set_index("city").loc["Rome", "lat"] == pytest.approx(41.9)
    assert ds.records.set_index("city").loc["Paris", "country"] == "FR"
    assert "not found" in _reasons(ds)["333.jpg"]


def test_shared_osv5m_sample_reads_in_its_own_format():
    csv = REAL / "osv5m-sample" / "select.csv"
    if not csv.is_file():
        pytest.skip(f"no OSV-5M sample at {csv} (see ../shared/README.md)")
    ds = scan_dataset(csv)
    assert ds.layout == "osv5m" and len(ds.records) == 71 and ds.skipped == []
    assert np.isfinite(ds.records[["lat", "lon"]].to_numpy()).all()


def test_cell_split_never_puts_one_cell_in_two_splits():
    rng = np.random.default_rng(0)
    n = 3000
    records = pd.DataFrame({"path": [f"/p/{i}.jpg" for i in range(n)], "city": rng.choice(["A", "B"], n),
                            "place_id": -1, "lat": 51.2 + rng.random(n) * 0.5, "lon": -0.5 + rng.random(n) * 0.7})
    split, info = split_records(records, by="auto", cell_km=1.0)
    assert info.by == "cell" and info.warning is None
    cells = pd.Series(cell_keys(records["lat"], records["lon"], 1.0))
    assert (pd.DataFrame({"cell": cells, "split": split}).groupby("cell")["split"].nunique() == 1).all()
    shares = split.value_counts(normalize=True)
    assert abs(shares["test"] - 0.1) < 0.02 and abs(shares["val"] - 0.1) < 0.02


def test_cells_are_about_cell_km_wide():
    # Two points 0.3 km apart share a 1 km cell far more often than two points 3 km apart do.
    rng = np.random.default_rng(1)
    lat, lon = 43 + rng.random(2000) * 0.1, -81 + rng.random(2000) * 0.1
    near = cell_keys(lat, lon, 1.0) == cell_keys(lat + 0.3 / 111, lon, 1.0)
    far = cell_keys(lat, lon, 1.0) == cell_keys(lat + 3 / 111, lon, 1.0)
    assert near.mean() > 0.6 and far.mean() == 0


def test_image_split_warns_and_small_cities_are_named(tmp_path):
    for i in range(6):
        _jpeg(tmp_path / "Big" / f"{i}.jpg", i)
    _jpeg(tmp_path / "Tiny" / "only.jpg")
    records, info = prepare_records(scan_dataset(tmp_path))
    assert info.by == "image" and "IMAGE" in info.warning
    assert info.small_cities == ["Tiny"]
    assert set(records.loc[records["city"] == "Big", "split"]) == {"train", "val", "test"}


def test_shared_london_csv_builds_a_cell_split_with_no_cell_in_two_splits():
    folder = REAL / "london-or-london"
    if not (folder / "index.csv").is_file():
        pytest.skip(f"no London-or-London photos at {folder} (see ../shared/README.md)")
    ds = scan_dataset(folder)  # the folder is read through its index.csv: coordinates and all
    assert ds.layout == "csv" and len(ds.records) == 5419
    records, info = prepare_records(ds)
    assert info.by == "cell" and info.cell_km == 1.0
    cells = pd.Series(cell_keys(records["lat"], records["lon"], 1.0))
    assert (pd.DataFrame({"cell": cells, "split": records["split"]}).groupby("cell")["split"].nunique() == 1).all()
    assert set(records["split"]) == {"train", "val", "test"}


def test_hostile_folder_every_entry_kept_or_listed(tmp_path):
    root = tmp_path / "data"
    outside = _jpeg(tmp_path / "outside" / "o.jpg")
    _jpeg(root / "Rome" / "good.jpg")
    _jpeg(root / "Rome" / "sub" / "deeper.jpg", 3)  # photos in subfolders belong to the city
    (root / "Rome" / "x.jpg").mkdir()  # a folder with an image name
    (root / "Rome" / "link_out.jpg").symlink_to(outside)
    (root / "Rome" / "dangling.jpg").symlink_to(root / "Rome" / "gone.jpg")
    (root / "Rome" / "loop").symlink_to(root / "Rome" / "loop")
    (root / "Rome" / "notes.txt").write_text("hello")
    bad_name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    _jpeg(Path(os.fsdecode(os.fsencode(root / "Rome") + b"/caf\xe9.jpg")), 5)
    ds = scan_dataset(root)
    names = sorted(Path(p).name for p in ds.records["path"])
    assert names == ["deeper.jpg", "good.jpg"]
    reasons = _reasons(ds)
    assert "outside the data folder" in reasons["link_out.jpg"]
    assert "broken symlink" in reasons["dangling.jpg"]
    assert "loop" in reasons["loop"]
    assert "a folder" in reasons["x.jpg"]
    assert "not an image" in reasons["notes.txt"]
    assert "UTF-8" in reasons[bad_name]
    followed = scan_dataset(root, follow_symlinks=True)
    assert "link_out.jpg" in {Path(p).name for p in followed.records["path"]}


def test_gsv_names_with_bad_fields_are_skipped_with_reasons(tmp_path):
    city = tmp_path / "GSV" / "Images" / "Rome"
    _jpeg(city / "Rome_0000001_2020_01_000_41.9_12.5_ok.jpg")
    _jpeg(city / "Rome_99999999999999999999_2020_01_000_41.9_12.5_big.jpg")
    _jpeg(city / "Rome_0000002_2020_13_000_41.9_12.5_month.jpg")
    _jpeg(city / "Rome_0000003_2020_01_000_999_12.5_lat.jpg")
    _jpeg(city / "Rome_0000004_2020_01_000_nan_12.5_nan.jpg")
    ds = scan_dataset(tmp_path / "GSV")
    assert [Path(p).name for p in ds.records["path"]] == ["Rome_0000001_2020_01_000_41.9_12.5_ok.jpg"]
    reasons = " | ".join(s["reason"] for s in ds.skipped)
    for expected in ("64 bits", "month 13", "latitude 999", "not finite"):
        assert expected in reasons
