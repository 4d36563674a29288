"""`build --features-from NAME`: index new photos with the features and kNN settings another index was tuned to.

NAME did the training and tuning; the new index only borrows them. So it has no split (every photo it can read
is searchable), it embeds with NAME's backbone, image size, preprocessing and tuned weights (a copy of them is
kept inside the new index, so NAME may be removed later), and it copies NAME's kNN settings (k, vote,
temperature, unlike threshold, the street-level GPS calibration and the whitenings), whose searchable spaces
are rebuilt over the new rows. Heads (probe, fine-tuned, hybrid) are not copied: they were chosen on NAME's
validation photos for NAME's cities.

NAME is read as one consistent snapshot: under its lock (geoindex.locks), held only while its files are copied,
so a build or `train` of NAME at that moment is refused at once rather than read half-written.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BackboneMismatch, GeoindexError
from .layout import KNN_PARAMS, STREET_INDEX, STREET_WHITENING, TUNED_WEIGHTS, WHITENED_INDEX, WHITENING

NOT_COPIED = ("heads (probe, fine-tuned) and the hybrid fusion: chosen on its validation photos for its cities; "
              "answers lead with kNN")


@dataclass
class FeatureSource:
    """A snapshot of index NAME: its manifest, and copies (in a private folder) of its weights and kNN files."""
    name: str
    path: Path
    manifest: dict
    folder: Path                       # where the copies are, for the build's duration
    weights_file: Path | None = None   # the copy of NAME's weights when they are a file (tuned or given)
    knn_params: dict | None = None     # NAME's heads/knn/params.json when it fits NAME's build
    notes: list[str] = field(default_factory=list)

    @property
    def max_pixels(self):
        return (self.manifest.get("preprocessing") or {}).get("max_pixels")

    def weights_argument(self):
        """create_backbone's `weights` for NAME's backbone: the copied file, seeded random, or the library's."""
        source = self.manifest["weights"]["source"]
        if source == "random":
            return "none"
        return str(self.weights_file) if source == "file" else None


def source_path(source, index_dir=None) -> Path:
    """The folder of NAME (a name, a path, or an open GeoIndex); one clear line when it is missing or unfinished."""
    from .locate import resolve_index_path

    if hasattr(source, "manifest") and hasattr(source, "path"):
        return Path(source.path)
    return resolve_index_path(source, index_dir)


def check_options(config, *, backbone, weights, name: str | None = None) -> None:
    """Refuse what contradicts --features-from: another backbone, other weights or image size, or a split."""
    from .config import BuildConfig

    said = f"--features-from {getattr(config.features_from, 'name', config.features_from)}"
    if weights is not None:
        raise GeoindexError(f"{said} embeds with that index's weights; drop --weights")
    if config.extraction.image_size is not None:
        raise GeoindexError(f"{said} embeds at that index's image size; drop --image-size")
    if not (isinstance(backbone, str) and backbone == "auto"):
        raise GeoindexError(f"{said} embeds with that index's backbone; drop --backbone")
    for option, value in (("split-by", config.split_by), ("cell-km", config.cell_km), ("fractions", config.fractions)):
        if value != BuildConfig.default(option.replace("-", "_")):
            raise GeoindexError(f"{said} builds no split (that index did the training and tuning; every photo is "
                                f"searchable); drop --{option}")


@contextlib.contextmanager
def feature_source(source, *, index_dir=None, building: Path, log=print):
    """Snapshot NAME (see FeatureSource) for a build of the index at `building`; the copies go when the block ends."""
    from .locks import index_lock

    path = source_path(source, index_dir)
    if path.resolve() == Path(building).resolve():
        raise GeoindexError(f"--features-from {path.name} names the index being built; give another --name (the new "
                            "index would replace the one whose features it borrows)")
    with tempfile.TemporaryDirectory(prefix="geoindex-features-") as tmp:
        with index_lock(path, "build"):  # refused at once while NAME is being built or trained
            snapshot = _snapshot(path, Path(tmp))
        for note in snapshot.notes:
            log(f"note: {note}")
        yield snapshot


def _snapshot(path: Path, folder: Path) -> FeatureSource:
    from .integrity import read_manifest, sha256_file, verify_files

    manifest = read_manifest(path)
    verify_files(path, manifest)
    name = manifest["name"]
    snapshot = FeatureSource(name, path, manifest, folder)
    weights = manifest["weights"]
    if weights["source"] == "file":
        original = path / weights["path"]  # relative: NAME's tuned backbone.pt; absolute: a file given to its build
        if not original.is_file():
            raise GeoindexError(f"index {name!r} was built with weights file {original}, which is gone; put it back "
                                f"or rebuild {name!r}")
        snapshot.weights_file = folder / TUNED_WEIGHTS
        shutil.copyfile(original, snapshot.weights_file)
        if sha256_file(snapshot.weights_file) != weights["sha256"]:
            raise BackboneMismatch(f"index {name!r}: its weights file {original} differs from the one its manifest "
                                   f"records (sha256 {weights['sha256']}); rebuild {name!r} or put its weights back")
    snapshot.knn_params = _knn_snapshot(path, manifest, folder, snapshot.notes)
    return snapshot


