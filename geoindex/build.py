"""`build_index`: dataset -> embeddings (HDF5) -> FAISS index -> manifest, resumable.

Extraction writes checkpoint shards to `<index>/.partial/` (each shard written atomically),
so a killed build loses at most the rows since the last shard and a rerun of the same command
picks up where it stopped. The final files are each written to a temporary name and renamed;
manifest.json goes last, so its presence means the index is complete.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import __version__
from .backbones import Backbone, create_backbone, default_weights_available
from .data import SPLITS, prepare_records, scan_dataset
from .errors import GeoindexError
from .extraction import default_num_workers, iter_embeddings, resolve_device
from .fileio import atomic_path, index_home, write_json_atomic
from .search import INDEX_TYPES, TRAINED_TYPES, build_from_blocks, exact_search, recall_at_k, save_index, search
from .store import EmbeddingStore, create_store, write_metadata
from .synthetic import SYNTHETIC_MARKER

MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.h5"
FAISS_INDEX = "faiss.index"
PARTIAL = ".partial"


def choose_default_backbone() -> tuple[str, str]:
    """densenet when its ImageNet weights are already cached, else effnet (whose weights ship with pip)."""
    if default_weights_available("densenet"):
        return "densenet", "DenseNet121 ImageNet weights found in torchvision's cache"
    return "effnet", ("DenseNet121 weights are not in torchvision's cache (no download attempted); "
                      "EfficientNet-Lite0's ImageNet weights ship with pip and work offline")


@dataclass
class BuildReport:
    name: str
    path: Path
    manifest: dict
    extracted_rows: int = 0          # rows embedded by this run (less than the total when resuming)
    resumed_rows: int = 0            # rows found already done in checkpoint shards
    seconds_extracting: float = 0.0
    skipped: list[dict] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.extracted_rows / self.seconds_extracting if self.seconds_extracting else float("nan")


def _fingerprint(records: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for path, split in zip(records["path"], records["split"]):
        digest.update(f"{path}\t{split}\n".encode())
    return digest.hexdigest()


class _Checkpoints:
    """Shards of finished rows under .partial/: rows, ok mask, errors, embeddings of the ok rows."""

    def __init__(self, folder: Path):
        self.folder = folder

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz"))

    def done_rows(self, n: int) -> np.ndarray:
        done = np.zeros(n, dtype=bool)
        for shard in self.shards():
            with np.load(shard) as z:
                done[z["rows"]] = True
        return done

    def write(self, rows, ok, errors, embeddings) -> None:
        index = len(self.shards())
        with atomic_path(self.folder / f"shard-{index:06d}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, rows=np.asarray(rows, dtype=np.int64), ok=np.asarray(ok, dtype=bool),
                         errors=np.asarray(errors, dtype=str), embeddings=np.asarray(embeddings))


def _library_versions() -> dict:
    import faiss, h5py, torch, torchvision
    versions = {"geoindex": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "faiss": faiss.__version__, "h5py": h5py.__version__,
                "numpy": np.__version__, "pandas": pd.__version__}
    for module in ("open_clip", "timm"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return versions


def build_index(data, name: str | None = None, backbone: str | Backbone = "auto", weights=None, index_dir=None,
                per_city: int | None = None, image_size: int | None = None, batch_size: int = 64,
                num_workers: int | None = None, device: str = "auto", index_type: str = "flat",
                index_params: dict | None = None, seed: int = 0, fractions=(0.8, 0.1, 0.1), dtype: str = "float16",
                overwrite: bool = False, progress: bool = True, checkpoint_rows: int = 2048,
                checkpoint_seconds: float = 30.0, on_batch: Callable[[int], None] | None = None,
                log: Callable[[str], None] = print, engine="local") -> BuildReport:
    """Embed every image of a dataset and index the train split; returns a BuildReport.

    Rerunning after an interruption resumes from the checkpoint shards, provided the dataset,
    split and backbone are the same (otherwise pass overwrite=True to start over).
    engine: "local", "ray" or a geoindex.engines engine (e.g. get_engine("ray", address=...)).
    """
    if index_type not in INDEX_TYPES:
        raise GeoindexError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if dtype not in ("float16", "float32"):
        raise GeoindexError("dtype must be float16 or float32")
    if isinstance(backbone, str) and backbone == "auto":
        backbone, reason = choose_default_backbone()
        log(f"backbone: {backbone} ({reason})")
    dataset = scan_dataset(data)
    records = prepare_records(dataset, seed=seed, fractions=fractions, per_city=per_city)
    synthetic = (Path(dataset.root) / SYNTHETIC_MARKER).exists()
    device = resolve_device(device)
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, weights=weights, image_size=image_size, device=device)
    name = name or f"{Path(dataset.root).resolve().name}-{backbone.name}"
    out = index_home(index_dir) / name
    if (out / MANIFEST).exists():
        if not overwrite:
            raise GeoindexError(f"index {name!r} already exists at {out}; pass --overwrite to rebuild it "
                                "or --name to build another")
        shutil.rmtree(out)

    plan = {"backbone": backbone.name, "weights": backbone.weights.to_dict(), "image_size": backbone.image_size,
            "dtype": dtype, "records": _fingerprint(records), "n": len(records)}
    partial = out / PARTIAL
    if partial.exists():
        previous = json.loads((partial / "plan.json").read_text()) if (partial / "plan.json").exists() else None
        if previous != plan:
            if not overwrite:
                raise GeoindexError(f"an unfinished build with other settings or data is in {partial}; pass "
                                    "--overwrite to discard it, or rerun with the settings it was started with")
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(partial / "plan.json", plan)

    checkpoints = _Checkpoints(partial)
    done = checkpoints.done_rows(len(records))
    pending = np.flatnonzero(~done)
    report = BuildReport(name, out, {}, resumed_rows=int(done.sum()))
    if report.resumed_rows:
        log(f"resuming: {report.resumed_rows} of {len(records)} images already embedded")
    if synthetic:
        log("NOTE: this data tree is SYNTHETIC (generated images); its figures say nothing about real photos")

    report.seconds_extracting = _extract(backbone, records, pending, checkpoints, batch_size, num_workers, device,
                                         progress, checkpoint_rows, checkpoint_seconds, on_batch, report, engine)
    manifest = _finish(out, records, checkpoints, backbone, dataset, plan, index_type, index_params, progress, report,
                       dict(seed=seed, fractions=list(fractions), per_city=per_city, batch_size=batch_size,
                            device=str(device), synthetic=synthetic))
    shutil.rmtree(partial)
    report.manifest = manifest
    return report


def _extract(backbone, records, pending, checkpoints, batch_size, num_workers, device, progress, checkpoint_rows,
             checkpoint_seconds, on_batch, report, engine=None) -> float:
    """Embed the pending rows through an engine (geoindex.engines); every shard it finishes becomes a checkpoint."""
    if len(pending) == 0:
        return 0.0
    from .engines import get_engine

    engine = get_engine("local") if engine is None else (get_engine(engine) if isinstance(engine, str) else engine)

    def persist(shard):
        checkpoints.write(shard.rows, shard.ok, shard.errors, shard.embeddings)
        report.extracted_rows += len(shard.rows)

    start = time.perf_counter()
    engine.embed(backbone, pending, records["path"].to_numpy()[pending], persist, batch_size=batch_size,
                 num_workers=num_workers, device=device, progress=progress, shard_rows=checkpoint_rows,
                 shard_seconds=checkpoint_seconds, on_batch=on_batch)
    return time.perf_counter() - start


def _finish(out: Path, records: pd.DataFrame, checkpoints: _Checkpoints, backbone: Backbone, dataset, plan,
            index_type, index_params, progress, report: BuildReport, settings: dict) -> dict:
    n = len(records)
    ok = np.zeros(n, dtype=bool)
    errors = np.empty(n, dtype=object)
    shards = checkpoints.shards()
    for shard in shards:
        with np.load(shard) as z:
            ok[z["rows"]] = z["ok"]
            errors[z["rows"]] = z["errors"]
    skipped = list(dataset.skipped) + [{"path": p, "reason": str(e)} for p, e in
                                       zip(records["path"][~ok], errors[~ok])]
    report.skipped = skipped
    classes = sorted(records["city"].unique())
    kept = records[ok]
    counts = {s: int((kept["split"] == s).sum()) for s in SPLITS}
    if counts["train"] == 0:
        raise GeoindexError("no training image could be read; see the skipped files for reasons")

    # Row -> position inside its split's block of the final file.
    position = np.full(n, -1, dtype=np.int64)
    for split in SPLITS:
        rows = np.flatnonzero(ok & (records["split"].to_numpy() == split))
        position[rows] = np.arange(len(rows))
    split_of = records["split"].to_numpy()

    with atomic_path(out / EMBEDDINGS) as tmp:
        with create_store(tmp, counts, backbone.embed_dim, plan["dtype"], classes,
                          {"backbone": backbone.name, "normalization": "l2"}) as f:
            for split in SPLITS:
                write_metadata(f[split], kept[kept["split"] == split], classes)
            for shard in shards:
                with np.load(shard) as z:
                    rows = z["rows"][z["ok"]]
                    for split in SPLITS:
                        mine = split_of[rows] == split
                        if mine.any():
                            pos = position[rows[mine]]
                            order = np.argsort(pos)
                            f[split]["embeddings"][pos[order]] = z["embeddings"][mine][order].astype(plan["dtype"])

    with EmbeddingStore(out / EMBEDDINGS) as store:
        index_info = _build_faiss(store, out, index_type, index_params, progress)

    per_city = {split: kept[kept["split"] == split]["city"].value_counts().sort_index().to_dict() for split in SPLITS}
    manifest = {
        "format": 1,
        "name": out.name,
        "backbone": backbone.name,
        "weights": backbone.weights.to_dict(),
        "embed_dim": backbone.embed_dim,
        "normalization": "l2",
        "dtype": plan["dtype"],
        "image_size": backbone.image_size,
        "preprocessing": {"resize": backbone.transform.resize_size, "crop": backbone.image_size,
                          "interpolation": backbone.transform.interpolation, "mean": list(backbone.mean),
                          "std": list(backbone.std)},
        "data_root": str(Path(dataset.root).resolve()),
        "layout": dataset.layout,
        "synthetic": settings.pop("synthetic"),
        "split": {"seed": settings["seed"], "fractions": settings["fractions"], "by": "place_id" if dataset.layout == "gsv-cities" else "image",
                  "per_city": settings["per_city"]},
        "classes": classes,
        "counts": counts,
        "counts_per_city": per_city,
        "skipped": skipped,
        "index": index_info,
        "extraction": {"batch_size": settings["batch_size"], "device": settings["device"],
                       "images_per_second": round(report.images_per_second, 2) if report.extracted_rows else None,
                       "resumed_rows": report.resumed_rows},
        "versions": _library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _build_faiss(store: EmbeddingStore, out: Path, index_type: str, index_params: dict | None, progress: bool,
                 recall_queries: int = 1000, k: int = 20) -> dict:
    n, d = store.count("train"), store.embed_dim
    sample = None
    if index_type in TRAINED_TYPES:
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(n, size=min(n, 100_000), replace=False))
        sample = store.embeddings("train", rows)
    blocks = (block for _, block in store.iter_blocks("train"))
    index, params = build_from_blocks(index_type, d, n, blocks, sample, index_params, progress)
    save_index(index, out / FAISS_INDEX)
    info = {"type": index_type, "params": params, "ntotal": int(index.ntotal), "metric": "inner_product",
            "bytes": (out / FAISS_INDEX).stat().st_size}
    if index_type != "flat":
        # Recall is measured, not assumed: approximate vs exact neighbours for held-out queries.
        split = "val" if store.count("val") else "train"
        rows = np.arange(min(recall_queries, store.count(split)))
        queries = store.embeddings(split, rows)
        kk = min(k, n)
        _, approx = search(index, queries, kk, store.memmap("train"), int(params.get("rerank", 1)))
        _, exact = exact_search(queries, store.iter_blocks("train"), kk)
        info[f"recall@{kk}"] = round(recall_at_k(approx, exact), 4)
    return info
