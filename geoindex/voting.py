"""From neighbours to a city: votes as per-city probabilities, and a GPS estimate.

Votes are returned as an (n_queries, n_classes) probability matrix, the same form every other
method produces, so the one metrics function scores them all.
"""
from __future__ import annotations

import numpy as np

VOTE_METHODS = ("majority", "weighted", "softmax")
EARTH_RADIUS_KM = 6371.0088


def vote(neighbour_labels: np.ndarray, similarities: np.ndarray, n_classes: int, method: str = "softmax",
         temperature: float = 0.05) -> np.ndarray:
    """Per-city probabilities from k neighbours' labels (Q, k) and cosine similarities (Q, k).

    majority: one vote each; weighted: votes weighted by max(similarity, 0); softmax: weights
    exp(similarity / temperature), which lets the closest matches dominate. Labels < 0 (FAISS's
    "no neighbour") are ignored.
    """
    if method not in VOTE_METHODS:
        raise ValueError(f"unknown vote method {method!r}; choose one of {', '.join(VOTE_METHODS)}")
    labels = np.asarray(neighbour_labels)
    valid = labels >= 0
    weights = vote_weights(np.where(valid, similarities, -np.inf), method, temperature) * valid
    probs = np.zeros((labels.shape[0], n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(labels.shape[0]), labels.shape[1])
    np.add.at(probs, (rows[valid.ravel()], labels.ravel()[valid.ravel()]), weights.ravel()[valid.ravel()])
    totals = probs.sum(axis=1, keepdims=True)
    return np.divide(probs, totals, out=np.full_like(probs, 1.0 / n_classes), where=totals > 0)


def _to_xyz(lat, lon):
    lat, lon = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    lat1, lon1, lat2, lon2 = map(np.radians, (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def gps_estimate(lats, lons, weights=None, method: str = "mean") -> tuple[float, float]:
    """Weighted spherical mean (safe across the date line) or medoid of coordinates; NaN if none."""
    lats, lons = np.asarray(lats, dtype=np.float64), np.asarray(lons, dtype=np.float64)
    weights = np.ones_like(lats) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = np.isfinite(lats) & np.isfinite(lons) & (weights > 0)
    if not keep.any():
        return float("nan"), float("nan")
    lats, lons, weights = lats[keep], lons[keep], weights[keep]
    if method == "medoid":
        distances = haversine_km(lats[:, None], lons[:, None], lats[None, :], lons[None, :])
        best = int(np.argmin(distances @ weights))
        return float(lats[best]), float(lons[best])
    if method != "mean":
        raise ValueError(f"unknown GPS method {method!r}; choose mean or medoid")
    x, y, z = (_to_xyz(lats, lons) * weights[:, None]).sum(axis=0)
    return float(np.degrees(np.arctan2(z, np.hypot(x, y)))), float(np.degrees(np.arctan2(y, x)))


def vote_weights(similarities: np.ndarray, method: str = "softmax", temperature: float = 0.05) -> np.ndarray:
    """The weight each neighbour carries, the same as in `vote` (used again for the GPS estimate)."""
    sims = np.asarray(similarities, dtype=np.float64)
    if method == "majority":
        return np.ones_like(sims)
    if method == "weighted":
        return np.clip(sims, 0, None) + 1e-12
    top = np.max(sims, axis=-1, keepdims=True)
    return np.exp((sims - np.where(np.isfinite(top), top, 0.0)) / temperature)


def estimate_locations(neighbour_labels, similarities, lats, lons, winners, method="softmax", temperature=0.05,
                       gps_method="mean") -> np.ndarray:
    """(Q, 2) lat/lon: the winning city's neighbours only, weighted like their votes."""
    weights = vote_weights(similarities, method, temperature)
    out = np.full((len(winners), 2), np.nan)
    for q, winner in enumerate(winners):
        mask = np.asarray(neighbour_labels[q]) == winner
        out[q] = gps_estimate(lats[q][mask], lons[q][mask], weights[q][mask], gps_method)
    return out


STREET_RADIUS_M = 25.0


def street_clusters(lats, lons, weights, radius_m: float = STREET_RADIUS_M):
    """The best-supported spot among each query's neighbours: (members (Q, k) bool, support (Q,), centre (Q, 2)).

    A neighbour's ball is every neighbour within radius_m of it; the cluster is the ball holding the most vote
    weight (ties: the nearer neighbour's ball), and its support is that weight's share of all k neighbours'.
    The answer is the cluster's weighted medoid (a spot a photo was taken at; its weighted mean scored the same on
    the London revisits), so one street corner outvotes neighbours spread over a city, which a mean over the
    city's neighbours would average away.
    """
    lats, lons = np.atleast_2d(np.asarray(lats, dtype=np.float64)), np.atleast_2d(np.asarray(lons, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_queries, k = lats.shape
    members = np.zeros((n_queries, k), dtype=bool)
    support = np.zeros(n_queries)
    centres = np.full((n_queries, 2), np.nan)
    for q in range(n_queries):
        usable = np.flatnonzero(np.isfinite(lats[q]) & np.isfinite(lons[q]) & (weights[q] > 0))
        if not usable.size:
            continue
        la, lo, w = lats[q, usable], lons[q, usable], weights[q, usable]
        ball = haversine_km(la[:, None], lo[:, None], la[None, :], lo[None, :]) * 1000 <= radius_m
        held = ball @ w
        best = int(np.argmax(held))
        mine = ball[best]
        members[q, usable[mine]] = True
        support[q] = held[best] / w.sum()
        centres[q] = gps_estimate(la[mine], lo[mine], w[mine], "medoid")
    return members, support, centres


def break_ties(probs: np.ndarray, preferred: np.ndarray) -> np.ndarray:
    """Where several classes share the top probability, give the win to `preferred[q]` if it is among them
    (kNN: the nearest neighbour's city) by the smallest nudge, so every argmax downstream agrees."""
    probs = np.array(probs, dtype=np.float64, copy=True)
    top = probs.max(axis=1, keepdims=True)
    tied = np.isclose(probs, top, rtol=0, atol=1e-12)
    rows = np.flatnonzero(tied.sum(axis=1) > 1)
    for q in rows:
        p = preferred[q]
        if p >= 0 and tied[q, p]:
            probs[q, p] += 1e-9
            probs[q] /= probs[q].sum()
    return probs
