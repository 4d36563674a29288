"""The one metrics function every method is scored with, so figures are comparable by construction.

Rules that keep a figure from flattering:
* top-k counts a hit only where the true class scored above zero and fewer than k classes scored
  higher, and exists only for k below the number of classes (with 2 classes "top-5" means nothing);
* macro averages run over the classes present in the scored set, not every class the index knows;
* distances use the great circle, reported at the geolocation literature's thresholds and down to the street
  (within 25 m and 100 m, where a classifier that answers a city's centre scores about zero), with n_located;
* figures that cannot be computed are None (strict JSON), never NaN.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .voting import haversine_km

TOP_K = (3, 5)
KM_THRESHOLDS = (1, 25, 200, 750, 2500)
STREET_THRESHOLDS_M = (25, 100)


def top_k_hits(y_true: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """True where the true class has probability > 0 and fewer than k classes score strictly higher."""
    true_p = probs[np.arange(len(y_true)), y_true]
    higher = (probs > true_p[:, None]).sum(axis=1)
    return (true_p > 0) & (higher < k)


def distance_figures(pred_coords, true_coords) -> dict:
    """Median and mean great-circle error and the share within each threshold, over photos both located."""
    pred, true = np.asarray(pred_coords, dtype=np.float64), np.asarray(true_coords, dtype=np.float64)
    km = haversine_km(true[:, 0], true[:, 1], pred[:, 0], pred[:, 1])
    km = km[np.isfinite(km)]
    out = {"n_located": int(len(km)), "median_km": float(np.median(km)) if len(km) else None,
           "mean_km": float(np.mean(km)) if len(km) else None}
    for t in STREET_THRESHOLDS_M:
        out[f"within_{t}m"] = float((km <= t / 1000).mean()) if len(km) else None
    for t in KM_THRESHOLDS:
        out[f"within_{t}km"] = float((km <= t).mean()) if len(km) else None
    return out


def evaluate(y_true, probs, classes, pred_coords=None, true_coords=None) -> dict:
    """Score (N, C) class probabilities against integer labels.

    Returns accuracy, top-k accuracy (k in TOP_K below C), macro and weighted precision/recall/F1 over
    the classes present, per-class figures, the confusion matrix (rows = truth, all classes), and,
    given coordinates, great-circle error figures. Ties in probs go to the lower class id, so methods
    must break their own ties (kNN: by the nearest neighbour) before handing probabilities here.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probs must be (N={len(y_true)}, C={n_classes}); got {probs.shape}")
    n = len(y_true)
    y_pred = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    present = np.unique(y_true)
    out = {"n": int(n), "accuracy": float((y_pred == y_true).mean()) if n else None,
           "classes_present": int(len(present))}
    for k in TOP_K:
        if k < n_classes:
            out[f"top{k}_accuracy"] = float(top_k_hits(y_true, probs, k).mean()) if n else None
    for average in ("macro", "weighted"):
        if n:
            p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=average,
                                                         zero_division=0)
        else:
            p = r = f = None
        out.update({f"{average}_precision": None if p is None else float(p),
                    f"{average}_recall": None if r is None else float(r), f"{average}_f1": None if f is None else float(f)})
    labels = np.arange(n_classes)
    if n:
        p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    else:
        p = r = f = support = np.zeros(n_classes)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                        for i, c in enumerate(classes)}
    out["confusion"] = confusion_matrix(y_true, y_pred, labels=labels).tolist() if n else [[0] * n_classes] * n_classes
    if pred_coords is not None and true_coords is not None:
        out.update(distance_figures(pred_coords, true_coords))
    return out
