"""A built index, loaded: search it with embeddings, or query it with photos.

`GeoIndex.open(name)` reads the manifest, opens the embeddings and the FAISS index (on the GPU
when there is one and device allows), and recreates the exact backbone it was built with, so a
query is embedded the same way as the index was; a different backbone is refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .backbones import Backbone, create_backbone, file_sha256
from .build import EMBEDDINGS, FAISS_INDEX, MANIFEST
from .cities import display_name
from .errors import BackboneMismatch, GeoindexError, IndexNotFound
from .extraction import resolve_device
from .fileio import MARKER, STAGING, index_home
from .integrity import IndexCorrupt, index_entries, read_manifest, verify_files
from .search import load_index_file, search, set_search_params, to_gpu
from .store import EmbeddingStore
from .voting import estimate_locations, vote


@dataclass
class Neighbour:
    path: str
    city: str
    similarity: float
    lat: float
    lon: float


@dataclass
class Prediction:
    """One photo's answer: top cities with probabilities, a GPS estimate, and the evidence."""

    source: str
    cities: list[tuple[str, float]]
    lat: float
    lon: float
    neighbours: list[Neighbour] = field(default_factory=list)
    classifier: list[tuple[str, float]] | None = None

    @property
    def city(self) -> str:
        return self.cities[0][0]

    def to_dict(self) -> dict:
        def cities(pairs):
            return [{"city": c, "name": display_name(c), "probability": round(float(p), 6)} for c, p in pairs]
        out = {"source": self.source, "city": self.city, "name": display_name(self.city),
               "top5": cities(self.cities),
               "gps": {"lat": None if np.isnan(self.lat) else self.lat, "lon": None if np.isnan(self.lon) else self.lon},
               "neighbours": [asdict(n) for n in self.neighbours]}
        if self.classifier is not None:
            out["classifier_top5"] = cities(self.classifier)
        return out


def resolve_index_path(name_or_path, index_dir=None) -> Path:
    candidate = Path(name_or_path).expanduser()
    if (candidate / MANIFEST).is_file():
        return candidate
    path = index_home(index_dir) / str(name_or_path)
    if (path / MANIFEST).is_file():
        return path
    if "/" not in str(name_or_path) and ((path / MARKER).is_file() or (index_home(index_dir) / STAGING / str(name_or_path)).is_dir()):
        raise IndexNotFound(f"index {str(name_or_path)!r} is not finished: a build of it is running or was "
                            "interrupted; rerun that build command to finish it (or `geoindex rm "
                            f"{name_or_path}` to discard it)")
    available = [p.name for p in list_index_paths(index_dir)]
    hint = f"built indexes: {', '.join(available)}" if available else "none is built yet; run `geoindex build`"
    raise IndexNotFound(f"no index named {name_or_path!r} in {index_home(index_dir)} ({hint})")


def list_index_paths(index_dir=None) -> list[Path]:
    home = index_home(index_dir)
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if (p / MANIFEST).is_file())


def list_indexes(index_dir=None) -> list[dict]:
    """Manifests of the usable indexes; broken or unfinished ones are left out (see integrity.index_entries)."""
    return [e["manifest"] | {"path": e["path"]} for e in index_entries(index_home(index_dir)) if e["status"] == "ok"]


