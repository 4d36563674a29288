"""Tuning on the validation split, saved beside the index so `query`, `bench` and the service all use it."""
from __future__ import annotations

from pathlib import Path

from .errors import GeoindexError
from .fileio import write_json_atomic

KNN_PARAMS = Path("heads") / "knn" / "params.json"


def tune_knn(index, log=print) -> dict:
    """Choose kNN's k, vote and temperature, and the "unlike anything indexed" threshold, on val; save them."""
    from .bench import split_photos

    if not index.store.count("val"):
        raise GeoindexError(f"index {index.name!r} has no validation split to tune kNN on")
    knn = index.knn_method()
    knn.k, knn.vote, knn.temperature, knn.tuned_on = 20, "softmax", 0.05, None
    params = knn.fit(split_photos(index, "val"))
    write_json_atomic(Path(index.path) / KNN_PARAMS, params)
    log(f"kNN tuned on val: k={params['k']}, {params['vote']} vote, temperature {params['temperature']:g} "
        f"(val accuracy {params['val_accuracy']:.3f}); photos whose nearest match is below similarity "
        f"{params['unlike_threshold']:.3f} are flagged as unlike anything indexed")
    return params
