"""Tuning on the validation split, saved beside the index so `query`, `bench` and the service all use it.

heads/knn/params.json (k, vote, temperature, whitening dims and power, the unlike-anything threshold, the
street-level GPS answer's support threshold and error radii (`street`, geoindex.revisit), the split that chose them), heads/knn/whitening.npz (mean, axes, scales: plain arrays) and heads/knn/whitened.faiss
(the train embeddings in the whitened space, so a query does not rebuild it); heads/knn/street_whitening.npz and
street.faiss the same for the street-level GPS answer's own space, where val chose a whitening for it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import GeoindexError
from .fileio import write_json_atomic

from .layout import (HEAD_META, HYBRID_PARAMS, KNN_DIR, KNN_PARAMS, STREET_INDEX, STREET_WHITENING,  # noqa: F401
                     WHITENED_INDEX, WHITENING)

SAVED_KEYS = ("k", "vote", "temperature", "unlike_threshold", "tuned_on", "street")


def tune_knn(index, log=print) -> dict:
    """Choose kNN's space (raw or whitened), k, vote and temperature, and the "unlike anything indexed"
    threshold, on val; save them with the index (under its lock: geoindex.locks). Where a head is trained, then
    also the fusion of the two and which method answers lead with (tune_hybrid)."""
    from .locks import writing_to

    with writing_to(index, "train"):
        return _tune_knn_locked(index, log)


def _tune_knn_locked(index, log) -> dict:
    from .methods import KNNMethod, Photos
    from .search import save_index

    if not index.store.count("val"):
        raise GeoindexError(f"index {index.name!r} has no validation split to tune kNN on")
    knn = KNNMethod(index)
    params = knn.fit(Photos.of_split(index, "val")).best_params_ | {"build_id": index.manifest.get("build_id")}
    folder = Path(index.path)
    for stale in (WHITENING, WHITENED_INDEX, STREET_WHITENING, STREET_INDEX):
        (folder / stale).unlink(missing_ok=True)
    if knn.whitening_ is not None:
        knn.whitening_.save(folder / WHITENING)
        save_index(knn.whitened_index, folder / WHITENED_INDEX)
    if knn.street_whitening_ is not None:
        knn.street_whitening_.save(folder / STREET_WHITENING)
        save_index(knn.street_index, folder / STREET_INDEX)
    write_json_atomic(folder / KNN_PARAMS, params)
    space = "raw embeddings" if knn.whitening_ is None else \
        f"whitened to {knn.whitening_.dims} dims (power {knn.whitening_.power:g})"
    log(f"kNN tuned on val: {space}, k={params['k']}, {params['vote']} vote"
        + (f", temperature {params['temperature']:g}" if params["vote"] == "softmax" else "")
        + f" (val accuracy {params['val_accuracy']:.3f}); photos whose nearest match is below similarity "
        f"{params['unlike_threshold']:.3f} are flagged as unlike anything indexed")
    log(street_summary(params.get("street")))
    tune_hybrid(index, log=log)
    return params


def _load_space(whitening_file: Path, index_file: Path, ntotal: int):
    """A saved whitening and, when it is there and fits (same rows, same dimensions), its searchable index."""
    from .search import load_index_file
    from .whitening import Whitening

    whitening = Whitening.load(whitening_file)
    if index_file.is_file():
        loaded = load_index_file(index_file)
        if loaded.ntotal == ntotal and loaded.d == whitening.dims:
            return whitening, loaded
    return whitening, None


def street_summary(street: dict | None) -> str:
    """One line on the street-level GPS answer's calibration, for train's and bench's logs."""
    spot = (street or {}).get("spot_threshold")
    point = ("a mean over the voted city's neighbours" if spot is None else
             f"the best cluster in the voted city where it holds {spot:.3f} of the weight, else a mean over the voted "
             "city's neighbours")
    radius = (street or {}).get("city_radius_m")
    city = f"city level at {point}" + (f" (radius {radius / 1000:.1f} km)" if radius is not None else "")
    verify = verification_summary((street or {}).get("verify")) + rescoring_summary((street or {}).get("rerank"))
    if not street or street.get("threshold") is None:
        why = (street or {}).get("note", "not calibrated")
        return f"GPS answers stay {city}: {why}" + verify
    space = street.get("space")
    space = "raw cosine" if not space else f"whitened to {space['dims']} dims (power {space['power']:g})"
    return (f"GPS answers are street level where the best cluster of neighbours ({space}) holds {street['threshold']:.3f} "
            f"of their weight (calibrated on val: within 25 m {street['val_street_precision']:.0%} of the time on "
            f"{street['val_street_share']:.0%} of val photos; radius {street['radius_m']:.0f} m), else {city}" + verify)