def _knn_snapshot(path: Path, manifest: dict, folder: Path, notes: list[str]) -> dict | None:
    """NAME's kNN settings and the whitenings they need, copied into `folder`; None (with a note) when unusable."""
    name = manifest["name"]
    try:
        params = json.loads((path / KNN_PARAMS).read_text())
    except FileNotFoundError:
        notes.append(f"index {name!r} has no kNN tuning (run `geoindex train --index {name}` first): the new index "
                     "answers with kNN's default settings and city-level GPS")
        return None
    except (OSError, ValueError) as exc:
        notes.append(f"index {name!r}: its {KNN_PARAMS} is unreadable ({exc}); kNN's default settings are used")
        return None
    if not isinstance(params, dict) or params.get("build_id") != manifest.get("build_id"):
        notes.append(f"index {name!r}: its kNN tuning was made for another build of it (rerun `geoindex train --index "
                     f"{name}`); kNN's default settings are used")
        return None
    needed = [WHITENING] if params.get("whiten") else []
    if isinstance(params.get("street"), dict) and params["street"].get("space"):
        needed.append(STREET_WHITENING)
    for part in needed:
        if not (path / part).is_file():
            notes.append(f"index {name!r}: {part} is missing beside its kNN tuning (rerun `geoindex train --index "
                         f"{name}`); kNN's default settings are used")
            return None
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path / part, folder / part)
    return params


def check_backbone(source: FeatureSource, backbone) -> None:
    """The backbone made from the snapshot is NAME's, weight for weight: the check a query of NAME makes."""
    from .catalog import check_backbone_against

    check_backbone_against(source.manifest, source.name, backbone)


def copy_into(source: FeatureSource, out: Path, store, build_id: str) -> dict:
    """Put NAME's weights and kNN settings into the assembled index at `out` (kNN's spaces rebuilt over its own
    train rows, params.json bound to `build_id`); returns the manifest's `features_from` record."""
    from .fileio import write_json_atomic
    from .search import save_index
    from .whitening import Whitening, flat_index

    copied, files = [], []
    m = source.manifest
    if source.weights_file is not None:
        shutil.copyfile(source.weights_file, out / TUNED_WEIGHTS)
        files.append(TUNED_WEIGHTS)
        copied.append(f"its {'tuned ' if m.get('adapted') else ''}weights ({TUNED_WEIGHTS})")
    params = source.knn_params
    if params is not None:
        train = None
        for space, built in ((WHITENING, WHITENED_INDEX), (STREET_WHITENING, STREET_INDEX)):
            if (source.folder / space).is_file():
                (out / space).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.folder / space, out / space)
                train = store.embeddings("train") if train is None else train
                save_index(flat_index(Whitening.load(out / space)(train)), out / built)
                files += [str(space), str(built)]
        (out / KNN_PARAMS).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / KNN_PARAMS, dict(params, build_id=build_id, features_from=source.name))
        files.append(str(KNN_PARAMS))
        copied.append(_knn_summary(params))
    adapted = m.get("adapted")
    return {"name": source.name, "path": str(source.path.resolve()), "build_id": m.get("build_id"),
            "backbone": m["backbone"], "image_size": m["image_size"],
            "weights": {k: m["weights"].get(k) for k in ("source", "sha256", "description")},
            "adapted": adapted, "features_from": m.get("features_from"),
            "knn": None if params is None else {k: v for k, v in params.items() if k != "build_id"},
            "copied": copied, "not_copied": [NOT_COPIED], "files": files}


def _knn_summary(params: dict) -> str:
    whiten = params.get("whiten")
    space = f"whitened to {whiten['dims']} dims" if whiten else "raw cosine"
    street = params.get("street") or {}
    gps = ("street-level GPS calibration" if street.get("threshold") is not None else
           "city-level GPS at the spot threshold" if street.get("spot_threshold") is not None else
           "city-level GPS (not calibrated)")
    if (street.get("verify") or {}).get("inliers") is not None:
        gps += f", spatial verification at {street['verify']['inliers']} inliers"
    if (street.get("rerank") or {}).get("weight"):
        gps += (f", dense re-scoring of the first {street['rerank'].get('k') or 10} street neighbours at weight "
                f"{street['rerank']['weight']:g}")
    return (f"its kNN settings (k={params.get('k')}, {params.get('vote')} vote, {space}, unlike threshold, {gps}); "
            "their spaces rebuilt over the new photos")


def refuse_training(index_or_manifest) -> None:
    """`train` on an index built with --features-from: nothing to train on (all photos are searchable)."""
    manifest = getattr(index_or_manifest, "manifest", index_or_manifest)
    source = (manifest or {}).get("features_from")
    if source:
        name, origin = manifest.get("name"), source.get("name")
        raise GeoindexError(f"index {name!r} was built with --features-from {origin}: it has no split to train on "
                            f"(every photo is searchable) and the tuning of {origin!r} applies; train {origin!r} instead "
                            f"(`geoindex train --index {origin}`), then rebuild {name!r} with the same `geoindex build "
                            f"--features-from {origin} ... --overwrite`")

