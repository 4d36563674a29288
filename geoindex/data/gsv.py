"""GSV-Cities: `Images/<City>/<City>_<place_id:07d>_<year>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg`."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DatasetError
from .files import walk_images
from .records import Dataset, make_records

PATTERN = "<City>_<place_id>_<year>_<month>_<northdeg>_<lat>_<lon>_<panoid>"


def parse_gsv_filename(stem: str, city: str) -> dict | None:
    """The fields of a GSV-Cities file name; panoids may hold '_'. None when the name does not follow the pattern."""
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


def scan_gsv(root: Path, follow_symlinks: bool = False) -> Dataset:
    images = root / "Images"
    city_dirs = sorted(p for p in images.iterdir() if p.is_dir())
    if not city_dirs:
        raise DatasetError(f"{images} holds no city folders")
    rows, skipped = [], []
    for city_dir in city_dirs:
        city = city_dir.name
        paths, bad = walk_images(city_dir, root, follow_symlinks)
        skipped.extend(bad)
        for path in paths:
            meta = parse_gsv_filename(Path(path).stem, city)
            if meta is None:
                skipped.append({"path": path, "reason": f"file name does not follow the GSV-Cities pattern {PATTERN}"})
                continue
            rows.append({"path": path, "city": city, **meta})
    records = make_records(rows, skipped)
    if records.empty:
        raise DatasetError(f"no GSV-Cities images found under {images}")
    return Dataset(root, "gsv-cities", records, skipped)


def is_gsv_tree(root: Path) -> bool:
    return os.path.isdir(root / "Images")
