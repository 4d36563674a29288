"""A built index, loaded: search it with embeddings, or query it with photos.

`GeoIndex.open(name)` reads the manifest, opens the embeddings and the FAISS index (on the GPU
when there is one and device allows), and recreates the exact backbone it was built with, so a
query is embedded the same way as the index was; a different backbone is refused.
"""
from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .backbones import Backbone, create_backbone
from .layout import EMBEDDINGS, FAISS_INDEX
from .catalog import check_backbone_against
from .cities import full_name
from .errors import BackboneMismatch, GeoindexError
from .extraction import resolve_device
from .integrity import IndexCorrupt, read_manifest, verify_files
from .locate import default_index_name, list_index_paths, list_indexes, resolve_index_path  # noqa: F401
from .search import load_index_file, search, set_search_params, to_gpu
from .store import EmbeddingStore


@dataclass
class Neighbour:
    path: str
    city: str
    similarity: float
    lat: float
    lon: float
    row: int = -1  # the train row in the index (thumbnails are served by row, never by path)


@dataclass
class Prediction:
    """One photo's answer: top cities with probabilities per method, a GPS estimate, and the evidence."""

    source: str
    cities: list[tuple[str, float]]
    lat: float
    lon: float
    neighbours: list[Neighbour] = field(default_factory=list)
    classifier: list[tuple[str, float]] | None = None
    classifier_mode: str | None = None
    index: str | None = None
    top_similarity: float | None = None
    unlike_indexed: bool = False
    unlike_threshold: float | None = None
    hybrid: list[tuple[str, float]] | None = None
    lead: str = "knn"  # the method the answer leads with: the best on the validation split (tuning.load_lead_choice)
    lead_note: str = ""
    # "street": the spot of the best-supported cluster of neighbours, or of a spatially verified neighbour
    # (gps_inliers); "city": the cluster's spot below the street threshold (above val's spot threshold), or a
    # mean over a city's neighbours
    gps_level: str = "city"
    gps_radius_m: float | None = None  # 80% of val answers of this level fell within it (None: not calibrated)
    gps_support: float | None = None  # the cluster's share of the vote weight
    gps_inliers: int | None = None  # a spatially verified answer: the homography inliers its photo shares with it
    street_cluster: list[Neighbour] = field(default_factory=list)  # that cluster's photos (drawn on the page's map)

    @property
    def city(self) -> str:
        """The leading method's city (`cities` stays kNN's vote, `classifier` and `hybrid` the others')."""
        return self.ranked(self.lead)[0][0]

    @property
    def probability(self) -> float:
        return self.ranked(self.lead)[0][1]

    def ranked(self, method: str) -> list[tuple[str, float]]:
        return {"knn": self.cities, "classifier": self.classifier, "hybrid": self.hybrid}[method] or self.cities

    def to_dict(self) -> dict:
        def cities(pairs):
            return [{"city": c, "name": full_name(c), "probability": round(float(p), 6)} for c, p in pairs]
        out = {"source": self.source, "index": self.index, "city": self.city, "name": full_name(self.city),
               "method": self.lead, "method_note": self.lead_note, "probability": round(float(self.probability), 6),
               "top5": cities(self.cities),
               "gps": {"lat": _finite(self.lat), "lon": _finite(self.lon), "level": self.gps_level,
                       "radius_m": _finite(self.gps_radius_m), "support": _finite(self.gps_support),
                       "inliers": self.gps_inliers,
                       "cluster": [{**asdict(n), "lat": _finite(n.lat), "lon": _finite(n.lon)} for n in self.street_cluster]},
               "top_similarity": _finite(self.top_similarity),
               "unlike_indexed": bool(self.unlike_indexed), "unlike_threshold": _finite(self.unlike_threshold),
               "neighbours": [{**asdict(n), "lat": _finite(n.lat), "lon": _finite(n.lon)} for n in self.neighbours]}
        if self.classifier is not None:
            out["classifier"] = self.classifier_mode
            out["classifier_top5"] = cities(self.classifier)
        if self.hybrid is not None:
            out["hybrid_top5"] = cities(self.hybrid)
        return out


def _finite(value):
    return None if value is None or not np.isfinite(value) else float(value)


