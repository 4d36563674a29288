"""Street-level revisit protocol: does the index find the spot, not only the city?

Over an index's stored embeddings (no photo is embedded again), among the photos that carry a capture date
(`yyyymm`: a GSV-Cities file name, a CSV `yyyymm` or `date` column, or EXIF DateTimeOriginal) and coordinates:

* a **query** is a photo that has a capture of another date within 25 m and is the newest capture within 25 m
  of itself (photos sharing that newest date are all queries), drawn from the scored split only;
* its **gallery** is every dated, located photo of the index, all splits, except the query itself and every
  photo of the query's capture month (anywhere: a photo never matches another photo of its own capture date,
  so a same-drive neighbour 30 m along the street cannot help either). The query's spot is thus in the gallery
  only through older captures: another year, season, light, other cars. Photos without a date take no part.

For every query the nearest gallery photos (cosine, in kNN's tuned space: raw or whitened) give recall@1/5/10
within 25 m, and kNN's GPS answer from those neighbours is scored two ways: the city-level answer (a weighted
mean over the winning city's neighbours) and the street-level one (the best-supported cluster of neighbours
within 25 m of each other, `voting.street_clusters`), as `query` answers it: the street spot where the cluster's
support passes the threshold calibrated on val, else the city-level answer.

Calibration (`calibrate_street`, run by `geoindex train` and by `bench` when it tunes kNN) uses every dated val
photo as a query against the train and val photos under the same exclusions (never a test photo): the support
threshold is the lowest at which street-level answers are within 25 m at least STREET_PRECISION of the time,
and each level's `radius_m` is the 80th percentile error of its answers.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .data.records import SPLITS
from .methods.base import break_ties
from .voting import EARTH_RADIUS_KM, estimate_locations, haversine_km, street_clusters, vote, vote_weights

SPOT_M = 25.0
RECALL_AT = (1, 5, 10)
STREET_K = 10  # neighbours the street cluster is looked for among (at least; kNN's k when larger)
STREET_PRECISION = 0.8  # a street-level answer must be within 25 m this often on val
MIN_STREET_ANSWERS = 10  # fewer street answers than this on val cannot calibrate anything
RADIUS_QUANTILE = 0.8
ERROR_THRESHOLDS_M = (25, 100, 1000)
CALIBRATION_SAMPLE = 5000


def revisit_queries(lat, lon, yyyymm, radius_m: float = SPOT_M) -> np.ndarray:
    """True for each photo that has a capture of another date within radius_m and is the newest within radius_m."""
    from sklearn.neighbors import BallTree

    lat, lon, yyyymm = (np.asarray(a) for a in (lat, lon, yyyymm))
    usable = np.isfinite(lat.astype(np.float64)) & np.isfinite(lon.astype(np.float64)) & (yyyymm >= 0)
    out = np.zeros(len(lat), dtype=bool)
    rows = np.flatnonzero(usable)
    if not len(rows):
        return out
    points = np.radians(np.column_stack([lat[rows], lon[rows]]).astype(np.float64))
    near = BallTree(points, metric="haversine").query_radius(points, radius_m / 1000 / EARTH_RADIUS_KM)
    dates = yyyymm[rows]
    for i, found in enumerate(near):
        others = dates[found]
        out[rows[i]] = bool((others != dates[i]).any() and dates[i] >= others.max())
    return out


def masked_top_k(queries: np.ndarray, gallery: np.ndarray, query_rows: np.ndarray, query_dates: np.ndarray,
                 gallery_dates: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products per query over the gallery, leaving out the query's own row and every gallery
    row of the query's capture date; ids are -1 where fewer remain. Blocks of queries keep memory flat."""
    k = min(k, len(gallery))
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    if not k:
        return sims, ids
    gallery_rows = np.arange(len(gallery))
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ gallery.T
        stop = start + len(scores)
        scores[query_dates[start:stop, None] == gallery_dates[None, :]] = -np.inf
        scores[query_rows[start:stop, None] == gallery_rows[None, :]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
        ids[start:stop] = np.where(np.isfinite(top_scores), top, -1)
        sims[start:stop] = top_scores
    return sims, ids


class RevisitSet:
    """The dated, located photos of chosen splits of an index, in kNN's space: the protocol's table."""

    def __init__(self, index, knn, splits=SPLITS):
        tables, vectors = [], []
        for split in splits:
            if not index.store.count(split):
                continue
            meta = index.store.metadata(split)
            if "yyyymm" not in meta:
                continue
            keep = (meta["yyyymm"].to_numpy() >= 0) & np.isfinite(meta["lat"].to_numpy(dtype=np.float64)) \
                & np.isfinite(meta["lon"].to_numpy(dtype=np.float64))
            if not keep.any():
                continue
            tables.append(meta[keep].assign(split=split))
            vectors.append(index.store.embeddings(split, np.flatnonzero(keep)))
        self.table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
            columns=["path", "city", "label", "lat", "lon", "place_id", "yyyymm", "split"])
        embeddings = np.concatenate(vectors) if vectors else np.zeros((0, index.store.embed_dim), np.float32)
        space = knn.whitening(embeddings) if knn.whitening is not None and len(embeddings) else embeddings
        self.vectors = np.ascontiguousarray(space, dtype=np.float32)
        self.lat = self.table["lat"].to_numpy(dtype=np.float64)
        self.lon = self.table["lon"].to_numpy(dtype=np.float64)
        self.dates = self.table["yyyymm"].to_numpy(dtype=np.int64)
        self.labels = self.table["label"].to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def neighbours(self, rows: np.ndarray, k: int):
        """(similarities, table ids) of each row's k nearest allowed gallery photos."""
        return masked_top_k(self.vectors[rows], self.vectors, rows, self.dates[rows], self.dates, k)


