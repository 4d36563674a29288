"""kNN retrieval (IM2GPS-style): the nearest indexed photos vote for a city; their coordinates give the GPS guess.

The GPS guess is street level where the index holds the place: the best-supported cluster of neighbours within
25 m of each other (`voting.street_clusters`), when its support passes the threshold calibrated on val
(`revisit.calibrate_street`); else a city-level guess: that cluster's spot where its support passes a second, lower
threshold from val, else a weighted mean over the winning city's neighbours (`revisit.gps_answers`). The street
neighbours are re-scored by dense matching first where val chose to (`street["rerank"]`), and a neighbour that
spatial verification holds at val's inlier count is the answer itself (`_verified`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..voting import VOTE_METHODS, break_ties, vote
from .base import Answer, Method, Photos, register_method

K_GRID = (1, 3, 5, 10, 20, 30, 50)
TEMPERATURE_GRID = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
WHITEN_DIMS = (64, 128, 256, 512)
WHITEN_POWERS = (0.0, 0.5, 1.0)
WHITEN_MAX_TRAIN = 200_000  # above this, choosing the whitening on CPU costs more than it is worth here
VAL_SAMPLE = 5000
UNLIKE_QUANTILE = 0.01
IN_USE = object()  # neighbours() in the space answers use now


@dataclass(frozen=True)
class KNNSettings:
    """What kNN answers with: the values given to the constructor, or those `fit` chose."""

    k: int
    vote: str
    temperature: float
    gps: str
    whitening: object = None          # a whitening.Whitening; None: raw cosine
    unlike_threshold: float | None = None
    street: dict | None = None        # calibrate_street's threshold and radii; None: every GPS answer is city level
    street_whitening: object = None   # the street space; None: raw cosine
    tuned_on: str | None = None


@register_method("knn", order=0)
class KNNMethod(Method):
    """Votes of the k nearest train photos; ties go to the city of the nearest neighbour.

    An estimator in scikit-learn's sense: the constructor's arguments are kept as given (values loaded from a
    saved tuning are given this way); `fit(val)` returns self and stores what it chose in attributes ending in
    `_` (`k_`, `vote_`, `temperature_`, `whitening_`, `unlike_threshold_`, `street_`, `street_whitening_`,
    `tuned_on_`), with `best_params_` the saved summary. `settings` is what answers use: fitted, else given.
    """

    name = "knn"

    def __init__(self, index, k: int = 20, vote: str = "softmax", *, temperature: float = 0.05, gps: str = "mean",
                 unlike_threshold: float | None = None, tuned_on: str | None = None, whitening=None,
                 whitened_index=None, street: dict | None = None, street_whitening=None, street_index=None):
        if vote not in VOTE_METHODS:
            raise ValueError(f"unknown vote method {vote!r}; choose one of {', '.join(VOTE_METHODS)}")
        self.index, self.k, self.vote, self.temperature, self.gps = index, k, vote, temperature, gps
        self.unlike_threshold, self.tuned_on = unlike_threshold, tuned_on
        self.whitening, self._whitened_index = whitening, whitened_index
        self.street = street
        self.street_whitening, self._street_index = street_whitening, street_index
        self.classes = index.classes

    @property
    def fitted(self) -> bool:
        return hasattr(self, "best_params_")

    @property
    def settings(self) -> KNNSettings:
        if self.fitted:
            return KNNSettings(self.k_, self.vote_, self.temperature_, self.gps, self.whitening_,
                               self.unlike_threshold_, self.street_, self.street_whitening_, self.tuned_on_)
        return KNNSettings(self.k, self.vote, self.temperature, self.gps, self.whitening, self.unlike_threshold,
                           self.street, self.street_whitening, self.tuned_on)

    @property
    def params(self) -> dict:
        s = self.settings
        whiten = None if s.whitening is None else {"dims": s.whitening.dims, "power": s.whitening.power}
        return {"k": s.k, "vote": s.vote, "temperature": s.temperature, "gps": s.gps, "whiten": whiten,
                "unlike_threshold": s.unlike_threshold, "tuned_on": s.tuned_on, "street": s.street}

    @property
    def whitened_index(self):
        """FAISS over the whitened train embeddings (built from the stored ones the first time it is needed)."""
        space = self.settings.whitening
        if self._whitened_index is None and space is not None:
            from ..whitening import flat_index
            self._whitened_index = flat_index(space(self.index.store.embeddings("train")))
        return self._whitened_index

    @property
    def street_index(self):
        """FAISS over the train embeddings in the street space, when that space is a whitening (built once)."""
        space = self.settings.street_whitening
        if self._street_index is None and space is not None:
            from ..whitening import flat_index
            self._street_index = flat_index(space(self.index.store.embeddings("train")))
        return self._street_index

    def street_neighbours(self, photos: Photos, k: int, similarities: bool = False):
        """(scores, train row ids) of the k nearest train photos in the street space, cached per set: their
        similarities, except that where the street calibration re-scores them by dense matching
        (`street["rerank"]`) and the photos are being located, the first `rerank["k"]` come re-scored and re-sorted
        (`revisit.rerank_street`). similarities=True: the search's similarities, in that order (what answers
        report)."""
        from ..revisit import STREET_K

        weight, depth, _ = self._rescoring() if photos.locate else (None, None, None)
        width = min(max(k, STREET_K, depth or 0), max(1, self.index.store.count("train")))  # a small index: fewer
        space = self.settings.street_whitening
        space_key = None if space is None else (space.dims, space.power)
        key = ("street-neighbours", space_key)
        cached = photos.cache.get(key)
        if cached is None or cached[0].shape[1] < width:
            if space is None:
                cached = self.index.search(photos.embeddings, width)
            else:
                cached = self.street_index.search(space(photos.embeddings), width)
            photos.cache[key] = cached
        if weight and len(cached[0]):
            rescored = ("street-rescored", space_key, cached[0].shape[1], depth)
            if rescored not in photos.cache:
                photos.cache[rescored] = self._rescored(photos, cached, weight, depth)
            cached = photos.cache[rescored]
        scores = cached[2] if similarities and len(cached) > 2 else cached[0]
        return scores[:, :k], cached[1][:, :k]

    def _rescoring(self) -> tuple[float | None, int | None, str | None]:
        """(the dense re-scoring weight and how many street neighbours it re-scores, as val chose them, where this
        process can re-score as it was calibrated: the same matcher, its weights and OpenCV at hand; why it cannot,
        where it was calibrated re-scored); (None, None, None) where val chose no re-scoring."""
        rerank = (self.settings.street or {}).get("rerank") or {}
        if not rerank.get("weight"):
            return None, None, None
        from ..revisit import rerank_depth
        from ..verification import DenseMatcher, dense_unavailable, shared_dense_matcher

        if rerank.get("matcher", DenseMatcher.name) != DenseMatcher.name:
            return None, None, f"calibrated with another dense matcher ({rerank['matcher']})"
        if shared_dense_matcher() is None:
            return None, None, dense_unavailable()
        return float(rerank["weight"]), rerank_depth(rerank), None

    def _rescored(self, photos: Photos, found, weight: float, depth: int):
        """The search's street neighbours with the first `depth` re-scored by dense matching, and their own
        similarities in that order."""
        from ..revisit import dense_inliers, rescore_shortlist
        from ..verification import shared_dense_matcher

        matcher = shared_dense_matcher()
        sims, ids = found
        sources = photos.sources if photos.verify_sources is None else photos.verify_sources
        inliers = dense_inliers(matcher, sources, ids, self.index.train_meta["path"].to_numpy(), depth)
        return rescore_shortlist(sims, ids, inliers, weight)

    def _search(self, embeddings: np.ndarray, k: int, space, space_index):
        if space is None:
            return self.index.search(embeddings, k)
        k = min(k, space_index.ntotal)
        sims, ids = space_index.search(space(embeddings), k)
        return sims, ids

    def neighbours(self, photos: Photos, k: int | None = None, space=IN_USE, space_index=None):
        """(similarities, train row ids, labels) of the k nearest train photos, cached per set and space: the
        space in use, or (fit trying them) `space` (None: raw cosine, else a whitening with its FAISS index)."""
        if space is IN_USE:
            space, space_index = self.settings.whitening, self.whitened_index
        k = k or self.settings.k
        key = ("knn-neighbours", None if space is None else (space.dims, space.power))
        cached = photos.cache.get(key)
        if cached is None or cached[0].shape[1] < k:
            cached = self._search(photos.embeddings, k, space, space_index)
            photos.cache[key] = cached
        sims, ids = cached[0][:, :k], cached[1][:, :k]
        return sims, ids, self._labels(ids)

    def _labels(self, ids):
        train_labels = self.index.train_meta["label"].to_numpy()
        return np.where(ids >= 0, train_labels[np.clip(ids, 0, None)], -1)

    def _probs(self, sims, labels, k, vote_method, temperature):
        probs = vote(labels[:, :k], sims[:, :k], len(self.classes), vote_method, temperature)
        return break_ties(probs, labels[:, 0])

    def predict(self, photos: Photos) -> Answer:
        from ..revisit import STREET_K, city_answers, gps_answers, street_answers

        s = self.settings
        sims, ids, labels = self.neighbours(photos)
        probs = self._probs(sims, labels, s.k, s.vote, s.temperature)
        meta = self.index.train_meta
        lats, lons = meta["lat"].to_numpy(dtype=np.float64), meta["lon"].to_numpy(dtype=np.float64)
        train_labels = meta["label"].to_numpy()
        coords = city_answers(self, sims, ids, lats, lons, train_labels, probs)
        street = s.street or {}
        lost = self._rescoring()[2] if photos.locate else None
        if lost:
            # the thresholds were set on re-scored neighbours: on the search's order they would not keep their
            # precision, so cluster answers stay city level (a verified photo still answers: the same 10 are checked)
            street = {**street, "threshold": None, "spot_threshold": None}
        extra = {}
        at_street = np.zeros(len(sims), dtype=bool)
        if (street.get("threshold") is not None or street.get("spot_threshold") is not None) and len(sims):
            found = street_answers(*self.street_neighbours(photos, STREET_K), lats, lons, street.get("threshold"),
                                   train_labels, probs.argmax(1))
            at_street = found["street"]
            coords = gps_answers(coords, found, street.get("spot_threshold"))
            extra = {"gps_support": found["support"], "street_members": found["members"], "street_ids": found["ids"],
                     "street_similarities": self.street_neighbours(photos, STREET_K, similarities=True)[0]}
        radius = np.where(at_street, street.get("radius_m") or np.nan, street.get("city_radius_m") or np.nan)
        verify = street.get("verify") or {}
        if verify.get("inliers") is not None and len(sims) and photos.locate:
            verified = self._verified(photos, verify, extra, train_labels, probs.argmax(1), lats, lons)
            if verified is not None:
                spot, inliers = verified
                at = np.clip(spot, 0, None)
                coords = np.where(spot[:, None] >= 0, np.column_stack([lats[at], lons[at]]), coords)
                at_street = at_street | (spot >= 0)
                radius = np.where(spot >= 0, verify.get("radius_m") or np.nan, radius)
                extra["gps_inliers"] = inliers
        unlike = (sims[:, 0] < s.unlike_threshold) if s.unlike_threshold is not None else np.zeros(len(sims), bool)
        notes = f"k={s.k}, {s.vote} vote" + (f", T={s.temperature:g}" if s.vote == "softmax" else "")
        if s.tuned_on:
            notes += f" (tuned on {s.tuned_on})"
        if lost:
            notes += f"; GPS clusters at city level: street neighbours cannot be re-scored as calibrated ({lost})"
        return Answer(self.name, probs, self.classes, coords, notes=notes,
                      extra={"similarities": sims, "ids": ids, "unlike": unlike,
                             "gps_level": np.where(at_street, "street", "city"), "gps_radius_m": radius, **extra})

    def _verified(self, photos: Photos, verify: dict, extra: dict, train_labels, winners, lats, lons):
        """Spatial verification of the street space's first neighbours (geoindex.verification): (the verified
        train row per photo, -1 where none holds verify["inliers"], and its inlier count), or None without
        OpenCV. Only a located photo of the city the vote chose counts, as for the street cluster. Where one is
        verified, `extra`'s street cluster becomes that one photo: the answer's basis."""
        from ..revisit import STREET_K, verified_mask, verified_neighbours
        from ..verification import shared_verifier

        verifier = shared_verifier()
        if verifier is None:
            return None
        # the neighbours the cluster is found among, with their own similarities
        sims, ids = self.street_neighbours(photos, STREET_K, similarities=True)
        space = self.settings.street_whitening
        key = ("street-inliers", None if space is None else (space.dims, space.power))
        if key not in photos.cache:  # a hybrid answer asks kNN again for the same photos
            sources = photos.sources if photos.verify_sources is None else photos.verify_sources
            photos.cache[key] = verifier.shortlist_inliers(list(sources), ids, self.index.train_meta["path"].to_numpy())
        chosen, counts, column = verified_neighbours(photos.cache[key], ids, train_labels, winners)
        rows = np.arange(len(ids))
        located = np.isfinite(lats[np.clip(chosen, 0, None)]) & np.isfinite(lons[np.clip(chosen, 0, None)])
        spot = np.where(verified_mask(counts, verify) & located, chosen, -1)
        if (spot >= 0).any():
            only = np.zeros(ids.shape, dtype=bool)
            only[rows, column] = True
            members = extra.get("street_members", np.zeros(ids.shape, dtype=bool))
            extra |= {"street_members": np.where((spot >= 0)[:, None], only, members), "street_ids": ids,
                      "street_similarities": sims}
            support = extra.get("gps_support", np.full(len(ids), np.nan))
            extra["gps_support"] = np.where(spot >= 0, np.nan, support)  # the answer is no cluster's share
        return spot, np.where(spot >= 0, counts, 0)

    def fit(self, val: Photos) -> "KNNMethod":
        """Choose, on validation photos, the space (raw, or whitened with a dimension and power), k, the vote and
        its temperature (accuracy, then log-loss; the simpler choice on ties), and the "unlike anything
        indexed" threshold: the top-1 similarity that 99% of validation photos exceed. Returns self."""
        if val.labels is None or len(val) == 0:
            raise ValueError("fitting kNN needs labelled validation photos")
        if len(val) > VAL_SAMPLE:
            val = val.subset(np.sort(np.random.default_rng(0).choice(len(val), VAL_SAMPLE, replace=False)))
        k_max = min(max(K_GRID), self.index.ntotal)
        spaces, fitted = [None], None
        store = getattr(self.index, "store", None)
        if store is not None and 2 * max(K_GRID) < self.index.ntotal <= WHITEN_MAX_TRAIN:
            from ..whitening import Whitening
            # Every axis is kept (the eigendecomposition costs the same): the street space tries them all.
            train = store.embeddings("train")
            fitted = Whitening.fit(train, max_dims=train.shape[1])
            dims = sorted({min(d, fitted.axes.shape[0]) for d in WHITEN_DIMS})
            spaces += [fitted.using(d, p) for d in dims for p in WHITEN_POWERS]
        best_key, best = None, None
        from ..whitening import flat_index
        for space in spaces:
            space_index = None if space is None else flat_index(space(train))
            sims, ids, labels = self.neighbours(val, k_max, space, space_index)
            for k in [k for k in K_GRID if k <= k_max]:
                for vote_method, temps in (("majority", (1.0,)), ("weighted", (1.0,)), ("softmax", TEMPERATURE_GRID)):
                    for t in temps:
                        probs = self._probs(sims, labels, k, vote_method, t)
                        acc = float((probs.argmax(1) == val.labels).mean())
                        nll = float(-np.log(np.clip(probs[np.arange(len(val)), val.labels], 1e-6, 1)).mean())
                        key = (round(acc, 6), round(-nll, 6))
                        if best_key is None or key > best_key:
                            best_key, best = key, (space, k, vote_method, t, sims[:, 0].copy())
        self.whitening_, self.k_, self.vote_, self.temperature_, top1 = best
        self._whitened_index = None
        self.unlike_threshold_ = float(np.quantile(top1, UNLIKE_QUANTILE))
        self.tuned_on_ = val.name
        self.street_, self.street_whitening_ = self.street, self.street_whitening
        self.val_accuracy_ = best_key[0]
        self.best_params_ = {}  # fitted from here on: calibrate_street reads the choices above through `settings`
        if val.name == "val" and hasattr(store, "metadata"):  # a stored index (not a bare vector set) has dates to use
            from ..revisit import calibrate_street
            self.street_, self.street_whitening_ = calibrate_street(self.index, self, fitted)
            self._street_index = None
        self.best_params_ = self.params | {"val_accuracy": self.val_accuracy_}
        return self
