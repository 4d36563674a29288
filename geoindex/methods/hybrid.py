"""Fusion of methods' city probabilities by a weighted sum of log-probabilities, weights chosen on val only."""
from __future__ import annotations

import itertools

import numpy as np

from ..errors import NotFittedError
from .base import Answer, Method, Photos, register_method


def fuse(parts: list[np.ndarray], weights) -> np.ndarray:
    logp = sum(w * np.log(np.clip(p, 1e-9, 1)) for w, p in zip(weights, parts))
    logp = logp - logp.max(axis=1, keepdims=True)
    probs = np.exp(logp)
    return probs / probs.sum(axis=1, keepdims=True)


def choose_weights(parts_val: list[np.ndarray], y_val: np.ndarray, step: float = 0.1):
    """Grid over the simplex: best validation accuracy, ties broken by lower validation log-loss."""
    n, ticks = len(parts_val), int(round(1 / step))
    best, best_key = None, None
    for combo in itertools.product(range(ticks + 1), repeat=n):
        if sum(combo) != ticks:
            continue
        weights = [c / ticks for c in combo]
        fused = fuse(parts_val, weights)
        nll = float(-np.log(np.clip(fused[np.arange(len(y_val)), y_val], 1e-12, 1)).mean())
        key = (float((fused.argmax(1) == y_val).mean()), -nll)
        if best_key is None or key > best_key:
            best, best_key = weights, key
    return best, best_key[0]


@register_method("hybrid", order=3)
class HybridMethod(Method):
    """Fuses city-level methods; `fit` on the validation split is required before `predict`.

    fit(val) returns self with `weights_` (one per part), `tuned_on_`, `val_accuracy_` and `best_params_` (the
    summary bench reports)."""

    name = "hybrid"

    def __init__(self, index, parts: list):
        self.index, self.parts = index, parts
        self.classes = index.classes

    def fit(self, val: Photos) -> "HybridMethod":
        weights, acc = choose_weights([p.predict_proba(val) for p in self.parts], val.labels)
        self.weights_, self.tuned_on_, self.val_accuracy_ = weights, val.name, acc
        self.best_params_ = {"weights": dict(zip([p.name for p in self.parts], weights)), "val_accuracy": acc,
                             "tuned_on": val.name}
        return self

    def predict(self, photos: Photos) -> Answer:
        if not hasattr(self, "weights_"):
            raise NotFittedError("HybridMethod.fit(val) must run first: fusion weights are chosen on validation photos")
        answers = [p.predict(photos) for p in self.parts]
        probs = fuse([a.probs for a in answers], self.weights_)
        knn = next((a for a in answers if a.method == "knn"), None)
        coords = self.index.city_centres[probs.argmax(1)]
        if knn is not None:  # where the fused city agrees with kNN, kNN's finer GPS guess stands
            agree = knn.probs.argmax(1) == probs.argmax(1)
            coords = np.where(agree[:, None], knn.coords, coords)
        notes = "log-prob fusion " + ", ".join(f"{p.name}={w:.1f}" for p, w in zip(self.parts, self.weights_))
        return Answer(self.name, probs, self.classes, coords, notes=notes + f" (weights tuned on {self.tuned_on_})")
