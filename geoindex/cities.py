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
    City("WashingtonDC", "Washington", "United States", 38.9072, -77.0369),
]

GSV_CITIES: dict[str, City] = {c.id: c for c in _CITIES}


def city_info(city_id: str) -> City:
    """Known cities come from the table; a user's own folder names pass through unchanged."""
    if city_id in GSV_CITIES:
        return GSV_CITIES[city_id]
    return City(city_id, city_id, "", float("nan"), float("nan"))


def display_name(city_id: str) -> str:
    return city_info(city_id).name
