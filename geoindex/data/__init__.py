"""Finding the photos of a data source and splitting them so that no place is in two splits.

Formats: a GSV-Cities tree (`gsv`), a plain `<city>/*.jpg` folder (`folder`), a geotagged CSV manifest
or OSV-5M metadata (`manifest`). Each becomes one table (`records`); `splits` decides train/val/test.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import DatasetError
from .folder import scan_folder
from .gsv import is_gsv_tree, parse_gsv_filename, scan_gsv
from .manifest import exif_gps, find_manifest_in, scan_manifest
from .records import COLUMNS, SPLITS, Dataset
from .splits import (IMAGE_SPLIT_WARNING, SPLIT_BY, SplitInfo, assign_splits, cell_keys, group_keys, limit_per_city,
                     order_by_split, resolve_split_by, split_records)


def scan_dataset(source, follow_symlinks: bool = False) -> Dataset:
    """Read a GSV-Cities tree, a `<city>/*.jpg` folder, or a CSV manifest (geoindex's or OSV-5M's)."""
    source = Path(source).expanduser()
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(f"{source} is a file but not a .csv manifest; give a folder or a CSV")
        return scan_manifest(source)
    if not source.is_dir():
        raise DatasetError(f"data not found: {source}")
    if is_gsv_tree(source):
        return scan_gsv(source, follow_symlinks)
    manifest = find_manifest_in(source)
    if manifest is not None:
        dataset = scan_manifest(manifest)
        dataset.notes.insert(0, f"read through its manifest {manifest.name} (coordinates and all); "
                                f"give the folder's <city>/ subfolders as --data to ignore it")
        return dataset
    return scan_folder(source, follow_symlinks)


def prepare_records(dataset: Dataset, seed: int = 0, fractions=(0.8, 0.1, 0.1), per_city: int | None = None,
                    split_by: str = "auto", cell_km: float = 1.0) -> tuple[pd.DataFrame, SplitInfo]:
    """The rows a build embeds, with a `split` column, ordered train, val, test; and how the split was drawn."""
    records = dataset.records
    if per_city:
        records = limit_per_city(records, per_city, seed, split_by, cell_km)
    split, info = split_records(records, seed, fractions, split_by, cell_km)
    return order_by_split(records.assign(split=split)), info


__all__ = ["COLUMNS", "SPLITS", "SPLIT_BY", "Dataset", "SplitInfo", "IMAGE_SPLIT_WARNING", "scan_dataset",
           "prepare_records", "split_records", "assign_splits", "limit_per_city", "group_keys", "cell_keys",
           "resolve_split_by", "order_by_split", "parse_gsv_filename", "exif_gps"]
