"""The one table every data format becomes, and the checks each of its rows must pass.

A row is a photo: `path` (absolute), `city`, and where known `place_id`, `lat`, `lon`, capture date and
heading. The capture date is kept as `year` and `month` and as one sortable `yyyymm` integer (-1: unknown), which
the street-level revisit protocol (geoindex.revisit) needs to tell another capture of a spot from the same one. A row that fails a check is not an error: it is set aside with its reason, like a bad image.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
COLUMNS = ["path", "city", "place_id", "lat", "lon", "year", "month", "northdeg", "panoid", "yyyymm"]
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class Dataset:
    """The photos found in a data source, plus what was set aside while reading it and why."""

    root: Path
    layout: str  # "gsv-cities", "folder", "csv" or "osv5m"
    records: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cities(self) -> list[str]:
        return sorted(self.records["city"].unique())

    @property
    def has_place_ids(self) -> bool:
        return bool((self.records["place_id"] >= 0).any())

    @property
    def has_coordinates(self) -> bool:
        return bool(np.isfinite(self.records["lat"].to_numpy(dtype=float)).any())


def empty_row(path: str, city: str) -> dict:
    return {"path": path, "city": city, "place_id": -1, "lat": np.nan, "lon": np.nan, "year": -1, "month": -1,
            "northdeg": -1, "panoid": ""}


# 202108, 2021-08, 2021/8, 2021-08-15, 20210815, 2021-08-15T10:20:00, EXIF's 2021:08:15 10:20:00
_DATE = re.compile(r"(\d{4})(?:[-/:.](\d{1,2})|(\d{2}))(?:[-/:.]?\d{1,2})?(?:[ T].*)?")


def parse_capture_date(text) -> tuple[int, int] | None:
    """(year, month) of a capture date written as YYYYMM, YYYY-MM or YYYY-MM-DD (any of - / : . between), or None.

    The month is not range-checked here: a row with month 13 is refused by row_problem with that reason."""
    match = _DATE.fullmatch(str(text).strip())
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or match.group(3))


def utf8_problem(path: str) -> str | None:
    """Names that cannot be stored as UTF-8 (undecodable bytes arrive as surrogates) are refused by name."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file or folder name is not valid UTF-8 (rename it to index it)"
    return None


def file_problem(path: str) -> str | None:
    """Why `path` cannot be a photo file, from its stat alone: a FIFO must never be opened (the read would wait for
    a writer forever) and a device or /proc file is not a photo, whatever its name."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    if stat.S_ISREG(mode) and not os.path.realpath(path).startswith(("/proc/", "/sys/", "/dev/")):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a system file")
    return f"not a regular file ({kind}); not opened"


def coordinate_problem(lat, lon) -> str | None:
    """None when lat/lon are both absent or both valid; else why the pair is refused."""
    lat_missing = lat is None or (isinstance(lat, float) and math.isnan(lat))
    lon_missing = lon is None or (isinstance(lon, float) and math.isnan(lon))
    if lat_missing and lon_missing:
        return None
    try:
        lat, lon = float(lat), float(lon)
    except (TypeError, ValueError):
        return f"coordinates are not numbers (lat {lat!r}, lon {lon!r})"
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return f"coordinates are not finite (lat {lat}, lon {lon})"
    if not -90 <= lat <= 90:
        return f"latitude {lat} is outside -90..90"
    if not -180 <= lon <= 180:
        return f"longitude {lon} is outside -180..180"
    return None


def row_problem(row: dict) -> str | None:
    """Why a row cannot be indexed, or None. Shared by every format so all are held to the same rules."""
    if not str(row.get("city") or "").strip():
        return "no city given"
    for problem in (utf8_problem(row["path"]), utf8_problem(str(row["city"])),
                    coordinate_problem(row.get("lat"), row.get("lon"))):
        if problem:
            return problem
    place_id = row.get("place_id", -1)
    if not (-1 <= int(place_id) <= INT64_MAX):
        return f"place id {place_id} does not fit in 64 bits"
    month = int(row.get("month", -1))
    if month != -1 and not 1 <= month <= 12:
        return f"month {month} is not 1..12"
    return None


def make_records(rows: list[dict], skipped: list[dict]) -> pd.DataFrame:
    """Validate rows (appending the refused ones to `skipped`) and return the table; duplicate paths are refused."""
    kept, seen = [], set()
    for row in rows:
        problem = row_problem(row)
        if problem is None and row["path"] in seen:
            problem = "duplicate: this file is already listed"
        if problem:
            skipped.append({"path": str(row["path"]), "reason": problem})
            continue
        seen.add(row["path"])
        kept.append(row)
    extra = [c for c in (kept[0].keys() if kept else []) if c not in COLUMNS]
    records = pd.DataFrame(kept, columns=COLUMNS + extra)
    if not records.empty:
        records["place_id"] = records["place_id"].astype(np.int64)
        records["lat"] = records["lat"].astype(np.float64)
        records["lon"] = records["lon"].astype(np.float64)
        for column in ("year", "month", "northdeg"):
            records[column] = records[column].astype(np.int64)
        year, month = records["year"].to_numpy(), records["month"].to_numpy()
        records["yyyymm"] = np.where((year > 0) & (month >= 1) & (month <= 12), year * 100 + month, -1).astype(np.int64)
        records["city"] = records["city"].astype(str).str.strip()
    return records


def absolute(path) -> str:
    """Absolute without resolving symlinks, so the stored path is the one the user gave, from anywhere."""
    return os.path.abspath(os.fspath(path))
