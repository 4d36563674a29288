"""Geotagged CSV manifests: geoindex's own (`path, city[, lat, lon, place_id, ...]`) and OSV-5M's metadata.

geoindex CSV: `path` is relative to the CSV's folder or absolute; `city` names the class; `lat`/`lon`
(or `latitude`/`longitude`) and `place_id` are optional; a capture date comes from a `yyyymm` or `date` column
(YYYYMM, YYYY-MM or YYYY-MM-DD), else from the photo's EXIF DateTimeOriginal; every other column is kept.
OSV-5M (`id, latitude, longitude, city, country, ...`): photos are `<id>.jpg` beside the CSV, under
`images/`, or anywhere below the CSV's folder. A photo whose row has no coordinates gets its EXIF GPS.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DatasetError
from .files import find_by_stem
from .records import COLUMNS, Dataset, empty_row, file_problem, make_records, parse_capture_date

LAT_NAMES, LON_NAMES = ("lat", "latitude"), ("lon", "lng", "longitude")
DATE_NAMES = ("yyyymm", "date")


def _column(columns, names) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def place_id_value(text: str) -> int:
    """Integer ids are kept; any other non-empty id maps to a stable 63-bit number; empty is -1 (unknown).
    A negative integer raises ValueError with the reason."""
    text = text.strip()
    if not text:
        return -1
    try:
        value = int(text)
    except ValueError:
        return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], "big") >> 1
    if value < 0:  # refused like a too-large id: read as "unknown", it would quietly move the photo to a per-image split
        raise ValueError(f"place id {value} is negative (ids are 0 or more; leave the cell empty for no place id)")
    return value


def _float(text: str):
    text = text.strip()
    if not text:
        return np.nan
    try:
        return float(text)
    except ValueError:
        return text  # kept as text so the row check names it


def _read_exif(path):
    from PIL import Image

    from ..images import DECODED_FORMATS

    try:
        with Image.open(path, formats=DECODED_FORMATS) as img:  # only formats geoindex decodes: EPS would run gs
            return img.getexif()
    except Exception:  # noqa: BLE001 - a photo without readable EXIF simply has none
        return None


def exif_gps(path, exif=None) -> tuple[float, float] | None:
    """(lat, lon) from a photo's EXIF GPS block, or None. Reads the header only."""
    def degrees(value):
        d, m, s = (float(v) for v in value)
        return d + m / 60 + s / 3600

    exif = _read_exif(path) if exif is None else exif
    try:
        gps = exif.get_ifd(0x8825) if exif is not None else None
        if not gps or 2 not in gps or 4 not in gps:
            return None
        lat, lon = degrees(gps[2]), degrees(gps[4])
        if str(gps.get(1, "N")).upper().startswith("S"):
            lat = -lat
        if str(gps.get(3, "E")).upper().startswith("W"):
            lon = -lon
        return lat, lon
    except Exception:  # noqa: BLE001 - a photo without readable EXIF simply has no GPS from it
        return None


def exif_capture_date(path, exif=None) -> tuple[int, int] | None:
    """(year, month) from EXIF DateTimeOriginal ("YYYY:MM:DD HH:MM:SS"), or None. Reads the header only."""
    exif = _read_exif(path) if exif is None else exif
    try:
        value = exif.get_ifd(0x8769).get(0x9003) if exif is not None else None
        found = parse_capture_date(value) if value else None
    except Exception:  # noqa: BLE001 - an unreadable EXIF block simply gives no date
        return None
    return found if found is not None and 1 <= found[1] <= 12 else None


def is_osv5m(columns) -> bool:
    lower = {c.lower() for c in columns}
    return "path" not in lower and {"id", "latitude", "longitude"} <= lower


def is_manifest(columns) -> bool:
    lower = {c.lower() for c in columns}
    return {"path", "city"} <= lower or is_osv5m(columns)


def read_csv_strings(path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DatasetError(f"cannot read CSV {path}: {exc}") from None


def osv5m_paths(root: Path, ids) -> list[str]:
    """Where OSV-5M's photos of `ids` are: `<id>.jpg` beside the CSV, under images/, or anywhere below."""
    found = {}
    for candidate in (root, root / "images"):
        found.update({i: str(Path(candidate) / f"{i}.jpg") for i in ids if (Path(candidate) / f"{i}.jpg").is_file()
                      and i not in found})
    missing = set(ids) - set(found)
    if missing:
        found.update(find_by_stem(root, missing))
    return [found.get(i, os.path.abspath(root / f"{i}.jpg")) for i in ids]


def listed_photos(csv_path) -> list[str]:
    """The photos a CSV lists, in its order, for querying: its `path` column (relative to the CSV's folder, or
    absolute), or OSV-5M's `id` column. No label is needed; a row without a path is kept as "" (reported in place)."""
    csv_path = Path(csv_path).expanduser()
    table = read_csv_strings(csv_path)
    root = csv_path.parent
    path_col = _column(table.columns, ("path",))
    if path_col is not None:
        return [os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p)) if p.strip() else ""
                for p in table[path_col]]
    if is_osv5m(table.columns):
        return osv5m_paths(root, table[_column(table.columns, ("id",))].str.strip())
    raise DatasetError(f"{csv_path}: a CSV of photos to query needs a path column (relative to the CSV's folder, or "
                       f"absolute), or OSV-5M's id column; found {', '.join(table.columns)}")


