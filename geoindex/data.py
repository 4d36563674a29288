"""Finding the images of a dataset and splitting them by place.

Two layouts are read: GSV-Cities (`Dataframes/<City>.csv` + `Images/<City>/<City>_<place_id>_...jpg`)
and a plain folder of `<city>/*.jpg`. Both become one table with a row per image.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DatasetError
from .images import IMAGE_EXTENSIONS

SPLITS = ("train", "val", "test")
COLUMNS = ["path", "city", "place_id", "lat", "lon", "year", "month", "northdeg", "panoid"]


@dataclass
class Dataset:
    """The images found under a root, plus files that were set aside while scanning and why."""

    root: Path
    layout: str  # "gsv-cities" or "folder"
    records: pd.DataFrame
    skipped: list[dict]

    @property
    def cities(self) -> list[str]:
        return sorted(self.records["city"].unique())


def parse_gsv_filename(stem: str, city: str) -> dict | None:
    """`<City>_<place_id:07d>_<year>_<month>_<northdeg>_<lat>_<lon>_<panoid>`; panoids may hold '_'."""
    if not stem.startswith(city + "_"):
        return None
    parts = stem[len(city) + 1:].split("_", 6)
    if len(parts) != 7:
        return None
    try:
        return {"place_id": int(parts[0]), "year": int(parts[1]), "month": int(parts[2]),
                "northdeg": int(parts[3]), "lat": float(parts[4]), "lon": float(parts[5]), "panoid": parts[6]}
    except ValueError:
        return None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_dataset(root) -> Dataset:
    """Read a GSV-Cities tree or a plain `<city>/*.jpg` folder into a Dataset."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    if (root / "Images").is_dir():
        return _scan_gsv(root)
    return _scan_folder(root)


def _scan_gsv(root: Path) -> Dataset:
    rows, skipped = [], []
    city_dirs = sorted(p for p in (root / "Images").iterdir() if p.is_dir())
    if not city_dirs:
        raise DatasetError(f"{root / 'Images'} holds no city folders")
    for city_dir in city_dirs:
        city = city_dir.name
        for path in _image_files(city_dir):
            meta = parse_gsv_filename(path.stem, city)
            if meta is None:
                skipped.append({"path": str(path), "reason": "file name does not follow the GSV-Cities pattern "
                                "<City>_<place_id>_<year>_<month>_<northdeg>_<lat>_<lon>_<panoid>"})
                continue
            rows.append({"path": str(path), "city": city, **meta})
    records = pd.DataFrame(rows, columns=COLUMNS)
    if records.empty:
        raise DatasetError(f"no GSV-Cities images found under {root / 'Images'}")
    return Dataset(root, "gsv-cities", records, skipped)


def _scan_folder(root: Path) -> Dataset:
    rows = []
    for city_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in _image_files(city_dir):
            rows.append({"path": str(path), "city": city_dir.name, "place_id": -1, "lat": np.nan, "lon": np.nan,
                         "year": -1, "month": -1, "northdeg": -1, "panoid": ""})
    records = pd.DataFrame(rows, columns=COLUMNS)
    if records.empty:
        raise DatasetError(f"no images found under {root}: expected a GSV-Cities tree (Images/<City>/...) "
                           "or a folder of <city>/*.jpg")
    return Dataset(root, "folder", records, [])


def _place_keys(records: pd.DataFrame) -> pd.Series:
    # Without place ids every image is its own place, which is all a plain folder can promise.
    return records["place_id"].astype(object).where(records["place_id"] >= 0, records["path"])


def _city_rng(seed: int, city: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(city.encode())])


def assign_splits(records: pd.DataFrame, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> pd.Series:
    """Split each city's places (not images) into train/val/test, deterministically from the seed.

    Every place lands in exactly one split; with 3+ places a city gets at least one val and one
    test place, so no city is missing from evaluation on small data.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DatasetError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    keys = _place_keys(records)
    split = pd.Series("train", index=records.index, dtype=object)
    for city, group in records.groupby("city", sort=True):
        places = sorted(set(keys[group.index]), key=str)
        order = _city_rng(seed, city).permutation(len(places))
        n = len(places)
        n_test = round(fractions[2] * n)
        n_val = round(fractions[1] * n)
        if n >= 3:
            n_test, n_val = max(n_test, 1 if fractions[2] > 0 else 0), max(n_val, 1 if fractions[1] > 0 else 0)
        test_places = {places[i] for i in order[:n_test]}
        val_places = {places[i] for i in order[n_test:n_test + n_val]}
        city_keys = keys[group.index]
        split[group.index[city_keys.isin(test_places).to_numpy()]] = "test"
        split[group.index[city_keys.isin(val_places).to_numpy()]] = "val"
    return split


def limit_per_city(records: pd.DataFrame, per_city: int, seed: int = 0) -> pd.DataFrame:
    """Keep about `per_city` images per city by taking whole places in a seeded random order."""
    keys = _place_keys(records)
    kept = []
    for city, group in records.groupby("city", sort=True):
        places = sorted(set(keys[group.index]), key=str)
        order = _city_rng(seed + 1, city).permutation(len(places))
        counts = keys[group.index].value_counts()
        chosen, total = set(), 0
        for i in order:
            if total >= per_city:
                break
            chosen.add(places[i])
            total += int(counts[places[i]])
        kept.append(group[keys[group.index].isin(chosen).to_numpy()])
    return pd.concat(kept).sort_index()


def prepare_records(dataset: Dataset, seed: int = 0, fractions=(0.8, 0.1, 0.1), per_city: int | None = None) -> pd.DataFrame:
    """The rows a build will embed, ordered train, val, test (then city, path) with a `split` column."""
    records = dataset.records
    if per_city:
        records = limit_per_city(records, per_city, seed)
    records = records.assign(split=assign_splits(records, seed, fractions))
    records["split_order"] = records["split"].map({s: i for i, s in enumerate(SPLITS)})
    records = records.sort_values(["split_order", "city", "path"]).drop(columns="split_order")
    return records.reset_index(drop=True)
