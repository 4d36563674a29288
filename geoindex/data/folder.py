"""A plain folder of `<city>/...jpg`: the top-level folder names the city; subfolders belong to it."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .files import walk_images
from .records import Dataset, empty_row, make_records


def scan_folder(root: Path, follow_symlinks: bool = False) -> Dataset:
    rows, skipped = [], []
    city_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for city_dir in city_dirs:
        paths, bad = walk_images(city_dir, root, follow_symlinks)
        skipped.extend(bad)
        rows.extend(empty_row(path, city_dir.name) for path in paths)
    loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    skipped.extend({"path": str(p.resolve()), "reason": "not inside a <city>/ folder, so it has no city"} for p in sorted(loose)
                   if p.suffix.lower() != ".csv")
    records = make_records(rows, skipped)
    if records.empty:
        raise DatasetError(f"no images found under {root}: expected a GSV-Cities tree (Images/<City>/...), "
                           "a folder of <city>/*.jpg, or a CSV manifest (path, city[, lat, lon, place_id])")
    notes = ["plain folder: no place ids or coordinates, so it is split by image (photos of one spot can land in "
             "train and test) and has no GPS figures; a CSV manifest with lat/lon gives both"]
    return Dataset(root, "folder", records, skipped, notes)
