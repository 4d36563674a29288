"""Splits that cannot leak: whole places, whole map cells, or (only when nothing better exists) images.

A split by image puts photos taken metres apart into train and test, which flatters every method
(kNN most). So the unit of a split is a group of photos that must stay together:
`place` (GSV-Cities place ids), `cell` (squares of `cell_km` on the map), or `image`.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import DatasetError
from .records import SPLITS

SPLIT_BY = ("auto", "place", "cell", "image")
KM_PER_DEGREE_LAT = 110.574
KM_PER_DEGREE_LON_AT_EQUATOR = 111.320
IMAGE_SPLIT_WARNING = ("split by IMAGE: photos taken metres apart can sit in train and test, so internal figures "
                       "flatter (kNN most); give place ids or coordinates (a CSV manifest) for a place or cell split")


@dataclass
class SplitInfo:
    """How a split was drawn, recorded in the manifest and repeated by every report."""

    by: str
    seed: int
    fractions: tuple
    cell_km: float | None = None
    warning: str | None = None
    small_cities: list[str] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"by": self.by, "seed": self.seed, "fractions": list(self.fractions), "cell_km": self.cell_km,
                "warning": self.warning, "small_cities": self.small_cities, "groups": self.groups}


def cell_keys(lat, lon, cell_km: float) -> np.ndarray:
    """Square-ish map cells of about cell_km a side: rows of latitude, each cut by the longitude span at its centre."""
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    dlat = cell_km / KM_PER_DEGREE_LAT
    row = np.floor(lat / dlat)
    centre = np.radians((row + 0.5) * dlat)
    dlon = cell_km / (KM_PER_DEGREE_LON_AT_EQUATOR * np.clip(np.cos(centre), 1e-6, None))
    col = np.floor(lon / dlon)
    return np.array([f"cell:{int(r)}:{int(c)}" if math.isfinite(r) and math.isfinite(c) else ""
                     for r, c in zip(row, col)], dtype=object)


def resolve_split_by(records: pd.DataFrame, by: str = "auto") -> tuple[str, str | None]:
    """`auto`: place where place ids exist, else cell where coordinates exist, else image (with a warning)."""
    if by not in SPLIT_BY:
        raise DatasetError(f"unknown split {by!r}; choose one of {', '.join(SPLIT_BY)}")
    has_places = "place_id" in records and bool((records["place_id"] >= 0).any())
    has_coords = "lat" in records and bool(np.isfinite(records["lat"].to_numpy(dtype=float)).any())
    if by == "place" and not has_places:
        raise DatasetError("--split-by place needs place ids (GSV-Cities file names or a place_id column); none found")
    if by == "cell" and not has_coords:
        raise DatasetError("--split-by cell needs coordinates (lat/lon columns, GSV-Cities names or EXIF GPS); none found")
    if by == "auto":
        by = "place" if has_places else "cell" if has_coords else "image"
    return by, IMAGE_SPLIT_WARNING if by == "image" else None


def group_keys(records: pd.DataFrame, by: str, cell_km: float = 1.0) -> pd.Series:
    """The key of the group each photo belongs to; photos lacking the key's field each form their own group."""
    paths = records["path"].astype(str)
    if by == "place":
        keys = "place:" + records["place_id"].astype(str)
        return keys.where(records["place_id"] >= 0, "image:" + paths)
    if by == "cell":
        cells = pd.Series(cell_keys(records["lat"], records["lon"], cell_km), index=records.index)
        return cells.where(cells != "", "image:" + paths)
    return "image:" + paths


def _city_rng(seed: int, city: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(city.encode("utf-8", "surrogateescape"))])


def split_records(records: pd.DataFrame, seed: int = 0, fractions=(0.8, 0.1, 0.1), by: str = "auto",
                  cell_km: float = 1.0) -> tuple[pd.Series, SplitInfo]:
    """Each city's groups, in a seeded order, fill test then val up to their share of photos; the rest is train.

    Every group lands in exactly one split. A city with 3+ groups gets at least one val and one test
    group; one with fewer is named in SplitInfo.small_cities (it cannot be scored on all three).
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DatasetError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if cell_km <= 0:
        raise DatasetError(f"--cell-km must be positive, got {cell_km}")
    by, warning = resolve_split_by(records, by)
    keys = group_keys(records, by, cell_km)
    split = pd.Series("train", index=records.index, dtype=object)
    info = SplitInfo(by, seed, tuple(fractions), cell_km if by == "cell" else None, warning)
    # A group (a cell may hold photos of two cities) is split as a whole, stratified by its main city.
    main_city = pd.DataFrame({"key": keys, "city": records["city"]}).groupby("key")["city"].agg(
        lambda c: c.value_counts().sort_index().idxmax())
    sizes_all = keys.value_counts()
    for city in sorted(records["city"].unique()):
        names = sorted(main_city.index[main_city == city])
        info.groups[city] = len(names)
        if len(names) < 3:
            info.small_cities.append(city)
        if not names:
            continue
        sizes = sizes_all[names]
        total = int(sizes.sum())
        order = _city_rng(seed, city).permutation(len(names))
        chosen = {"test": set(), "val": set()}
        position = 0
        for part in ("test", "val"):
            target = fractions[SPLITS.index(part)] * total
            minimum = 1 if (len(names) >= 3 and fractions[SPLITS.index(part)] > 0) else 0
            filled = 0
            while position < len(names) - 1:
                size = int(sizes[names[order[position]]])
                enough = len(chosen[part]) >= minimum
                if enough and (filled >= target - 1e-9 or filled + size / 2 > target):
                    break  # full, or this group would overshoot the share by more than it helps
                chosen[part].add(names[order[position]])
                filled += size
                position += 1
        split[keys.isin(chosen["test"]).to_numpy()] = "test"
        split[keys.isin(chosen["val"]).to_numpy()] = "val"
    return split, info


def limit_per_city(records: pd.DataFrame, per_city: int, seed: int = 0, by: str = "auto",
                   cell_km: float = 1.0) -> pd.DataFrame:
    """Keep about `per_city` photos per city by taking whole groups (places or cells) in a seeded order."""
    by, _ = resolve_split_by(records, by)
    keys = group_keys(records, by, cell_km)
    kept = []
    for city, group in records.groupby("city", sort=True):
        city_keys = keys[group.index]
        counts = city_keys.value_counts()
        names = sorted(counts.index)
        order = _city_rng(seed + 1, city).permutation(len(names))
        chosen, total = set(), 0
        for i in order:
            if total >= per_city:
                break
            chosen.add(names[i])
            total += int(counts[names[i]])
        kept.append(group[city_keys.isin(chosen).to_numpy()])
    return pd.concat(kept).sort_index()


def order_by_split(records: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered train, val, test, then city and path: the order of the embeddings file."""
    order = records["split"].map({s: i for i, s in enumerate(SPLITS)})
    return (records.assign(_order=order).sort_values(["_order", "city", "path"]).drop(columns="_order")
            .reset_index(drop=True))


def assign_splits(records: pd.DataFrame, seed: int = 0, fractions=(0.8, 0.1, 0.1), by: str = "auto",
                  cell_km: float = 1.0) -> pd.Series:
    return split_records(records, seed, fractions, by, cell_km)[0]
