"""kNN retrieval (IM2GPS-style): the nearest indexed photos vote for a city; their coordinates give the GPS guess."""
from __future__ import annotations

import numpy as np

from ..voting import VOTE_METHODS, estimate_locations, vote
from .base import Answer, Photos, break_ties

K_GRID = (1, 3, 5, 10, 20, 50)
TEMPERATURE_GRID = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
UNLIKE_QUANTILE = 0.01


class KNNMethod:
    """Votes of the k nearest train photos; ties go to the city of the nearest neighbour."""

    name = "knn"

    def __init__(self, index, k: int = 20, vote: str = "softmax", temperature: float = 0.05, gps: str = "mean",
                 unlike_threshold: float | None = None, tuned_on: str | None = None):
        if vote not in VOTE_METHODS:
            raise ValueError(f"unknown vote method {vote!r}; choose one of {', '.join(VOTE_METHODS)}")
        self.index, self.k, self.vote, self.temperature, self.gps = index, k, vote, temperature, gps
        self.unlike_threshold, self.tuned_on = unlike_threshold, tuned_on
        self.classes = index.classes

    @property
    def params(self) -> dict:
        return {"k": self.k, "vote": self.vote, "temperature": self.temperature, "gps": self.gps,
                "unlike_threshold": self.unlike_threshold, "tuned_on": self.tuned_on}

    def neighbours(self, photos: Photos, k: int | None = None):
        """(similarities, train row ids, labels) of the k nearest train photos, cached per set."""
        k = k or self.k
        cached = photos.cache.get("knn-neighbours")
        if cached is None or cached[0].shape[1] < k:
            cached = self.index.search(photos.embeddings, k)
            photos.cache["knn-neighbours"] = cached
        sims, ids = cached[0][:, :k], cached[1][:, :k]
        return sims, ids, self._labels(ids)

    def _labels(self, ids):
        train_labels = self.index.train_meta["label"].to_numpy()
        return np.where(ids >= 0, train_labels[np.clip(ids, 0, None)], -1)

    def _probs(self, sims, labels, k, vote_method, temperature):
        probs = vote(labels[:, :k], sims[:, :k], len(self.classes), vote_method, temperature)
        return break_ties(probs, labels[:, 0])

    def predict(self, photos: Photos) -> Answer:
        sims, ids, labels = self.neighbours(photos)
        probs = self._probs(sims, labels, self.k, self.vote, self.temperature)
        meta = self.index.train_meta
        safe = np.clip(ids, 0, None)
        lats, lons = meta["lat"].to_numpy()[safe], meta["lon"].to_numpy()[safe]
        coords = estimate_locations(labels, sims, lats, lons, probs.argmax(1), self.vote, self.temperature, self.gps)
        unlike = (sims[:, 0] < self.unlike_threshold) if self.unlike_threshold is not None else np.zeros(len(sims), bool)
        notes = f"k={self.k}, {self.vote} vote" + (f", T={self.temperature:g}" if self.vote == "softmax" else "")
        if self.tuned_on:
            notes += f" (tuned on {self.tuned_on})"
        return Answer(self.name, probs, self.classes, coords, notes=notes,
                      extra={"similarities": sims, "ids": ids, "unlike": unlike})

    def predict_proba(self, photos: Photos) -> np.ndarray:
        return self.predict(photos).probs

    def fit(self, val: Photos) -> dict:
        """Choose k and the vote temperature on validation photos (accuracy, then log-loss), and the
        "unlike anything indexed" threshold: the top-1 similarity that 99% of validation photos exceed."""
        if val.labels is None or len(val) == 0:
            raise ValueError("fitting kNN needs labelled validation photos")
        k_max = min(max(K_GRID), self.index.ntotal)
        sims, ids, labels = self.neighbours(val, k_max)
        best_key, best = None, None
        for k in [k for k in K_GRID if k <= k_max]:
            for vote_method, temps in (("softmax", TEMPERATURE_GRID), ("majority", (1.0,)), ("weighted", (1.0,))):
                for t in temps:
                    probs = self._probs(sims, labels, k, vote_method, t)
                    acc = float((probs.argmax(1) == val.labels).mean())
                    nll = float(-np.log(np.clip(probs[np.arange(len(val)), val.labels], 1e-6, 1)).mean())
                    key = (round(acc, 6), -nll)
                    if best_key is None or key > best_key:
                        best_key, best = key, (k, vote_method, t)
        self.k, self.vote, self.temperature = best
        self.unlike_threshold = float(np.quantile(sims[:, 0], UNLIKE_QUANTILE))
        self.tuned_on = val.name
        return self.params | {"val_accuracy": best_key[0]}
