"""Tuning on the validation split, saved beside the index so `query`, `bench` and the service all use it.

heads/knn/params.json (k, vote, temperature, whitening dims and power, the unlike-anything threshold, the
street-level GPS answer's support threshold and error radii (`street`, geoindex.revisit), the split that chose them), heads/knn/whitening.npz (mean, axes, scales: plain arrays) and heads/knn/whitened.faiss
(the train embeddings in the whitened space, so a query does not rebuild it).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import GeoindexError
from .fileio import write_json_atomic

KNN_DIR = Path("heads") / "knn"
KNN_PARAMS = KNN_DIR / "params.json"
WHITENING = KNN_DIR / "whitening.npz"
WHITENED_INDEX = KNN_DIR / "whitened.faiss"
SAVED_KEYS = ("k", "vote", "temperature", "unlike_threshold", "tuned_on", "street")


def tune_knn(index, log=print) -> dict:
    """Choose kNN's space (raw or whitened), k, vote and temperature, and the "unlike anything indexed"
    threshold, on val; save them with the index."""
    from .methods import KNNMethod, Photos
    from .search import save_index

    if not index.store.count("val"):
        raise GeoindexError(f"index {index.name!r} has no validation split to tune kNN on")
    knn = KNNMethod(index)
    params = knn.fit(Photos.of_split(index, "val"))
    folder = Path(index.path)
    for stale in (WHITENING, WHITENED_INDEX):
        (folder / stale).unlink(missing_ok=True)
    if knn.whitening is not None:
        knn.whitening.save(folder / WHITENING)
        save_index(knn.whitened_index, folder / WHITENED_INDEX)
    write_json_atomic(folder / KNN_PARAMS, params)
    space = "raw embeddings" if knn.whitening is None else \
        f"whitened to {knn.whitening.dims} dims (power {knn.whitening.power:g})"
    log(f"kNN tuned on val: {space}, k={params['k']}, {params['vote']} vote"
        + (f", temperature {params['temperature']:g}" if params["vote"] == "softmax" else "")
        + f" (val accuracy {params['val_accuracy']:.3f}); photos whose nearest match is below similarity "
        f"{params['unlike_threshold']:.3f} are flagged as unlike anything indexed")
    log(street_summary(params.get("street")))
    return params


def street_summary(street: dict | None) -> str:
    """One line on the street-level GPS answer's calibration, for train's and bench's logs."""
    if not street or street.get("threshold") is None:
        why = (street or {}).get("note", "not calibrated")
        return f"GPS answers stay city level: {why}"
    return (f"GPS answers are street level where the best cluster of neighbours holds {street['threshold']:.3f} of the "
            f"vote weight (calibrated on val: within 25 m {street['val_street_precision']:.0%} of the time on "
            f"{street['val_street_share']:.0%} of val photos; radius {street['radius_m']:.0f} m, else city level, "
            f"radius {(street.get('city_radius_m') or float('nan')) / 1000:.1f} km)")


def load_knn_tuning(index) -> dict:
    """KNNMethod keyword arguments saved by tune_knn, or {} (the defaults) when none are saved or they are unusable."""
    folder = Path(index.path)
    try:
        saved = json.loads((folder / KNN_PARAMS).read_text())
    except (OSError, ValueError):
        return {}
    params = {k: saved[k] for k in SAVED_KEYS if k in saved}
    if saved.get("whiten"):
        from .methods.whitening import Whitening
        from .search import load_index_file
        try:
            params["whitening"] = Whitening.load(folder / WHITENING)
            whitened = folder / WHITENED_INDEX
            if whitened.is_file():
                loaded = load_index_file(whitened)
                if loaded.ntotal == index.ntotal and loaded.d == params["whitening"].dims:
                    params["whitened_index"] = loaded
        except (OSError, ValueError, KeyError, RuntimeError):
            return {}  # a damaged tuning file: fall back to the untuned defaults rather than answer wrongly
    return params