def knn_answers(knn, sims, ids, lats, lons, labels, street: dict | None, probs=None):
    """What kNN answers from these neighbours (ids into lats/lons/labels, -1 for none): the city-level GPS, the
    street cluster (members: a mask over the first max(k, STREET_K) neighbours, `ids`), and the final answer."""
    k, street_k = knn.k, max(knn.k, STREET_K)
    safe = np.clip(ids, 0, None)
    n_lat = np.where(ids >= 0, lats[safe], np.nan)
    n_lon = np.where(ids >= 0, lons[safe], np.nan)
    n_labels = np.where(ids >= 0, labels[safe], -1)
    if probs is None:
        probs = break_ties(vote(n_labels[:, :k], sims[:, :k], len(knn.classes), knn.vote, knn.temperature),
                           n_labels[:, 0])
    city = estimate_locations(n_labels[:, :k], sims[:, :k], n_lat[:, :k], n_lon[:, :k], probs.argmax(1), knn.vote,
                              knn.temperature, knn.gps)
    weights = np.where(ids[:, :street_k] >= 0, vote_weights(sims[:, :street_k], knn.vote, knn.temperature), 0.0)
    members, support, centres = street_clusters(n_lat[:, :street_k], n_lon[:, :street_k], weights)
    threshold = (street or {}).get("threshold")
    at_street = np.isfinite(centres[:, 0]) & (support >= threshold) if threshold is not None else \
        np.zeros(len(sims), dtype=bool)
    final = np.where(at_street[:, None], centres, city)
    return {"city": city, "cluster": centres, "support": support, "members": members, "street": at_street,
            "final": final, "ids": ids[:, :street_k]}


def error_figures(pred, true_lat, true_lon) -> dict:
    metres = haversine_km(true_lat, true_lon, pred[:, 0], pred[:, 1]) * 1000
    metres = metres[np.isfinite(metres)]
    out = {"n_located": int(len(metres)), "median_m": float(np.median(metres)) if len(metres) else None}
    for t in ERROR_THRESHOLDS_M:
        out[f"within_{t}m"] = float((metres <= t).mean()) if len(metres) else None
    return out


