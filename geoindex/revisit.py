"""Street-level revisit protocol: does the index find the spot, not only the city?

Over an index's stored embeddings (no photo is embedded again), among the photos that carry a capture date
(`yyyymm`: a GSV-Cities file name, a CSV `yyyymm` or `date` column, or EXIF DateTimeOriginal) and coordinates:

* a **query** is a photo that has a capture of another date within 25 m and is the newest capture within 25 m
  of itself (photos sharing that newest date are all queries), drawn from the scored split only;
* its **gallery** is every dated, located photo of the index, all splits, except the query itself and every
  photo of the query's capture month (anywhere: a photo never matches another photo of its own capture date,
  so a same-drive neighbour 30 m along the street cannot help either). The query's spot is thus in the gallery
  only through older captures: another year, season, light, other cars. Photos without a date take no part.

For every query the nearest gallery photos in the street space (below) give recall@1/5/10 within 25 m, and
kNN's GPS answer is scored three ways: the city-level answer (a weighted mean over the winning city's neighbours,
found in kNN's own space), the best street cluster always (the best-supported cluster of the nearest STREET_K
neighbours within 25 m of each other, `voting.street_clusters`), and the answer `query` gives: the cluster's spot
where its support passes the threshold calibrated on val (street level), else a city-level point: the cluster's
spot where its support passes a second, lower threshold from val, else the mean above (`gps_answers`).

Calibration (`calibrate_street`, run by `geoindex train` and by `bench` when it tunes kNN) asks every dated val
photo against the train and val photos under the same exclusions, and again against the train photos alone (what
`query` searches, where a split by place or cell never holds its place); never a test photo. It chooses the
street space (raw cosine, or PCA whitening learnt on the train photos with a dimension and power: the space
that tells cities apart is rarely the one that tells corners apart) and the support threshold: the lowest at
which street-level answers are within 25 m at least STREET_PRECISION of the time, the space being the one where
that covers the most val photos; then the second threshold, below which a city-level answer is the mean rather
than the cluster's spot: the one that puts the most val answers within 25 m, 1 km and 25 km, summed over the three
scales; each level's `radius_m` is the 80th percentile error of its val answers. Where dense matching is at hand
(`verification.DenseMatcher`), the first k street neighbours are first re-scored by it (`rerank_street`) at the
depth k and weight val chooses by the street space's rule (`calibrate_rerank`): a spot the search ranks 60th can
then come first. The cluster is found among the first STREET_K of the re-scored order, and everything after is set
on that order.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .data.records import SPLITS
from .voting import (EARTH_RADIUS_KM, break_ties, estimate_locations, haversine_km, street_clusters, vote,
                     vote_weights)

SPOT_M = 25.0
RECALL_AT = (1, 5, 10)
STREET_K = 10  # neighbours the street cluster is looked for among
STREET_TEMPERATURE = 0.05  # softmax weights of those neighbours (0.02-0.1 gave the same on the London photos)
STREET_DIMS = (256, 512, 1024, 2048)  # whitened street spaces tried on val, plus every axis, at each power
STREET_POWERS = (0.5, 1.0)
STREET_WHITEN_MAX_TRAIN = 50_000  # above this, the whitened spaces cost more than they are worth here: raw cosine
STREET_PRECISION = 0.8  # a street-level answer must be within 25 m this often on val
MIN_STREET_ANSWERS = 10  # fewer street answers than this on val cannot calibrate anything
RADIUS_QUANTILE = 0.8
ERROR_THRESHOLDS_M = (25, 100, 1000)
CALIBRATION_SAMPLE = 5000
VERIFY_SAMPLE = 1000  # val photos verified when calibrating (each against 2 x STREET_K neighbours)
RERANK_SAMPLE = 1000  # at most this many val photos calibrate the street answer once dense matching re-scores it
RERANK_WEIGHTS = (0.0, 0.03, 0.1, 0.3, 1.0)  # dense inliers / 100 added to a street neighbour's similarity
# how many street neighbours dense matching re-scores (the cluster is then found among the first STREET_K): on the
# London photos the spot is among the first 10 for 0.42 of val revisits and among the first 100 for 0.62
RERANK_DEPTHS = (STREET_K, 25, 50, 100)
RULE = ("query: a dated photo of this split that has a capture of another date within 25 m and is the newest capture "
        "within 25 m of itself; gallery: every dated photo of the index (all splits) except the query and photos of "
        "its capture month")


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
                 gallery_dates: np.ndarray, k: int, block: int = 256, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products per query over the gallery (only its `allowed` rows, when given), leaving out
    the query's own row and every gallery row of the query's capture date; ids are -1 where fewer remain. Blocks
    of queries keep memory flat."""
    k = min(k, len(gallery))
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    if not k:
        return sims, ids
    gallery_rows = np.arange(len(gallery))
    block = max(1, min(block, (1 << 26) // len(gallery)))  # a block's scores stay under 256 MB
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ gallery.T
        stop = start + len(scores)
        scores[query_dates[start:stop, None] == gallery_dates[None, :]] = -np.inf
        scores[query_rows[start:stop, None] == gallery_rows[None, :]] = -np.inf
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
        ids[start:stop] = np.where(np.isfinite(top_scores), top, -1)
        sims[start:stop] = top_scores
    return sims, ids


def recall_within(neighbour_ids: np.ndarray, lat, lon, rows: np.ndarray) -> dict:
    """recall@1/5/10 within SPOT_M: the share of query rows with a neighbour (ids into lat/lon, -1 for none)
    that close among the first n."""
    metres = haversine_km(lat[rows][:, None], lon[rows][:, None], lat[np.clip(neighbour_ids, 0, None)],
                          lon[np.clip(neighbour_ids, 0, None)]) * 1000
    hit = (neighbour_ids >= 0) & (metres <= SPOT_M)
    return {f"r@{n}_25m": float(hit[:, :n].any(axis=1).mean()) if len(rows) else float("nan") for n in RECALL_AT}


class RevisitSet:
    """The dated, located photos of chosen splits of an index (their stored embeddings): the protocol's table."""

    def __init__(self, index, splits=SPLITS):
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
        self.embeddings = np.concatenate(vectors) if vectors else np.zeros((0, index.store.embed_dim), np.float32)
        self.lat = self.table["lat"].to_numpy(dtype=np.float64)
        self.lon = self.table["lon"].to_numpy(dtype=np.float64)
        self.dates = self.table["yyyymm"].to_numpy(dtype=np.int64)
        self.labels = self.table["label"].to_numpy(dtype=np.int64)
        self._spaces: dict = {}
        self._projection = None

    def __len__(self) -> int:
        return len(self.table)

    def rows_of(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.table["split"].to_numpy() == split) if len(self) else np.zeros(0, dtype=np.int64)

    def vectors(self, space=None) -> np.ndarray:
        """The embeddings in a space: raw (None) or a Whitening. Whitenings sharing their axes (one fit at several
        dimensions and powers) share one projection, so trying many costs little more than trying one."""
        key = None if space is None else (id(space.axes), space.dims, space.power)
        if key not in self._spaces:
            if space is None or not len(self.embeddings):
                self._spaces[key] = np.ascontiguousarray(self.embeddings, dtype=np.float32)
            else:
                if self._projection is None or self._projection[0] is not space.axes:
                    projected = (self.embeddings - space.mean) @ space.axes.T
                    self._projection = (space.axes, projected.astype(np.float32))
                scale = (space.singular[:space.dims] / space.singular[0]) ** space.power
                x = self._projection[1][:, :space.dims] / scale
                x /= np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
                self._spaces = {k: v for k, v in self._spaces.items() if k is None}  # one whitened copy at a time
                self._spaces[key] = np.ascontiguousarray(x, dtype=np.float32)
        return self._spaces[key]

    def neighbours(self, rows: np.ndarray, k: int, space=None, gallery_splits=None):
        """(similarities, table ids) of each row's k nearest allowed gallery photos in a space (of gallery_splits
        only, when given)."""
        vectors = self.vectors(space)
        allowed = None if gallery_splits is None else self.table["split"].isin(gallery_splits).to_numpy()
        return masked_top_k(vectors[rows], vectors, rows, self.dates[rows], self.dates, k, allowed=allowed)


def _at(ids, values, fill):
    return np.where(ids >= 0, values[np.clip(ids, 0, None)], fill)


def city_answers(knn, sims, ids, lats, lons, labels, probs=None, with_winners: bool = False):
    """kNN's city-level GPS guess from its neighbours (ids into lats/lons/labels, -1 for none): the weighted
    mean over the winning city's neighbours (and, with_winners, the winning city ids)."""
    s = knn.settings
    k = s.k
    n_labels = _at(ids, labels, -1)
    if probs is None:
        probs = break_ties(vote(n_labels[:, :k], sims[:, :k], len(knn.classes), s.vote, s.temperature),
                           n_labels[:, 0])
    winners = probs.argmax(1)
    coords = estimate_locations(n_labels[:, :k], sims[:, :k], _at(ids, lats, np.nan)[:, :k],
                                _at(ids, lons, np.nan)[:, :k], winners, s.vote, s.temperature, s.gps)
    return (coords, winners) if with_winners else coords


def street_answers(sims, ids, lats, lons, threshold: float | None, labels=None, winners=None) -> dict:
    """The best-supported cluster among the first STREET_K street neighbours; whether it lies in the winning
    city (given labels and the kNN vote's winners; `in_city`), and where it is street level: in the city, with
    support passing the threshold (`street`)."""
    sims, ids = sims[:, :STREET_K], ids[:, :STREET_K]
    weights = np.where(ids >= 0, vote_weights(np.where(ids >= 0, sims, -np.inf), "softmax", STREET_TEMPERATURE), 0.0)
    members, support, centres = street_clusters(_at(ids, lats, np.nan), _at(ids, lons, np.nan), weights)
    in_city = np.isfinite(centres[:, 0])
    if labels is not None and winners is not None and len(sims):
        first = np.argmax(members, axis=1)  # the cluster's most similar photo names its city
        in_city &= _at(ids[np.arange(len(ids)), first], labels, -1) == winners
    at_street = in_city & (support >= threshold) if threshold is not None else np.zeros(len(sims), dtype=bool)
    return {"members": members, "support": support, "centre": centres, "street": at_street, "in_city": in_city,
            "ids": ids, "similarities": sims}


SPOT_SCALES_M = (SPOT_M, 1_000.0, 25_000.0)  # street, neighbourhood, city: what the city-level point is chosen for


def gps_answers(city, cluster: dict, spot_threshold: float | None = None) -> np.ndarray:
    """The GPS answer for each query: the cluster's spot where it is street level; elsewhere the city-level point:
    the best cluster (IM2GPS's largest cluster of neighbours, a spot a photo was taken at) where it lies in the
    winning city and its support reaches spot_threshold (chosen on val), else the weighted mean over the winning
    city's neighbours."""
    spot = spot_mask(cluster["street"], cluster["in_city"], cluster["support"], spot_threshold)
    return np.where(spot[:, None], cluster["centre"], city)


def spot_mask(street, in_city, support, spot_threshold: float | None) -> np.ndarray:
    """Which answers are the cluster's spot: the street-level ones, and those in the city above spot_threshold."""
    if spot_threshold is None:
        return np.asarray(street, dtype=bool)
    return street | (in_city & (support >= spot_threshold))


def spot_calibration(support, threshold: float | None, spot_m, city_m) -> tuple[float | None, int, np.ndarray]:
    """On val answers (support -inf where the cluster is not in the winning city; errors in metres of the
    cluster's spot and of the mean): the spot threshold for the answers below the street-level threshold, how
    many answers it moves to the spot, and which answers are street level."""
    at_street = support >= threshold if threshold is not None else np.zeros(len(support), dtype=bool)
    return (*choose_spot_threshold(np.where(at_street, -np.inf, support), spot_m, city_m), at_street)


def choose_spot_threshold(support, spot_m, city_m) -> tuple[float | None, int]:
    """The support at or above which a city-level answer is better given as the cluster's spot than as the mean:
    the one that puts the most val answers within each of SPOT_SCALES_M, summed over the scales (None: the mean
    always), and how many answers it moves to the spot."""
    order = np.argsort(-support, kind="stable")
    order = order[np.isfinite(support[order])]
    if not len(order):
        return None, 0
    spot_m, city_m = np.nan_to_num(spot_m[order], nan=np.inf), np.nan_to_num(city_m[order], nan=np.inf)
    gain = np.cumsum(sum((spot_m <= scale).astype(int) - (city_m <= scale) for scale in SPOT_SCALES_M))
    ranked = support[order]
    gain[:-1][ranked[1:] == ranked[:-1]] = np.iinfo(gain.dtype).min  # `support >= t` moves a run of ties whole
    best = int(np.argmax(gain))  # the first of equal gains: the fewest answers moved
    return (float(support[order[best]]), best + 1) if gain[best] > 0 else (None, 0)


def error_figures(pred, true_lat, true_lon) -> dict:
    metres = haversine_km(true_lat, true_lon, pred[:, 0], pred[:, 1]) * 1000
    metres = metres[np.isfinite(metres)]
    out = {"n_located": int(len(metres)), "median_m": float(np.median(metres)) if len(metres) else None}
    for t in ERROR_THRESHOLDS_M:
        out[f"within_{t}m"] = float((metres <= t).mean()) if len(metres) else None
    return out


def street_spaces(index, fitted=None) -> list:
    """Raw cosine, and (for indexes of up to STREET_WHITEN_MAX_TRAIN train photos) whitenings learnt on train
    (`fitted`, a Whitening fit on the train photos with every axis, when the caller has one already)."""
    spaces = [None]
    if 2 * STREET_K < index.store.count("train") <= STREET_WHITEN_MAX_TRAIN:
        from .whitening import Whitening
        if fitted is None or len(fitted.singular) < min(index.store.embed_dim, index.store.count("train") - 1):
            fitted = Whitening.fit(index.store.embeddings("train"), max_dims=index.store.embed_dim)
        dims = sorted({min(d, len(fitted.singular)) for d in STREET_DIMS} | {len(fitted.singular)})
        spaces += [fitted.using(d, p) for d in dims for p in STREET_POWERS]
    return spaces


def lowest_precise_threshold(scores, hits) -> tuple[float | None, int]:
    """The lowest score at which answers scoring at or above it are within 25 m STREET_PRECISION of the time, with
    at least MIN_STREET_ANSWERS of them, and how many answers that is; (None, 0): no such score. Runs of equal
    scores move whole: `>=` cannot cut a tie."""
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    counts = np.arange(1, len(order) + 1)
    precision = np.cumsum(hits[order]) / counts
    run_ends = np.append(ranked[1:] != ranked[:-1], True)
    ok = np.flatnonzero(run_ends & (precision >= STREET_PRECISION) & (counts >= MIN_STREET_ANSWERS))
    if not len(ok):
        return None, 0
    return ranked[ok[-1]].item(), int(ok[-1] + 1)


def _quantile(values) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.quantile(values, RADIUS_QUANTILE)) if len(values) else None


GALLERIES = (("held", None), ("open", ("train",)))  # train + val photos; train photos only (what `query` searches)


def street_shortlists(data: RevisitSet, rows, space, k: int = STREET_K) -> list:
    """(similarities, table ids) of the first k neighbours of val rows in a street space, per GALLERIES."""
    return [data.neighbours(rows, k, space, gallery) for _, gallery in GALLERIES]


def space_calibration(data: RevisitSet, rows, winners, space, shortlists=None):
    """One street space on val rows asked against both GALLERIES (or the given street_shortlists, re-scored):
    (threshold or None, street answers it makes, support (-inf where the cluster is not in the winning city),
    error in metres, within 25 m), both galleries concatenated."""
    shortlists = shortlists or street_shortlists(data, rows, space)
    found = [street_answers(sims, ids, data.lat, data.lon, -np.inf, data.labels,
                            winners[i * len(rows):(i + 1) * len(rows)])
             for i, (sims, ids) in enumerate(shortlists)]
    centre = np.concatenate([f["centre"] for f in found])
    eligible = np.concatenate([f["in_city"] for f in found])
    support = np.where(eligible, np.concatenate([f["support"] for f in found]), -np.inf)
    street_m = haversine_km(np.tile(data.lat[rows], 2), np.tile(data.lon[rows], 2), centre[:, 0], centre[:, 1]) * 1000
    hits = np.nan_to_num(street_m, nan=np.inf) <= SPOT_M
    threshold, covered = lowest_precise_threshold(support[eligible], hits[eligible])
    return threshold, covered, support, street_m, hits


def val_winners(data: RevisitSet, rows, knn):
    """kNN's city answers and winning cities for val rows against both GALLERIES, concatenated."""
    city, winners = [], []
    for _, gallery in GALLERIES:
        sims, ids = data.neighbours(rows, knn.settings.k, knn.settings.whitening, gallery)
        coords, won = city_answers(knn, sims, ids, data.lat, data.lon, data.labels, with_winners=True)
        city.append(coords)
        winners.append(won)
    return np.concatenate(city), np.concatenate(winners)


def rerank_street(sims, ids, inliers, weight: float):
    """The street shortlist re-scored by dense matching: each neighbour's similarity plus weight x its dense
    inliers / 100, re-sorted (equal scores keep the search's order; missing neighbours, -1, stay last)."""
    fused = np.where(ids >= 0, sims + weight * inliers / 100.0, -np.inf).astype(np.float32)
    order = np.argsort(-fused, axis=1, kind="stable")
    return np.take_along_axis(fused, order, 1), np.take_along_axis(ids, order, 1)


def rescore_shortlist(sims, ids, inliers, weight: float):
    """A shortlist of any width with its first inliers.shape[1] neighbours re-scored (rerank_street) and the rest
    as searched: (scores, ids, each neighbour's own similarity in the new order)."""
    depth = inliers.shape[1]
    head_scores, head_ids = rerank_street(sims[:, :depth], ids[:, :depth], inliers, weight)
    moved = _source_columns(ids[:, :depth], head_ids)
    return (np.hstack([head_scores, sims[:, depth:]]), np.hstack([head_ids, ids[:, depth:]]),
            np.hstack([np.take_along_axis(sims[:, :depth], moved, 1), sims[:, depth:]]))


def _source_columns(before, after) -> np.ndarray:
    """For each row, the column of `before` each entry of `after` (a permutation of the row) came from; missing
    neighbours (-1, which re-scoring keeps last and in order) map onto the missing columns in order."""
    order_before = np.argsort(before, axis=1, kind="stable")
    rank_after = np.argsort(np.argsort(after, axis=1, kind="stable"), axis=1, kind="stable")
    return np.take_along_axis(order_before, rank_after, 1)


def rerank_depth(rerank: dict | None) -> int:
    """How many street neighbours a calibration re-scores (`rerank["k"]`; STREET_K for indexes from before the
    depth was chosen)."""
    return int((rerank or {}).get("k") or STREET_K)


def dense_inliers(matcher, sources, ids, paths, depth: int = STREET_K) -> np.ndarray:
    """Dense-matching inliers (Q, depth) between photos (paths, images or LocalFeatures) and their first `depth`
    street neighbours (ids into paths, -1 for none); a progress bar where there are many (bench's test photos)."""
    return matcher.shortlist_inliers(list(sources), ids[:, :depth], paths,
                                     progress="dense matching street neighbours")


def calibrate_rerank(data: RevisitSet, rows, winners, space) -> tuple[dict, np.ndarray | None, list | None]:
    """How dense matching (geoindex.verification.DenseMatcher) re-scores the street shortlist: how many neighbours
    (`k`, of RERANK_DEPTHS) at what weight (of RERANK_WEIGHTS; 0: not at all), the pair under which the street
    answer covers the most val photos at STREET_PRECISION, then puts the most within 25 m (the rule the street
    space is chosen by), on at most RERANK_SAMPLE val photos asked against both GALLERIES; on ties the fewer
    neighbours (each costs a match per query), then the lower weight. Returns (the JSON-able choice, the sample's
    positions in rows, the re-scored shortlists' first STREET_K per gallery, or None where the search's order
    stands)."""
    from .verification import DenseMatcher, dense_unavailable, shared_dense_matcher

    matcher = shared_dense_matcher()
    out = {"weight": None, "k": STREET_K, "matcher": DenseMatcher.name}
    if matcher is None:
        return out | {"note": f"{dense_unavailable()}: the street shortlist is not re-scored"}, None, None
    take = np.arange(len(rows))
    if len(rows) > RERANK_SAMPLE:
        take = np.sort(np.random.default_rng(0).choice(len(rows), RERANK_SAMPLE, replace=False))
    rows, winners = rows[take], winners[np.concatenate([take, take + len(winners) // 2])]
    paths = data.table["path"].to_numpy()
    deepest = max(RERANK_DEPTHS)
    shortlists = street_shortlists(data, rows, space, deepest)
    deepest = shortlists[0][1].shape[1]  # a gallery smaller than the deepest depth
    # both shortlists of a photo in one pass: its features and the neighbours they share are computed once
    inliers = matcher.shortlist_inliers(list(paths[rows]), np.concatenate([ids for _, ids in shortlists], axis=1),
                                        paths, progress="dense matching val's street neighbours")
    inliers = [inliers[:, g * deepest:(g + 1) * deepest] for g in range(len(shortlists))]
    tried, best = [], None
    settings = [(STREET_K, 0.0)] + [(depth, weight) for depth in RERANK_DEPTHS if depth <= max(deepest, STREET_K)
                                    for weight in RERANK_WEIGHTS if weight > 0]
    for depth, weight in settings:
        scored = [rerank_street(sims[:, :depth], ids[:, :depth], found[:, :depth], weight)
                  for (sims, ids), found in zip(shortlists, inliers)]
        scored = [(sims[:, :STREET_K], ids[:, :STREET_K]) for sims, ids in scored]
        _, covered, _, _, hits = space_calibration(data, rows, winners, space, scored)
        first = recall_within(scored[0][1], data.lat, data.lon, rows)["r@1_25m"]  # against train + val photos
        key = (covered, float(hits[:len(rows)].mean()))
        tried.append({"k": depth, "weight": weight, "street_answers": int(covered), "cluster_within_25m": key[1],
                      "first_within_25m": first})
        if best is None or key > best[0]:
            best = (key, depth, weight, scored)
    _, depth, weight, scored = best
    out |= {"n_val": int(len(rows)), "tried": tried}
    if weight == 0:
        return out | {"note": "re-scoring by dense matching did not help on val"}, take, None
    return out | {"weight": float(weight), "k": int(depth)}, take, scored


def calibrate_street(index, knn, fitted=None) -> tuple[dict, object]:
    """On val photos only: the street space, the support threshold for a street-level answer, the lower spot
    threshold above which a city-level answer is the cluster's spot (choose_spot_threshold), and each level's error
    radius (the city level's over its spot and mean answers alike). Returns (the JSON-able parameters, the street
    space's Whitening or None for raw cosine).

    Each val photo is asked twice: against the train and val photos (where the index mostly holds its place,
    through other captures) and against the train photos only, what `query` searches (with a split by place or
    map cell, never its place). The threshold must keep street-level answers within 25 m STREET_PRECISION of the
    time over both, so a cluster of look-alikes somewhere else does not pass for the spot; the spot threshold is
    chosen over both as well, since a gallery built from new photos (`--features-from`) holds spots as the first
    half does, and the second half makes a look-alike cluster cost what it costs on an unindexed place."""
    data = RevisitSet(index, splits=("train", "val"))
    rows = data.rows_of("val")
    if len(rows) > CALIBRATION_SAMPLE:
        rows = np.sort(np.random.default_rng(0).choice(rows, CALIBRATION_SAMPLE, replace=False))
    base = {"space": None, "threshold": None, "spot_threshold": None, "radius_m": None, "city_radius_m": None,
            "precision_target": STREET_PRECISION, "k": STREET_K, "temperature": STREET_TEMPERATURE,
            "calibrated_on": "val", "n_val": int(len(rows))}
    if len(rows) < MIN_STREET_ANSWERS or len(data) < 2 or not (data.table["split"] == "train").any():
        return base | {"note": f"{len(rows)} dated, located val photos: too few to calibrate a street-level "
                               f"answer on"}, None
    true_lat, true_lon = np.tile(data.lat[rows], 2), np.tile(data.lon[rows], 2)
    city, winners = val_winners(data, rows, knn)
    city_m = haversine_km(true_lat, true_lon, city[:, 0], city[:, 1]) * 1000
    best = None
    for space in street_spaces(index, fitted):
        threshold, covered, support, street_m, hits = space_calibration(data, rows, winners, space)
        key = (covered, float(hits[:len(rows)].mean()))
        if best is None or key > best[0]:
            best = (key, space, threshold, support, street_m, hits)
    (covered, hit_rate), space, threshold, support, street_m, hits = best
    base["space"] = None if space is None else {"dims": int(space.dims), "power": float(space.power)}
    base["rerank"], take, shortlists = calibrate_rerank(data, rows, winners, space)
    if shortlists is not None:  # re-scored on a sample of val: every threshold below is set on the same photos
        both = np.concatenate([take, take + len(rows)])  # each val photo is asked against both galleries
        rows, winners, city = rows[take], winners[both], city[both]
        true_lat, true_lon = np.tile(data.lat[rows], 2), np.tile(data.lon[rows], 2)
        city_m = haversine_km(true_lat, true_lon, city[:, 0], city[:, 1]) * 1000
        threshold, covered, support, street_m, hits = space_calibration(data, rows, winners, space, shortlists)
        hit_rate = float(hits[:len(rows)].mean())
        base["n_val"] = int(len(rows))
    base["val_cluster_within_25m"] = hit_rate
    spot_threshold, moved, at_street = spot_calibration(support, threshold, street_m, city_m)
    at_spot = spot_mask(at_street, np.isfinite(support), support, spot_threshold)
    city_level_m = np.where(at_spot, street_m, city_m)[~at_street]
    base |= {"spot_threshold": spot_threshold, "city_radius_m": _quantile(city_level_m),
             "val_city_level_at_spot": moved / max(1, int((~at_street).sum()))}
    base["verify"] = calibrate_verification(data, rows, winners, space, shortlists)
    if threshold is None:
        return base | {"note": f"no support threshold makes street-level answers within {SPOT_M:g} m "
                               f"{STREET_PRECISION:.0%} of the time on val: every answer is city level"}, space
    held, n = at_street[:len(rows)], len(rows)
    return base | {"threshold": threshold, "radius_m": _quantile(street_m[at_street]),
                   "val_street_share": float(held.mean()), "val_street_share_train_only": float(at_street[n:].mean()),
                   "val_street_precision": float(hits[at_street].mean())}, space


def verified_neighbours(inliers, ids, labels, winners):
    """From the inliers (Q, K) each query's neighbours (ids into labels, -1 for none) share with it: the
    best-verified neighbour among those in the city the vote chose (a photo elsewhere never answers, however many
    inliers it holds, and never hides the next best in the city), its inlier count (-1 where no neighbour is in
    that city), and its column."""
    from .verification import best_verified

    winners = np.broadcast_to(np.ravel(winners), (len(ids),))  # one per query; a scalar for all
    in_city = (ids >= 0) & (_at(ids, labels, -1) == winners[:, None])
    column, best = best_verified(np.where(in_city, inliers, -1))
    rows = np.arange(len(ids))
    chosen = ids[rows, column] if len(ids) else np.zeros(0, dtype=np.int64)
    return chosen, np.where(in_city[rows, column], best, -1), column


def verified_mask(counts, verify: dict | None) -> np.ndarray:
    """Which answers stand on a verified photo: counts at or above the calibrated inliers (none uncalibrated)."""
    inliers = (verify or {}).get("inliers")
    return counts >= inliers if inliers is not None else np.zeros(len(counts), dtype=bool)


def inliers_threshold(counts, hits) -> int | None:
    """The lowest inlier count at which verified answers are precise enough (lowest_precise_threshold, over the
    answers with any inlier); None: none."""
    some = counts > 0
    threshold, _ = lowest_precise_threshold(counts[some], hits[some])
    return None if threshold is None else int(threshold)


def calibrate_verification(data: RevisitSet, rows, winners, space, shortlists=None) -> dict:
    """The inlier count at or above which a spatially verified neighbour (geoindex.verification) is the GPS
    answer, at street level: the lowest at which such answers are within 25 m STREET_PRECISION of the time on
    val, asked against both GALLERIES like the street threshold, a verified photo counting only in the city the
    vote chose. {"inliers": None, "note": why} where none qualifies or OpenCV is missing."""
    from .verification import shared_verifier

    verifier = shared_verifier()
    if verifier is None:
        return {"inliers": None, "note": "OpenCV is not installed (pip install opencv-python-headless): "
                                         "no spatial verification"}
    take = np.arange(len(rows))
    if len(rows) > VERIFY_SAMPLE:
        take = np.sort(np.random.default_rng(0).choice(len(rows), VERIFY_SAMPLE, replace=False))
    paths = data.table["path"].to_numpy()
    shortlists = ([ids[take] for _, ids in shortlists] if shortlists is not None
                  else [ids for _, ids in street_shortlists(data, rows[take], space)])
    # both shortlists of a photo in one pass: its features and the neighbours they share are computed once
    inliers = verifier.shortlist_inliers(list(paths[rows[take]]), np.concatenate(shortlists, axis=1), paths,
                                         progress="verifying val's street neighbours")
    counts, metres = [], []
    for g, ids in enumerate(shortlists):
        chosen, best, _ = verified_neighbours(inliers[:, g * STREET_K:(g + 1) * STREET_K], ids, data.labels,
                                              winners[g * len(rows) + take])
        counts.append(best)
        metres.append(haversine_km(data.lat[rows[take]], data.lon[rows[take]], _at(chosen, data.lat, np.nan),
                                   _at(chosen, data.lon, np.nan)) * 1000)
    counts, metres = np.concatenate(counts), np.nan_to_num(np.concatenate(metres), nan=np.inf)
    hits = metres <= SPOT_M
    chosen_threshold = inliers_threshold(counts, hits)
    out = {"k": STREET_K, "n_val": int(len(take)), "precision_target": STREET_PRECISION}
    if chosen_threshold is None:
        return out | {"inliers": None, "note": f"no inlier count makes verified answers within {SPOT_M:g} m "
                                               f"{STREET_PRECISION:.0%} of the time on val"}
    answered, n = counts >= chosen_threshold, len(take)
    return out | {"inliers": chosen_threshold, "radius_m": _quantile(metres[answered]),
                  "val_share": float(answered[:n].mean()), "val_share_train_only": float(answered[n:].mean()),
                  "val_precision": float(hits[answered].mean())}


def revisit_report(index, knn, split: str = "test") -> dict:
    """The protocol on one split's queries: recall@1/5/10 within 25 m and the GPS answers' error."""
    data = RevisitSet(index)
    if not len(data):
        return {"split": split, "skipped": "no photo of the index carries both a capture date and coordinates",
                "rule": RULE}
    is_query = revisit_queries(data.lat, data.lon, data.dates) & (data.table["split"].to_numpy() == split)
    rows = np.flatnonzero(is_query)
    if not len(rows):
        return {"split": split, "skipped": f"no {split} photo has an older capture of another date within 25 m",
                "rule": RULE}
    true_lat, true_lon = data.lat[rows], data.lon[rows]
    street = knn.settings.street or {}
    weight = (street.get("rerank") or {}).get("weight")
    depth = rerank_depth(street.get("rerank")) if weight else STREET_K
    k = max(max(RECALL_AT), STREET_K, depth)

    def recall(space):
        sims, ids = data.neighbours(rows, k, space)
        return recall_within(ids, data.lat, data.lon, rows), sims, ids

    street_space = knn.settings.street_whitening
    city_sims, city_ids = data.neighbours(rows, knn.settings.k, knn.settings.whitening)
    city, winners = city_answers(knn, city_sims, city_ids, data.lat, data.lon, data.labels, with_winners=True)
    knn_recall = recall(knn.settings.whitening)[0]
    street_recall, sims, ids = recall(street_space)
    search_recall = None
    if weight:
        from .verification import shared_dense_matcher

        matcher = shared_dense_matcher()
        if matcher is not None:  # as `query` answers: the first `depth` re-scored by dense matching
            paths = data.table["path"].to_numpy()
            sims, ids, _ = rescore_shortlist(sims, ids, dense_inliers(matcher, paths[rows], ids, paths, depth),
                                             weight)
            search_recall, street_recall = street_recall, recall_within(ids, data.lat, data.lon, rows)
    cluster = street_answers(sims, ids, data.lat, data.lon, street.get("threshold"), data.labels, winners)
    final = gps_answers(city, cluster, street.get("spot_threshold"))
    at_street = cluster["street"]
    unverified, verified = final, None
    if (street.get("verify") or {}).get("inliers") is not None:
        from .verification import shared_verifier

        verifier = shared_verifier()
        if verifier is not None:
            paths = data.table["path"].to_numpy()
            shortlist = ids[:, :STREET_K]
            chosen, counts, _ = verified_neighbours(verifier.shortlist_inliers(list(paths[rows]), shortlist, paths),
                                                    shortlist, data.labels, winners)
            verified = verified_mask(counts, street["verify"])
            final = np.where(verified[:, None], np.column_stack([_at(chosen, data.lat, np.nan),
                                                                 _at(chosen, data.lon, np.nan)]), final)
            at_street = at_street | verified
    same_date = pd.Series(data.dates).value_counts()
    gallery = len(data) - same_date.reindex(data.dates[rows]).to_numpy()  # everything but the query's capture month
    return {
        "split": split, "rule": RULE, "n_queries": int(len(rows)), "n_dated_photos": int(len(data)),
        "mean_gallery": float(gallery.mean()),
        "street_space": None if street_space is None else {"dims": int(street_space.dims),
                                                           "power": float(street_space.power)},
        "recall": street_recall, "recall_knn_space": knn_recall,
        **({"recall_before_rescoring": search_recall} if search_recall is not None else {}),
        "gps": {"city": error_figures(city, true_lat, true_lon),
                "cluster": error_figures(cluster["centre"], true_lat, true_lon),
                "answer": error_figures(final, true_lat, true_lon),
                **({"answer_unverified": error_figures(unverified, true_lat, true_lon)} if verified is not None else {})},
        "verified_share": None if verified is None else float(verified.mean()),
        "street_share": float(at_street.mean()),
        "street_precision": error_figures(final[at_street], true_lat[at_street], true_lon[at_street])["within_25m"],
        "street": street or None,
    }
