"""The one metrics function every method is scored with, so figures are comparable by construction."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .voting import haversine_km


def evaluate(y_true, probs, classes, pred_coords=None, true_coords=None, k: int = 5) -> dict:
    """Score (N, C) class probabilities against integer labels.

    Returns accuracy, top-k accuracy, macro and weighted precision/recall/F1, per-class figures,
    the confusion matrix (rows = truth), and, given coordinates, great-circle error statistics.
    A class that is never predicted gets precision 0 (not an error).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probs must be (N={len(y_true)}, C={n_classes}); got {probs.shape}")
    y_pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    kk = min(k, n_classes)
    top_k = np.argsort(-probs, axis=1, kind="stable")[:, :kk]
    out = {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        f"top{k}_accuracy": float((top_k == y_true[:, None]).any(axis=1).mean()) if len(y_true) else float("nan"),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                        for i, c in enumerate(classes)}
    out["confusion"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    if pred_coords is not None and true_coords is not None:
        pred, true = np.asarray(pred_coords, dtype=np.float64), np.asarray(true_coords, dtype=np.float64)
        km = haversine_km(true[:, 0], true[:, 1], pred[:, 0], pred[:, 1])
        km = km[np.isfinite(km)]
        out.update({"median_km": float(np.median(km)) if len(km) else float("nan"),
                    "mean_km": float(np.mean(km)) if len(km) else float("nan"),
                    "within_1km": float((km <= 1).mean()) if len(km) else float("nan"),
                    "within_25km": float((km <= 25).mean()) if len(km) else float("nan"),
                    "n_located": int(len(km))})
    return out