def _open_checked(path: Path, manifest: dict, verify: bool):
    """Open the embeddings and the FAISS index after checking them against the manifest; one clear error if not."""
    verify_files(path, manifest, full=verify)
    fix = f"rebuild it with `geoindex build --name {path.name} --overwrite ...` or remove it with `geoindex rm {path.name}`"
    try:
        store = EmbeddingStore(path / EMBEDDINGS)
    except (OSError, KeyError, ValueError) as exc:
        raise IndexCorrupt(f"index {path.name!r}: {EMBEDDINGS} is unreadable ({str(exc).splitlines()[0]}); {fix}") from None
    try:
        counts = {s: store.count(s) for s in ("train", "val", "test")}
        if store.classes != manifest["classes"] or counts != manifest["counts"] or store.embed_dim != manifest["embed_dim"]:
            raise IndexCorrupt(f"index {path.name!r}: {EMBEDDINGS} does not match its manifest (classes, counts or "
                               f"dimension differ); {fix}")
        try:
            index = load_index_file(path / FAISS_INDEX)
        except (RuntimeError, OSError) as exc:
            raise IndexCorrupt(f"index {path.name!r}: {FAISS_INDEX} is unreadable ({str(exc).splitlines()[0][:200]}); "
                               f"{fix}") from None
        if index.ntotal != counts["train"] or index.d != manifest["embed_dim"]:
            raise IndexCorrupt(f"index {path.name!r}: {FAISS_INDEX} holds {index.ntotal} vectors of {index.d}-d, the "
                               f"manifest says {counts['train']} of {manifest['embed_dim']}-d (copied from another "
                               f"index?); {fix}")
    except BaseException:
        store.close()
        raise
    return store, index