def default_index_name(index_dir=None) -> str:
    """The most recently built index, so `geoindex query photo.jpg` works right after a build."""
    paths = list_index_paths(index_dir)
    if not paths:
        raise IndexNotFound(f"no index in {index_home(index_dir)}; run `geoindex build` first or pass --index-dir")
    return max(paths, key=lambda p: (p / MANIFEST).stat().st_mtime).name


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

    @classmethod
    def open(cls, name_or_path=None, index_dir=None, device="auto", verify: bool = False) -> "GeoIndex":
        name_or_path = name_or_path or default_index_name(index_dir)
        return cls(resolve_index_path(name_or_path, index_dir), device=device, verify=verify)

    def close(self):
        self.store.close()

    @property
    def name(self) -> str:
        return self.manifest["name"]

    # --------------------------------------------------------------- backbone
    def _weights_argument(self):
        weights = self.manifest["weights"]
        if weights["source"] == "random":
            return "none"
        if weights["source"] == "file":
            if not Path(weights["path"]).is_file():
                raise GeoindexError(f"index {self.name!r} was built with weights file {weights['path']}, which is gone; "
                                    "put it back or rebuild the index")
            return weights["path"]
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
        m = self.manifest
        if backbone.name != m["backbone"]:
            raise BackboneMismatch(f"index {self.name!r} was built with backbone {m['backbone']!r}; "
                                   f"queries embedded with {backbone.name!r} cannot be compared with it")
        if backbone.weights.sha256 != m["weights"]["sha256"] or backbone.weights.source != m["weights"]["source"]:
            raise BackboneMismatch(f"index {self.name!r} was built with {m['backbone']} weights "
                                   f"{m['weights']['description'] or m['weights']['source']} (sha256 {m['weights']['sha256']}); "
                                   f"the weights given now differ ({backbone.weights.description}, sha256 {backbone.weights.sha256})")
        if backbone.image_size != m["image_size"] or backbone.embed_dim != m["embed_dim"]:
            raise BackboneMismatch(f"index {self.name!r} expects {m['image_size']} px images and {m['embed_dim']}-d "
                                   f"embeddings; got {backbone.image_size} px and {backbone.embed_dim}-d")

    @property
    def classifier(self):
        """The index's trained head (fine-tuned first, else probe), loaded once; None until one is trained."""
        if self._classifier is None:  # None is not cached: a head trained later is picked up
            from .heads import load_classifier
            self._classifier = load_classifier(self, device=self.device)
        return self._classifier

    # --------------------------------------------------------------- search
    def search(self, embeddings: np.ndarray, k: int = 20, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.manifest["embed_dim"]:
            raise BackboneMismatch(f"index {self.name!r} holds {self.manifest['embed_dim']}-d embeddings; "
                                   f"got shape {embeddings.shape}")
        set_search_params(self.index, nprobe=nprobe)
        return search(self.index, embeddings, k, self._refine_vectors, self.rerank_factor)

    def knn_predict(self, embeddings: np.ndarray, k: int = 20, vote_method: str = "softmax", temperature: float = 0.05,
                    gps_method: str = "mean") -> dict:
        """City probabilities (Q, C) and GPS estimates (Q, 2) for embeddings, with the raw neighbours."""
        sims, ids = self.search(embeddings, k)
        labels = np.where(ids >= 0, self._train_meta["label"].to_numpy()[np.clip(ids, 0, None)], -1)
        probs = vote(labels, sims, len(self.classes), vote_method, temperature)
        lats = self._train_meta["lat"].to_numpy()[np.clip(ids, 0, None)]
        lons = self._train_meta["lon"].to_numpy()[np.clip(ids, 0, None)]
        coords = estimate_locations(labels, sims, lats, lons, probs.argmax(1), vote_method, temperature, gps_method)
        return {"probs": probs, "coords": coords, "similarities": sims, "ids": ids}

    def query(self, images, k: int = 20, vote_method: str = "softmax", temperature: float = 0.05,
              backbone: Backbone | None = None, n_neighbours: int = 5, with_classifier: bool = True) -> list[Prediction]:
        """Photos (paths or PIL images) -> one Prediction each. Raises ImageError for an unreadable file."""
        if backbone is not None:
            self.check_backbone(backbone)
        backbone = backbone or self.backbone
        images = list(images)
        embeddings = backbone.embed(images)
        result = self.knn_predict(embeddings, k, vote_method, temperature)
        classifier_probs = None
        if with_classifier:
            classifier = self.classifier
            if classifier is not None:
                classifier_probs = (classifier.predict_features(embeddings) if classifier.mode == "probe"
                                    else classifier.predict_images(images))
        predictions = []
        for q, image in enumerate(images):
            probs = result["probs"][q]
            top = np.argsort(-probs)[:5]
            neighbours = []
            for sim, i in zip(result["similarities"][q][:n_neighbours], result["ids"][q][:n_neighbours]):
                if i < 0:
                    continue
                row = self._train_meta.iloc[int(i)]
                neighbours.append(Neighbour(row["path"], row["city"], round(float(sim), 4), float(row["lat"]), float(row["lon"])))
            source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<image {q}>"
            prediction = Prediction(source, [(self.classes[c], float(probs[c])) for c in top],
                                    float(result["coords"][q][0]), float(result["coords"][q][1]), neighbours)
            if classifier_probs is not None:
                top = np.argsort(-classifier_probs[q])[:5]
                prediction.classifier = [(self.classes[c], float(classifier_probs[q][c])) for c in top]
            predictions.append(prediction)
        return predictions


def load_index(name_or_path=None, index_dir=None, device="auto", verify: bool = False) -> GeoIndex:
    return GeoIndex.open(name_or_path, index_dir, device, verify)
