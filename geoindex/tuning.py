"""Tuning on the validation split, saved beside the index so `query`, `bench` and the service all use it.

heads/knn/params.json (k, vote, temperature, whitening dims and power, the unlike-anything threshold, the
split that chose them), heads/knn/whitening.npz (mean, axes, scales: plain arrays) and heads/knn/whitened.faiss
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
SAVED_KEYS = ("k", "vote", "temperature", "unlike_threshold", "tuned_on")


def tune_knn(index, log=print) -> dict:
    """Choose kNN's space (raw or whitened), k, vote and temperature, and the "unlike anything indexed"
    threshold, on val; save them with the index (under its lock: geoindex.locks)."""
    from .locks import writing_to

    with writing_to(index, "train"):
        return _tune_knn_locked(index, log)


def _tune_knn_locked(index, log) -> dict:
    from .methods import KNNMethod, Photos
    from .search import save_index

    if not index.store.count("val"):
        raise GeoindexError(f"index {index.name!r} has no validation split to tune kNN on")
    knn = KNNMethod(index)
    params = knn.fit(Photos.of_split(index, "val")) | {"build_id": index.manifest.get("build_id")}
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
    return params


def load_knn_tuning(index) -> dict:
    """KNNMethod keyword arguments saved by tune_knn, or {} (the defaults) when none are saved or they are unusable."""
    folder = Path(index.path)
    try:
        saved = json.loads((folder / KNN_PARAMS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("build_id") not in (None, index.manifest.get("build_id")):
        return {}  # tuned on another build's embeddings (a race or a copy): the defaults are the honest answer
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