def rescoring_summary(rerank: dict | None) -> str:
    """The dense re-scoring's part of street_summary ("" where it was never calibrated: an older index)."""
    if not rerank:
        return ""
    if not rerank.get("weight"):
        return f"; street neighbours in the search's order ({rerank.get('note', 'not calibrated')})"
    tried = rerank.get("tried") or []
    if isinstance(tried, dict):  # indexes from before the depth was chosen: {weight: figures}, 10 neighbours
        tried = [{"k": 10, "weight": float(weight), **figures} for weight, figures in tried.items()]
    depth = int(rerank.get("k") or 10)

    def first(k, weight):
        return next((t.get("first_within_25m") for t in tried
                     if t.get("weight") == weight and (not weight or t.get("k") == k)), None)

    before, after = first(None, 0.0), first(depth, float(rerank["weight"]))
    gain = (f": the first within 25 m for {before:.0%} -> {after:.0%} of val photos"
            if before is not None and after is not None else "")
    return (f"; the first {depth} street neighbours re-scored by dense matching (weight {rerank['weight']:g}"
            f"{gain})")


def verification_summary(verify: dict | None) -> str:
    """The spatial verification's part of street_summary ("" where it was never calibrated: an older index)."""
    if not verify:
        return ""
    if verify.get("inliers") is None:
        return f"; no spatial verification ({verify.get('note', 'not calibrated')})"
    return (f"; or at a neighbour that spatial verification matches with {verify['inliers']} inliers or more "
            f"(on val: {verify['val_share']:.0%} of photos, within 25 m {verify['val_precision']:.0%} of the time)")


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
        try:
            params["whitening"], whitened = _load_space(folder / WHITENING, folder / WHITENED_INDEX, index.ntotal)
        except (OSError, ValueError, KeyError, RuntimeError):
            return {}  # a damaged tuning file: fall back to the untuned defaults rather than answer wrongly
        if whitened is not None:
            params["whitened_index"] = whitened
    if isinstance(params.get("street"), dict) and params["street"].get("space"):
        try:
            params["street_whitening"], street = _load_space(folder / STREET_WHITENING, folder / STREET_INDEX,
                                                             index.ntotal)
            if street is not None:
                params["street_index"] = street
        except (OSError, ValueError, KeyError, RuntimeError):
            params.pop("street_whitening", None)
            params["street"] = None  # its space is unreadable: city-level answers rather than wrong street ones
    return params


# On equal validation accuracy the simpler answer leads: kNN (it also gives the GPS guess and the evidence photos).
LEAD_PREFERENCE = ("knn", "classifier", "hybrid")