class GeoIndex:
    def __init__(self, path, device="auto", verify: bool = False):
        """Open an index; its files are checked against the manifest (sizes always, checksums when changed
        or when verify=True) and a mismatch is refused with one line naming the file."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.device = resolve_device(device)
        self.classes: list[str] = self.manifest["classes"]
        self.store, index = _open_checked(self.path, self.manifest, verify)
        self.index = to_gpu(index) if self.device.type == "cuda" else index
        self._train_meta = self.store.metadata("train")
        params = self.manifest["index"].get("params") or {}
        self.rerank_factor = int(params.get("rerank", 1))
        self._refine_vectors = self.store.memmap("train") if self.rerank_factor > 1 else None
        self._backbone: Backbone | None = None
        self._classifier = None
        self._city_centres = None
        self._knn_cache = None
        self._columns = None
        self._search_lock = threading.Lock()
        self._lead_cache = None
        self._frozen = False

    @classmethod
    def open(cls, name_or_path=None, index_dir=None, device="auto", verify: bool = False) -> "GeoIndex":
        name_or_path = name_or_path or default_index_name(index_dir)
        return cls(resolve_index_path(name_or_path, index_dir), device=device, verify=verify)

    def close(self):
        self.store.close()

    def freeze(self) -> "GeoIndex":
        """Load now everything a query reads (backbone, best head and its backbone, kNN tuning and whitening) and
        never look at the index folder again. A query otherwise picks up a head or kNN tuning written after the
        index was opened, which a long-running server must not do: `train` rewrites those files beside vectors that
        it swaps in as a new folder, and the old vectors with the new tuning answer from the wrong rows.
        `geoindex serve` opens a whole new GeoIndex when the index on disk changes."""
        self.backbone
        classifier = self.classifier
        if classifier is not None:
            classifier.backbone
        self.knn_method()
        self._train_columns()
        self.city_centres
        self._lead_cache = self.lead_choice(classifier)
        self._frozen = True
        return self

    @property
    def name(self) -> str:
        return self.manifest["name"]

    # --------------------------------------------------------------- backbone
    def _weights_argument(self):
        weights = self.manifest["weights"]
        if weights["source"] == "random":
            return "none"
        if weights["source"] == "file":
            path = self.path / weights["path"]  # relative: the index's own tuned backbone (geoindex.adapt)
            if not path.is_file():
                raise GeoindexError(f"index {self.name!r} was built with weights file {path}, which is gone; "
                                    "put it back or rebuild the index")
            return str(path)
        return None

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            backbone = create_backbone(self.manifest["backbone"], weights=self._weights_argument(),
                                       image_size=self.manifest["image_size"], device=self.device)
            self.check_backbone(backbone)
            self._backbone = backbone
        return self._backbone

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone whose embeddings would not be comparable with this index's."""
        check_backbone_against(self.manifest, self.name, backbone)  # geoindex.catalog

    @property
    def classifier(self):
        """The index's trained head with the best validation accuracy, loaded once; None until one is trained."""
        if self._classifier is None and not self._frozen:  # None is not cached: a head trained later is picked up
            from .heads import load_best_classifier
            self._classifier = load_best_classifier(self, device=self.device)
        return self._classifier

    # --------------------------------------------------------------- search
    def search(self, embeddings: np.ndarray, k: int = 20, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.manifest["embed_dim"]:
            raise BackboneMismatch(f"index {self.name!r} holds {self.manifest['embed_dim']}-d embeddings; "
                                   f"got shape {embeddings.shape}")
        with self._search_lock:  # a FAISS GPU index, and the nprobe set just before, are not safe to share between threads
            set_search_params(self.index, nprobe=nprobe)
            return search(self.index, embeddings, k, self._refine_vectors, self.rerank_factor)

    # --------------------------------------------------------------- methods
    @property
    def train_meta(self):
        return self._train_meta

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def city_centres(self) -> np.ndarray:
        if self._city_centres is None:
            from .methods import city_centres
            self._city_centres = city_centres(self._train_meta, self.classes)
        return self._city_centres

    def knn_method(self, **overrides):
        """kNN as tuned on val by `geoindex train` (heads/knn/: k, vote, temperature, whitening), else the defaults.

        The tuned method is loaded once and reused until `train` writes new tuning (checked by the file's mtime);
        overrides give a fresh object sharing the same whitened index."""
        from .methods import KNNMethod
        from .tuning import KNN_PARAMS, load_knn_tuning

        if self._frozen and self._knn_cache is not None:
            stamp = self._knn_cache[0]
        else:
            try:
                stamp = (self.path / KNN_PARAMS).stat().st_mtime_ns
            except OSError:
                stamp = None
        if self._knn_cache is None or self._knn_cache[0] != stamp:
            self._knn_cache = (stamp, load_knn_tuning(self))
        params = dict(self._knn_cache[1])
        params.update({k: v for k, v in overrides.items() if v is not None})
        method = KNNMethod(self, **params)
        if "whitened_index" not in params and method.whitening is not None and not overrides:
            self._knn_cache[1]["whitened_index"] = method.whitened_index  # built once, then shared
        if "street_index" not in self._knn_cache[1] and method.street_whitening is not None:
            self._knn_cache[1]["street_index"] = method.street_index  # the street space does not depend on overrides
        return method

    def _train_columns(self) -> dict:
        """The train rows' columns as arrays: a neighbour is four array lookups, not a pandas row."""
        if self._columns is None:
            self._columns = {c: self._train_meta[c].to_numpy() for c in ("path", "city", "lat", "lon")}
        return self._columns

    def lead_choice(self, classifier) -> dict:
        """Which method answers lead with (tuning.load_lead_choice); read once for a frozen index."""
        from .tuning import load_lead_choice

        if self._frozen:
            return self._lead_cache
        return load_lead_choice(self, classifier)

    def _street_fields(self, knn, q: int) -> dict:
        extra = knn.extra
        return {"gps_level": str(extra["gps_level"][q]), "gps_radius_m": _finite(float(extra["gps_radius_m"][q])),
                "gps_support": _finite(float(extra["gps_support"][q])) if "gps_support" in extra else None,
                "gps_inliers": int(extra["gps_inliers"][q]) if extra.get("gps_inliers") is not None
                and extra["gps_inliers"][q] > 0 else None,
                "street_cluster": _street_neighbours(extra, self._train_columns(), q)
                if extra["gps_level"][q] == "street" else []}

    def classifier_method(self):
        """The trained head that scored best on val, or None."""
        from .methods import ClassifierMethod

        classifier = self.classifier
        return None if classifier is None else ClassifierMethod(self, classifier)

    def knn_predict(self, embeddings: np.ndarray, k: int = 20, vote_method: str = "softmax", temperature: float = 0.05,
                    gps_method: str = "mean") -> dict:
        """City probabilities (Q, C) and GPS estimates (Q, 2) for embeddings, with the raw neighbours."""
        from .methods import KNNMethod, Photos

        knn = KNNMethod(self, k, vote_method, temperature=temperature, gps=gps_method)
        answer = knn.predict(Photos(embeddings, [None] * len(embeddings)))
        return {"probs": answer.probs, "coords": answer.coords, "similarities": answer.extra["similarities"],
                "ids": answer.extra["ids"]}

    def query(self, images, k: int | None = None, vote_method: str | None = None, temperature: float | None = None,
              backbone: Backbone | None = None, n_neighbours: int = 5, with_classifier: bool = True,
              verify_sources: list | None = None) -> list[Prediction]:
        """Photos (paths or PIL images) -> one Prediction each. Raises ImageError for an unreadable file.
        verify_sources: what spatial verification reads for each photo, where the images are model inputs
        (the service's decoded tensors); by default the images themselves.

        kNN uses the k/vote/temperature tuned on val by `geoindex train` unless given here; the classifier
        is the head that scored best on val; the hybrid fuses the two with the weights `train` chose on val.
        Each answer leads with whichever of the three was most accurate on val (kNN where none was compared).
        """
        from .methods import Photos
        from .methods.hybrid import fuse

        if backbone is not None:
            self.check_backbone(backbone)
        backbone = backbone or self.backbone
        images = list(images)
        if verify_sources is not None and len(verify_sources) != len(images):
            raise ValueError(f"{len(verify_sources)} verify_sources for {len(images)} images")
        photos = Photos(backbone.embed(images), images, verify_sources=verify_sources)
        knn = self.knn_method(k=k, vote=vote_method, temperature=temperature).predict(photos)
        classifier = self.classifier_method() if with_classifier else None
        head = classifier.predict(photos) if classifier is not None else None
        choice = self.lead_choice(classifier.classifier if classifier is not None else None)
        fused = None
        if head is not None and choice["weights"] is not None:
            from .methods.base import Answer
            fused = Answer("hybrid", fuse([knn.probs, head.probs], choice["weights"]), self.classes, knn.coords)
        unlike_threshold = self.knn_method().unlike_threshold
        predictions = []
        sims, ids = knn.extra["similarities"], knn.extra["ids"]
        meta = self._train_columns()
        for q, image in enumerate(images):
            neighbours = []
            for sim, i in zip(sims[q][:n_neighbours], ids[q][:n_neighbours]):
                if i < 0:
                    continue
                i = int(i)
                neighbours.append(Neighbour(meta["path"][i], meta["city"][i], round(float(sim), 4),
                                            float(meta["lat"][i]), float(meta["lon"][i]), i))
            source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<image {q}>"
            prediction = Prediction(source, knn.top(q), float(knn.coords[q][0]), float(knn.coords[q][1]), neighbours,
                                    index=self.name, top_similarity=float(sims[q][0]) if ids[q][0] >= 0 else None,
                                    unlike_indexed=bool(knn.extra["unlike"][q]), unlike_threshold=unlike_threshold,
                                    lead_note=choice["note"],
                                    **self._street_fields(knn, q))
            if head is not None:
                prediction.classifier = head.top(q)
                prediction.classifier_mode = classifier.classifier.mode
                if fused is not None:
                    prediction.hybrid = fused.top(q)
                prediction.lead = choice["lead"]
                if prediction.city != prediction.cities[0][0]:  # kNN's GPS guess is for another city
                    centre = self.city_centres[self.classes.index(prediction.city)]
                    prediction.lat, prediction.lon = float(centre[0]), float(centre[1])
                    # kNN's street cluster lies in kNN's city: this answer is a city-level one, not calibrated on val
                    prediction.gps_level, prediction.gps_radius_m, prediction.gps_support = "city", None, None
                    prediction.gps_inliers = None
                    prediction.street_cluster = []
            predictions.append(prediction)
        return predictions


def _street_neighbours(extra: dict, meta: dict, q: int) -> list[Neighbour]:
    """The photos of query q's best-supported street cluster, nearest first."""
    out = []
    for i, member, sim in zip(extra["street_ids"][q], extra["street_members"][q], extra["street_similarities"][q]):
        if member and i >= 0:
            i = int(i)
            out.append(Neighbour(meta["path"][i], meta["city"][i], round(float(sim), 4), float(meta["lat"][i]),
                                 float(meta["lon"][i]), i))
    return out


def load_index(name_or_path=None, index_dir=None, device="auto", verify: bool = False) -> GeoIndex:
    return GeoIndex.open(name_or_path, index_dir, device, verify)