def calibrate_street(index, knn) -> dict:
    """The support threshold for a street-level answer and each level's error radius, on val photos only."""
    data = RevisitSet(index, knn, splits=("train", "val"))
    rows = np.flatnonzero(data.table["split"].to_numpy() == "val") if len(data) else np.zeros(0, dtype=np.int64)
    if len(rows) > CALIBRATION_SAMPLE:
        rows = np.sort(np.random.default_rng(0).choice(rows, CALIBRATION_SAMPLE, replace=False))
    base = {"threshold": None, "radius_m": None, "city_radius_m": None, "precision_target": STREET_PRECISION,
            "calibrated_on": "val", "n_val": int(len(rows))}
    if len(rows) < MIN_STREET_ANSWERS or len(data) < 2:
        return base | {"note": f"{len(rows)} dated, located val photos: too few to calibrate a street-level answer on"}
    sims, ids = data.neighbours(rows, max(knn.k, STREET_K))
    answers = knn_answers(knn, sims, ids, data.lat, data.lon, data.labels, None)
    true_lat, true_lon = data.lat[rows], data.lon[rows]
    street_m = haversine_km(true_lat, true_lon, answers["cluster"][:, 0], answers["cluster"][:, 1]) * 1000
    city_m = haversine_km(true_lat, true_lon, answers["city"][:, 0], answers["city"][:, 1]) * 1000
    order = np.argsort(-answers["support"], kind="stable")
    hits = np.cumsum(np.nan_to_num(street_m[order], nan=np.inf) <= SPOT_M)
    precision = hits / np.arange(1, len(order) + 1)
    ok = np.flatnonzero((precision >= STREET_PRECISION) & (np.arange(1, len(order) + 1) >= MIN_STREET_ANSWERS))
    if not len(ok):
        finite = city_m[np.isfinite(city_m)]
        return base | {"city_radius_m": float(np.quantile(finite, RADIUS_QUANTILE)) if len(finite) else None,
                       "note": f"no support threshold makes street-level answers within {SPOT_M:g} m "
                               f"{STREET_PRECISION:.0%} of the time on val: every answer is city level"}
    last = int(ok[-1])
    threshold = float(answers["support"][order[last]])
    at_street = answers["support"] >= threshold
    street_err, city_err = street_m[at_street], city_m[~at_street]
    street_err, city_err = street_err[np.isfinite(street_err)], city_err[np.isfinite(city_err)]
    return base | {"threshold": threshold,
                   "radius_m": float(np.quantile(street_err, RADIUS_QUANTILE)) if len(street_err) else None,
                   "city_radius_m": float(np.quantile(city_err, RADIUS_QUANTILE)) if len(city_err) else None,
                   "val_street_share": float(at_street.mean()), "val_street_precision": float(precision[last])}


def revisit_report(index, knn, split: str = "test") -> dict:
    """The protocol on one split's queries: recall@1/5/10 within 25 m and the GPS answers' error."""
    data = RevisitSet(index, knn)
    rule = ("query: a dated photo of this split that has a capture of another date within 25 m and is the newest "
            "capture within 25 m of itself; gallery: every dated photo of the index (all splits) except the query "
            "and photos of its capture month")
    if not len(data):
        return {"split": split, "skipped": "no photo of the index carries both a capture date and coordinates",
                "rule": rule}
    is_query = revisit_queries(data.lat, data.lon, data.dates) & (data.table["split"].to_numpy() == split)
    rows = np.flatnonzero(is_query)
    if not len(rows):
        return {"split": split, "skipped": f"no {split} photo has an older capture of another date within 25 m",
                "rule": rule}
    k = max(max(RECALL_AT), knn.k, STREET_K)
    sims, ids = data.neighbours(rows, k)
    safe = np.clip(ids, 0, None)
    metres = haversine_km(data.lat[rows, None], data.lon[rows, None], data.lat[safe], data.lon[safe]) * 1000
    hit = (ids >= 0) & (metres <= SPOT_M)
    street = getattr(knn, "street", None)
    answers = knn_answers(knn, sims, ids, data.lat, data.lon, data.labels, street)
    true_lat, true_lon = data.lat[rows], data.lon[rows]
    allowed = len(data) - 1 - np.array([int((data.dates == d).sum()) - 1 for d in data.dates[rows]])
    return {
        "split": split, "rule": rule, "n_queries": int(len(rows)), "n_dated_photos": int(len(data)),
        "mean_gallery": float(allowed.mean()),
        "recall": {f"r@{n}_25m": float(hit[:, :n].any(axis=1).mean()) for n in RECALL_AT},
        "gps": {"city": error_figures(answers["city"], true_lat, true_lon),
                "cluster": error_figures(answers["cluster"], true_lat, true_lon),
                "answer": error_figures(answers["final"], true_lat, true_lon)},
        "street_share": float(answers["street"].mean()),
        "street_precision": float((error_figures(answers["final"][answers["street"]], true_lat[answers["street"]],
                                                 true_lon[answers["street"]])["within_25m"] or 0.0))
        if answers["street"].any() else None,
        "street": street,
    }