def _sha256(path: Path) -> str | None:
    import hashlib
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def tune_hybrid(index, log=print) -> dict | None:
    """Fusion weights of the tuned kNN and the trained head, chosen on val as bench chooses them, and which of
    kNN, the head and their fusion scores best on val: `query`, the page and the API lead with that one.

    Saved to heads/hybrid/params.json with the hashes of the kNN tuning and the head it was fitted to, so a
    head trained later makes it stale rather than wrong. None (and the file removed) without a head or val."""
    from .methods import HybridMethod, Photos
    from .metrics import evaluate

    path = Path(index.path) / HYBRID_PARAMS
    classifier = index.classifier_method()
    if classifier is None or not index.store.count("val"):
        path.unlink(missing_ok=True)
        return None
    val = Photos.of_split(index, "val")
    knn = index.knn_method()
    parts = {"knn": knn.predict_proba(val), "classifier": classifier.predict_proba(val)}
    hybrid = HybridMethod(index, [knn, classifier])
    hybrid.fit(val)
    from .methods.hybrid import fuse
    fused = fuse(list(parts.values()), hybrid.weights_)
    scores = {name: evaluate(val.labels, probs, index.classes)["accuracy"]
              for name, probs in {**parts, "hybrid": fused}.items()}
    lead = max(LEAD_PREFERENCE, key=lambda m: (scores[m], -LEAD_PREFERENCE.index(m)))
    params = {"weights": dict(zip(("knn", "classifier"), hybrid.weights_)), "val_accuracy": scores["hybrid"],
              "val_accuracy_by_method": scores, "lead": lead, "tuned_on": hybrid.tuned_on_,
              "classifier": classifier.classifier.mode,
              "classifier_meta_sha256": _sha256(classifier.classifier.folder / HEAD_META),
              "knn_params_sha256": _sha256(Path(index.path) / KNN_PARAMS)}
    write_json_atomic(path, params)
    names = {"knn": "kNN", "classifier": f"classifier ({classifier.classifier.mode})", "hybrid": "hybrid"}
    log(f"hybrid tuned on val: weights kNN {hybrid.weights_[0]:.1f} x {names['classifier']} {hybrid.weights_[1]:.1f}; "
        "val accuracy " + ", ".join(f"{names[m]} {scores[m]:.3f}" for m in LEAD_PREFERENCE)
        + f": answers lead with {names[lead]}")
    return params


def load_lead_choice(index, classifier) -> dict:
    """Which method a query leads with, from val figures only: {lead, weights (hybrid's, or None), note}.

    kNN leads where nothing else was scored on val: no head, no validation split, or a choice made for another
    head or kNN tuning (then the note says to rerun `geoindex train`)."""
    folder = Path(index.path)
    if classifier is None:
        return {"lead": "knn", "weights": None, "scores": {}, "note": "kNN (no classifier head is trained)"}
    try:
        saved = json.loads((folder / HYBRID_PARAMS).read_text())
        scores = {m: float(saved["val_accuracy_by_method"][m]) for m in LEAD_PREFERENCE}
        weights = [float(saved["weights"]["knn"]), float(saved["weights"]["classifier"])]
        lead = saved["lead"] if saved["lead"] in LEAD_PREFERENCE else "knn"
    except (OSError, ValueError, KeyError, TypeError):
        why = "no validation split to choose by" if not index.store.count("val") else \
            "kNN and the head were not compared on val yet: rerun `geoindex train`"
        return {"lead": "knn", "weights": None, "scores": {}, "note": f"kNN ({why})"}
    if (saved.get("classifier") != classifier.mode
            or saved.get("classifier_meta_sha256") != _sha256(classifier.folder / HEAD_META)
            or saved.get("knn_params_sha256") != _sha256(folder / KNN_PARAMS)):
        return {"lead": "knn", "weights": None, "scores": {},
                "note": "kNN (the head or kNN changed since they were compared on val: rerun `geoindex train`)"}
    names = {"knn": "kNN", "classifier": f"classifier ({classifier.mode})", "hybrid": "hybrid"}
    others = ", ".join(f"{names[m]} {scores[m]:.3f}" for m in LEAD_PREFERENCE if m != lead)
    return {"lead": lead, "weights": weights, "scores": scores,
            "note": f"{names[lead]}: best on the validation split (accuracy {scores[lead]:.3f}; {others})"}
