"""What every method shares: a set of photos in, (N, C) probabilities and a GPS guess per photo out.

In the spirit of scikit-learn's `predict_proba`: each method is an object; `query`, `bench` and the
service loop over the same objects, so a CLI answer, a page answer and a bench row cannot disagree.
Anything a method tunes (`fit`) is tuned on the validation split and records that it was.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..voting import break_ties, gps_estimate  # noqa: F401 (break_ties: importable from here too)


@dataclass
class Photos:
    """Photos to answer for: the index backbone's embeddings, and the photos themselves for methods that
    need other features (a fine-tuned backbone, CLIP), computed once per set and cached by key."""

    embeddings: np.ndarray
    sources: list  # file paths or PIL images, in the order of embeddings
    labels: np.ndarray | None = None  # class ids, when known (scoring)
    coords: np.ndarray | None = None  # (N, 2) true lat/lon, when known
    name: str = "query"
    cache: dict = field(default_factory=dict)
    verify_sources: list | None = None  # what spatial verification reads, where sources are model inputs
    locate: bool = True  # False: only the probabilities are read, so GPS work that costs (verification) is skipped

    def __len__(self) -> int:
        return len(self.embeddings)

    @classmethod
    def of_split(cls, index, split: str) -> "Photos":
        """A stored split of an index: its embeddings, paths, labels and coordinates."""
        from ..errors import GeoindexError

        meta = index.store.metadata(split)
        if len(meta) == 0:
            raise GeoindexError(f"index {index.name!r} has no {split} photos")
        return cls(index.store.embeddings(split), meta["path"].tolist(), meta["label"].to_numpy(),
                   meta[["lat", "lon"]].to_numpy(dtype=np.float64), split)

    def feature(self, key, compute: Callable[["Photos"], np.ndarray]) -> np.ndarray:
        if key not in self.cache:
            self.cache[key] = compute(self)
        return self.cache[key]

    def subset(self, rows) -> "Photos":
        rows = np.asarray(rows)
        return Photos(self.embeddings[rows], [self.sources[i] for i in rows],
                      None if self.labels is None else self.labels[rows],
                      None if self.coords is None else self.coords[rows], self.name,
                      {k: v[rows] for k, v in self.cache.items() if isinstance(v, np.ndarray)},
                      None if self.verify_sources is None else [self.verify_sources[i] for i in rows], self.locate)

    @property
    def all_paths(self) -> bool:
        return all(isinstance(s, (str, os.PathLike)) for s in self.sources)


@dataclass
class Answer:
    """A method's answer for a set of photos."""

    method: str
    probs: np.ndarray  # (N, C) over `classes`
    classes: list[str]
    coords: np.ndarray | None = None  # (N, 2) lat/lon guesses; NaN where none
    level: str = "city"  # "city", or "country" for zero-shot on countries
    notes: str = ""
    label_map: np.ndarray | None = None  # city id -> this answer's class id (country level)
    extra: dict = field(default_factory=dict)

    def true_labels(self, city_labels: np.ndarray) -> np.ndarray:
        return np.asarray(city_labels) if self.label_map is None else self.label_map[np.asarray(city_labels)]

    def top(self, row: int, n: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs[row], kind="stable")[:n]
        return [(self.classes[c], float(self.probs[row, c])) for c in order]


_REGISTRY: dict[str, tuple[float, type]] = {}


def register_method(family: str, order: float):
    """Make a method class known by its family name ("knn", "classifier", ...): bench and the CLI offer every
    registered family, in `order`. A new method is one module of geoindex.methods using this decorator."""
    def decorator(cls):
        cls.family = family
        _REGISTRY[family] = (order, cls)
        return cls
    return decorator


def registered_methods() -> dict[str, type]:
    """Family name -> method class, in the order bench scores them."""
    return {family: cls for family, (_, cls) in sorted(_REGISTRY.items(), key=lambda item: item[1][0])}


class Method:
    """The base of every method: `predict(photos) -> Answer`; `predict_proba` is its (N, C) probabilities.

    A method that tunes anything has `fit(val_photos) -> self`, keeping what it chose in attributes ending in
    `_`; `name` says which method answered."""

    name: str = "method"

    def predict(self, photos: Photos) -> Answer:
        raise NotImplementedError

    def predict_proba(self, photos: Photos) -> np.ndarray:
        return self.predict(dataclasses.replace(photos, locate=False)).probs  # the same cache, no costly GPS work


def city_centres(train_meta, classes: list[str]) -> np.ndarray:
    """(C, 2): the spherical mean of each city's train photos, NaN for a city without coordinates.

    The GPS guess of a method that only names a city (a classifier, zero-shot) is its city's centre.
    """
    centres = np.full((len(classes), 2), np.nan)
    labels = train_meta["label"].to_numpy()
    lats, lons = train_meta["lat"].to_numpy(dtype=np.float64), train_meta["lon"].to_numpy(dtype=np.float64)
    for c in range(len(classes)):
        mine = labels == c
        if mine.any():
            centres[c] = gps_estimate(lats[mine], lons[mine])
    return centres