def scan_manifest(csv_path, use_exif: bool = True) -> Dataset:
    csv_path = Path(csv_path).expanduser()
    table = read_csv_strings(csv_path)
    root = csv_path.parent
    if is_osv5m(table.columns):
        layout = "osv5m"
        paths = osv5m_paths(root, table[_column(table.columns, ("id",))].str.strip())
        city_col = _column(table.columns, ("city",))
        if city_col is None:
            raise DatasetError(f"{csv_path}: an OSV-5M CSV needs a city column to label photos")
    elif is_manifest(table.columns):
        layout = "csv"
        path_col, city_col = _column(table.columns, ("path",)), _column(table.columns, ("city",))
        paths = [os.path.abspath(p if os.path.isabs(p) else root / p) if p.strip() else "" for p in table[path_col]]
    else:
        raise DatasetError(f"{csv_path}: a CSV manifest needs columns path and city (plus optional lat, lon, place_id), "
                           f"or OSV-5M's id, latitude, longitude, city; found {', '.join(table.columns)}")
    lat_col, lon_col = _column(table.columns, LAT_NAMES), _column(table.columns, LON_NAMES)
    place_col = _column(table.columns, ("place_id",))
    date_col = _column(table.columns, DATE_NAMES)
    known = {c for c in (city_col, lat_col, lon_col, place_col, _column(table.columns, ("path",))) if c}
    extra = [c for c in table.columns if c not in known and c not in COLUMNS and c.strip() and not c.startswith("Unnamed")]
    rows, skipped, from_exif, dates_from_exif = [], [], 0, 0
    for i, path in enumerate(paths):
        if not path:
            skipped.append({"path": f"{csv_path}:row {i + 2}", "reason": "no path given"})
            continue
        problem = file_problem(path)
        if problem:
            skipped.append({"path": path, "reason": f"{problem} (listed in {csv_path.name}, row {i + 2})"})
            continue
        row = empty_row(path, table[city_col].iat[i].strip())
        if lat_col and lon_col:
            row["lat"], row["lon"] = _float(table[lat_col].iat[i]), _float(table[lon_col].iat[i])
        if place_col:
            try:
                row["place_id"] = place_id_value(table[place_col].iat[i])
            except ValueError as exc:
                skipped.append({"path": path, "reason": str(exc)})
                continue
        if date_col and table[date_col].iat[i].strip():
            date = parse_capture_date(table[date_col].iat[i])
            if date is None:
                skipped.append({"path": path, "reason": f"capture date {table[date_col].iat[i].strip()[:40]!r} is not "
                                                        "YYYYMM, YYYY-MM or YYYY-MM-DD"})
                continue
            row["year"], row["month"] = date
        needs_gps = isinstance(row["lat"], float) and np.isnan(row["lat"])
        if use_exif and (needs_gps or not date_col):
            exif = _read_exif(path)
            gps = exif_gps(path, exif) if needs_gps else None
            if gps is not None:
                row["lat"], row["lon"] = gps
                from_exif += 1
            date = exif_capture_date(path, exif) if not date_col else None
            if date is not None:
                row["year"], row["month"] = date
                dates_from_exif += 1
        row.update({c: table[c].iat[i] for c in extra})
        rows.append(row)
    records = make_records(rows, skipped)
    if records.empty:
        raise DatasetError(f"no usable photo listed in {csv_path} ({len(skipped)} rows skipped; "
                           f"first: {skipped[0]['reason'] if skipped else 'the CSV is empty'})")
    notes = [f"{from_exif} photos took their coordinates from EXIF GPS"] if from_exif else []
    if dates_from_exif:
        notes.append(f"{dates_from_exif} photos took their capture date from EXIF DateTimeOriginal")
    return Dataset(root, layout, records, skipped, notes)


def find_manifest_in(folder: Path) -> Path | None:
    """A folder whose top level holds exactly one CSV manifest is read through it (it knows coordinates)."""
    candidates = []
    for csv in sorted(folder.glob("*.csv")):
        try:
            header = pd.read_csv(csv, nrows=0, encoding_errors="replace").columns
        except Exception:  # noqa: BLE001 - not a readable CSV: not a manifest
            continue
        if is_manifest(header):
            candidates.append(csv)
    return candidates[0] if len(candidates) == 1 else None
