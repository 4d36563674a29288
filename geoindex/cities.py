"""The 23 GSV-Cities cities: id as used in the dataset's file names, display name, country, centre.

Four dataset ids are codes (OSL, TRT, PRG, PRS); prompts and reports must use the spelled-out
name, so every consumer goes through this table instead of printing ids.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class City:
    id: str
    name: str
    country: str
    lat: float
    lon: float


_CITIES = [
    City("Bangkok", "Bangkok", "Thailand", 13.7563, 100.5018),
    City("Barcelona", "Barcelona", "Spain", 41.3874, 2.1686),
    City("Boston", "Boston", "United States", 42.3601, -71.0589),
    City("Brussels", "Brussels", "Belgium", 50.8503, 4.3517),
    City("BuenosAires", "Buenos Aires", "Argentina", -34.6037, -58.3816),
    City("Chicago", "Chicago", "United States", 41.8781, -87.6298),
    City("Lisbon", "Lisbon", "Portugal", 38.7223, -9.1393),
    City("London", "London", "United Kingdom", 51.5072, -0.1276),
    City("LosAngeles", "Los Angeles", "United States", 34.0522, -118.2437),
    City("Madrid", "Madrid", "Spain", 40.4168, -3.7038),
    City("Medellin", "Medellin", "Colombia", 6.2442, -75.5812),
    City("Melbourne", "Melbourne", "Australia", -37.8136, 144.9631),
    City("MexicoCity", "Mexico City", "Mexico", 19.4326, -99.1332),
    City("Miami", "Miami", "United States", 25.7617, -80.1918),
    City("Minneapolis", "Minneapolis", "United States", 44.9778, -93.2650),
    City("OSL", "Oslo", "Norway", 59.9139, 10.7522),
    City("Osaka", "Osaka", "Japan", 34.6937, 135.5023),
    City("PRG", "Prague", "Czech Republic", 50.0755, 14.4378),
    City("PRS", "Paris", "France", 48.8566, 2.3522),
    City("Phoenix", "Phoenix", "United States", 33.4484, -112.0740),
    City("Rome", "Rome", "Italy", 41.9028, 12.4964),
    City("TRT", "Toronto", "Canada", 43.6532, -79.3832),
    City("WashingtonDC", "Washington, D.C.", "United States", 38.9072, -77.0369),
]

GSV_CITIES: dict[str, City] = {c.id: c for c in _CITIES}

# Other cities of the data sets this project is measured on (London-or-London's second London), so that they get a
# full name too: a folder name alone ("London_Ontario") has no country.
OTHER_CITIES: dict[str, City] = {c.id: c for c in [
    City("London_Ontario", "London, Ontario", "Canada", 42.9849, -81.2453),
]}


def humanize(city_id: str) -> str:
    """A folder name as a place name: `London_Ontario` -> `London Ontario`, `NewYork` -> `New York`."""
    import re
    text = city_id.replace("_", " ").replace("-", " ")
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)
    return " ".join(text.split()) or city_id


def city_info(city_id: str) -> City:
    """Known cities come from the table (or a names file loaded with `load_names`); other ids are humanised."""
    if city_id in _EXTRA:
        return _EXTRA[city_id]
    if city_id in GSV_CITIES:
        return GSV_CITIES[city_id]
    if city_id in OTHER_CITIES:
        return OTHER_CITIES[city_id]
    return City(city_id, humanize(city_id), "", float("nan"), float("nan"))


_EXTRA: dict[str, City] = {}


def load_names(path) -> list[str]:
    """A CSV of `city_id,name[,country,lat,lon]` (the format of GSV-Cities' city table): prompts and reports
    use these names. Returns the ids read."""
    import pandas as pd
    from .errors import GeoindexError

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable names file is the user's to fix
        raise GeoindexError(f"cannot read names file {path}: {exc}") from None
    if not {"city_id", "name"} <= set(table.columns):
        raise GeoindexError(f"names file {path} needs columns city_id,name (optional country, lat, lon)")
    for row in table.itertuples():
        def num(v):
            try:
                return float(v)
            except (TypeError, ValueError):
                return float("nan")
        _EXTRA[row.city_id] = City(row.city_id, row.name, getattr(row, "country", "") or "",
                                   num(getattr(row, "lat", "")), num(getattr(row, "lon", "")))
    return list(table["city_id"])


def display_name(city_id: str) -> str:
    return city_info(city_id).name


def full_name(city_id: str) -> str:
    """`London, United Kingdom`: the display name with its country where the table knows it."""
    info = city_info(city_id)
    return f"{info.name}, {info.country}" if info.country else info.name
