"""`build_index`: dataset -> embeddings (keyed by photo) -> split of what decodes -> HDF5 + FAISS -> manifest.

Nothing is lost, nothing is half-visible:

* A build works in `<home>/.staging/<name>/`: `cache/` holds checkpoint shards of embeddings keyed
  by the photo (path, size, mtime), written atomically every `checkpoint_rows` photos or
  `checkpoint_seconds`, whichever comes first; `index/` is where the finished index is assembled.
* The finished folder replaces `<home>/<name>` in one atomic swap, so a query sees the old index
  or the new one, never a mix; then the staging folder (and the old index) is deleted.
* A rerun after a kill at any point picks up from the shards and gives the same index, bit for bit.
  A rerun over a changed file list embeds only new or changed photos (also from the index it replaces).
* One build per name at a time (locks.IndexLock); SIGTERM saves like Ctrl-C; a full disk stops with
  one line saying what is kept.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import __version__
from .backbones import Backbone, create_backbone
from .data import SPLITS, SplitInfo, limit_per_city, order_by_split, scan_dataset, split_records
from .errors import GeoindexError
from .extraction import PRECISION_KEY, QUANTIZED, precision_of, prepare_runtime, resolve_device, set_precision
from .fileio import (MARKER, STAGING, atomic_path, check_index_name, fault_point, index_home, made_by_geoindex,
                     name_from, remove_geoindex_folder, replace_dir, write_json_atomic)
from .config import BuildConfig, ExtractionConfig, split_options
from .integrity import IndexCorrupt, describe_files, read_manifest, verify_files
from .locks import IndexLock, writing_to
from .search import INDEX_TYPES, TRAINED_TYPES, build_from_blocks, exact_search, recall_at_k, save_index, search
from .store import EmbeddingStore, create_store, write_metadata
from .synthetic import SYNTHETIC_MARKER

from .layout import (CURVES, EMBEDDINGS, FAISS_INDEX, HEAD_META, HISTORY, INDEX_FILES, KNN_PARAMS,  # noqa: F401
                     MANIFEST, REEMBED_MARK, SKIPPED, TUNED_WEIGHTS, head_dir)


DEFAULT_BACKBONE = "effnet-duo"


def choose_default_backbone() -> tuple[str, str]:
    """The most accurate backbone measured on real photos that works offline (benchmarks/accuracy.md)."""
    return DEFAULT_BACKBONE, ("EfficientNet-Lite0 + Lite2, the best of the offline backbones on validation photos "
                              "(benchmarks/accuracy.md); their weights ship with pip")


@dataclass
class BuildReport:
    name: str
    path: Path
    manifest: dict
    extracted_rows: int = 0          # photos embedded by this run (readable ones only)
    failed_rows: int = 0             # photos this run tried and could not read
    resumed_rows: int = 0            # photos whose embedding came from a checkpoint or the replaced index
    seconds_extracting: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.extracted_rows / self.seconds_extracting if self.seconds_extracting else float("nan")


@dataclass
class BuildPaths:
    home: Path
    name: str

    @property
    def target(self) -> Path:
        return self.home / self.name

    @property
    def staging(self) -> Path:
        return self.home / STAGING / self.name

    @property
    def cache(self) -> Path:
        return self.staging / "cache"

    @property
    def assembly(self) -> Path:
        return self.staging / "index"

    @property
    def plan(self) -> Path:
        return self.staging / "plan.json"


# ---------------------------------------------------------------------------------------------- cache
SHARD_FIELDS = ("paths", "sizes", "mtimes", "ok", "errors", "digests", "embeddings")


class EmbeddingCache:
    """Embeddings keyed by photo: (path, size, mtime_ns) -> (source, row, ok, error, digest).

    Sources are this build's checkpoint shards and, when an index is rebuilt, the index it replaces.
    `write` is the checkpoint sink: it persists one shard of finished rows atomically.
    """

    def __init__(self, folder: Path, embed_dim: int):
        self.folder = Path(folder)
        self.embed_dim = embed_dim
        self.entries: dict[tuple, tuple] = {}
        self.sources: list = []      # Path of a shard, or (EmbeddingStore, split)
        self.row_keys: list[tuple] = []
        self._next_shard = 0

    def __len__(self):
        return len(self.entries)

    def load_shards(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # a shard being written when a run was killed
            stale.unlink()
        shards = sorted(self.folder.glob("shard-*.npz"))
        for shard in shards:
            self._register_shard(shard)
        if shards:
            self._next_shard = int(shards[-1].stem.split("-")[1]) + 1
        return len(shards)

    def _register_shard(self, shard: Path) -> None:
        try:
            with np.load(shard, allow_pickle=False) as z:
                if set(z.files) != set(SHARD_FIELDS):
                    raise ValueError(f"fields {sorted(z.files)}")
                paths, sizes, mtimes = z["paths"], z["sizes"], z["mtimes"]
                ok, errors, digests = z["ok"].astype(bool), z["errors"], z["digests"]
            if not (len(paths) == len(sizes) == len(mtimes) == len(ok) == len(errors) == len(digests)):
                raise ValueError("columns of different lengths")
        except Exception as exc:  # noqa: BLE001 - a planted or damaged file: refuse it, never unpickle it
            raise GeoindexError(f"checkpoint {shard} is not a geoindex checkpoint ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it (or rebuild with "
                                "--overwrite) and rerun") from None
        source = len(self.sources)
        self.sources.append(shard)
        position = np.cumsum(ok) - 1
        for i in range(len(paths)):
            key = (str(paths[i]), int(sizes[i]), int(mtimes[i]))
            self.entries[key] = (source, int(position[i]) if ok[i] else -1, bool(ok[i]), str(errors[i]),
                                 str(digests[i]))

    def add_index(self, store: EmbeddingStore) -> int:
        """Offer the rows of the index being replaced; returns how many photos it holds."""
        added = 0
        for split in SPLITS:
            keys = store.photo_keys(split)
            if keys is None:
                return 0
            source = len(self.sources)
            self.sources.append((store, split))
            for row, (path, size, mtime, digest) in enumerate(keys.itertuples(index=False)):
                self.entries.setdefault((path, int(size), int(mtime)), (source, row, True, "", digest))
                added += 1
        return added

    def bind(self, keys: list[tuple]) -> None:
        """The (path, size, mtime_ns) of each row number `write` will be given."""
        self.row_keys = keys

    def write(self, rows, ok, errors, embeddings, digests=None) -> None:
        """Checkpoint sink: persist finished rows (indices into the bound rows) as one shard, atomically."""
        rows = np.asarray(rows, dtype=np.int64)
        ok = np.asarray(ok, dtype=bool)
        digests = [""] * len(rows) if digests is None else list(digests)
        keys = [self.row_keys[r] for r in rows]
        shard = self.folder / f"shard-{self._next_shard:06d}.npz"
        with atomic_path(shard) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, paths=np.array([k[0] for k in keys], dtype=str),
                         sizes=np.array([k[1] for k in keys], dtype=np.int64),
                         mtimes=np.array([k[2] for k in keys], dtype=np.int64), ok=ok,
                         errors=np.array([str(e) for e in errors], dtype=str), digests=np.array(digests, dtype=str),
                         embeddings=np.asarray(embeddings, dtype=np.float32).reshape(-1, self.embed_dim))
                fh.flush()
                os.fsync(fh.fileno())
        self._next_shard += 1
        source = len(self.sources)
        self.sources.append(shard)
        position = np.cumsum(ok) - 1
        for i, key in enumerate(keys):
            self.entries[key] = (source, int(position[i]) if ok[i] else -1, bool(ok[i]), str(errors[i]), digests[i])
        fault_point("checkpoint")

    def embeddings(self, source: int, rows: np.ndarray) -> np.ndarray:
        src = self.sources[source]
        if isinstance(src, Path):
            with np.load(src, allow_pickle=False) as z:
                return z["embeddings"][rows].astype(np.float32)
        store, split = src
        return store.embeddings(split, rows)


# ---------------------------------------------------------------------------------------------- helpers
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


def _photo_keys(paths) -> tuple[list[tuple], dict[int, str]]:
    keys, problems = [], {}
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
            keys.append((path, int(st.st_size), int(st.st_mtime_ns)))
        except OSError as exc:
            keys.append((path, -1, -1))
            problems[i] = f"cannot read file: {exc.strerror or exc}"
    return keys, problems


def _embedding_plan(backbone: Backbone, max_pixels, precision: str | None = None, calibration: str | None = None) -> dict:
    """What an embedding depends on: two builds agreeing on this can share embeddings. The precision is named only
    for a quantized model (fp32 and bf16 embeddings agree within geoindex.runtime.BF16_TOLERANCE, as the runtimes
    do, so indexes built before --precision existed still share theirs); a quantized model also depends on the
    photos it was calibrated on (`calibration`, their key), so embeddings of two int8 models made from other samples
    are never mixed in one index."""
    return {"backbone": backbone.name, "weights_sha256": backbone.weights.sha256, "weights_source": backbone.weights.source,
            "image_size": backbone.image_size, "resize": backbone.transform.resize_size,
            "interpolation": backbone.transform.interpolation, "max_pixels": max_pixels} | (
        {"precision": precision, "calibration": calibration} if precision in QUANTIZED else {})


@contextlib.contextmanager
def _sigterm_as_interrupt(state: dict):
    """SIGTERM (a scheduler, `kill`, a closed session) saves like Ctrl-C instead of losing the unsaved rows."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        state["terminated"] = True
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left" in text or "errno = 28" in text or "Disk quota" in text


class StageEstimate:
    """Says once, early in a stage of `total` photos, about how long the whole stage will take: the time so far
    plus what is left at the speed measured since the first batch ended. The first batch pays for warming up (a
    CUDA context and its kernel choice, loader workers starting), which on a GPU made a 13-second stage read
    "about 4 min"; and the speed is taken over at least MEASURE_S seconds, since the loader's workers decode the
    next batches while the first is computed, which would flatter a single batch."""

    MEASURE_S = 3.0

    def __init__(self, log: Callable[[str], None], what: str, total: int, clock: Callable[[], float] = time.perf_counter):
        self.log, self.what, self.total, self.clock = log, what, total, clock
        self.started, self.done = clock(), 0
        self.first_batch_end: tuple[float, int] | None = None  # (time, photos done)
        self.said = total == 0

    def seen(self, photos: int) -> None:
        self.done += photos
        if self.said or photos == 0:
            return
        if self.done >= self.total:  # the stage ended before a speed could be measured: nothing left to say
            self.said = True
            return
        now = self.clock()
        if self.first_batch_end is None:
            self.first_batch_end = (now, self.done)
            return
        since, done_then = self.first_batch_end
        if now - since < self.MEASURE_S:
            return
        self.said = True
        rate = (self.done - done_then) / (now - since)
        seconds = now - self.started + (self.total - self.done) / rate
        took = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
        self.log(f"{self.what}: {self.total:,} photos, about {took} at {rate:.1f} photos/s")


def _new_assembly(paths: BuildPaths) -> Path:
    """An empty assembly folder, marked as geoindex's: where the next version of the index is put together."""
    out = paths.assembly
    if out.exists():  # one a killed run did not finish
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by geoindex: this folder is an index; `geoindex rm NAME` deletes it\n")
    return out


def _commit_assembly(paths: BuildPaths) -> None:
    """Swap the finished assembly in for the index in one atomic step, then clear what it replaced."""
    replace_dir(paths.assembly, paths.target)  # the one step that makes the new index visible
    fault_point("commit")
    if paths.assembly.exists():                # now the replaced index (if any)
        shutil.rmtree(paths.assembly)
    fault_point("cleanup")
    _clean_leftovers(paths)


def _clean_leftovers(paths: BuildPaths) -> None:
    """What builds of earlier versions (or killed ones) left beside a finished index."""
    if paths.target.is_dir():
        for tmp in paths.target.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        legacy = paths.target / ".partial"
        if legacy.is_dir():
            shutil.rmtree(legacy)
    if paths.staging.exists():
        shutil.rmtree(paths.staging)
    with contextlib.suppress(OSError):
        paths.staging.parent.rmdir()  # .staging/ itself, once empty


def _trained_parts(folder: Path) -> list[str]:
    """What `geoindex train` added to an index, which a rebuild cannot keep (it reads the old embeddings)."""
    parts = []
    with contextlib.suppress(OSError, ValueError, IndexCorrupt):
        if read_manifest(folder).get("adapted"):
            parts.append("the backbone adapted to its cities")
    names = {"probe": "the probe head", "finetune": "the fine-tuned head", "knn": "the kNN tuning"}
    for mode, said in names.items():
        if any((folder / head_dir(mode) / f).is_file() for f in (HEAD_META, KNN_PARAMS.name)):
            parts.append(said)
    return parts


def _report_from_index(paths: BuildPaths) -> BuildReport:
    manifest = read_manifest(paths.target)
    report = BuildReport(paths.name, paths.target, manifest)
    with contextlib.suppress(OSError, ValueError):
        listed = json.loads((paths.target / SKIPPED).read_text())
        report.skipped, report.duplicates = listed.get("skipped", []), listed.get("duplicates", [])
    return report


# ---------------------------------------------------------------------------------------------- build
def build_index(data, *, name: str | None = None, backbone: str | Backbone = "auto", config: BuildConfig | None = None,
                weights=None, index_dir=None, overwrite: bool = False, progress: bool = True,
                on_batch: Callable[[int], None] | None = None, log: Callable[[str], None] = print,
                **options) -> BuildReport:
    """Embed every photo of a dataset, split those that decode, and index the train split; returns a BuildReport.

    config: a BuildConfig (data, split, storage, index, checkpoints, engine, and its ExtractionConfig). Any of
    their fields may also be passed by name (`cell_km=5`, `batch_size=32`, `num_workers=0`): they replace the
    config's. Rerunning after an interruption resumes from the checkpoints. With overwrite=True an existing
    index is rebuilt (it keeps answering queries until the new one replaces it), reusing the embeddings of
    photos that did not change: this is how photos are added to an index.
    engine: "local", "ray" or a geoindex.engines engine (e.g. get_engine("ray", address=...)).
    features_from: an index (name, path or GeoIndex) that did the training and tuning: embed with its backbone and
    tuned weights, copy its kNN settings, and make every photo searchable (no split; geoindex.features_from).
    """
    config = _with_options(config or BuildConfig(), options)
    if config.index_type not in INDEX_TYPES:
        raise GeoindexError(f"unknown index type {config.index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if config.dtype not in ("float16", "float32"):
        raise GeoindexError("dtype must be float16 or float32")
    if config.max_pixels is not None and config.max_pixels < 1:
        raise GeoindexError("max_pixels must be positive")
    source = config.features_from
    if source is not None:
        from .features_from import check_options
        check_options(config, backbone=backbone, weights=weights)
        backbone_name = f"from-{Path(str(getattr(source, 'name', source))).name}"
    else:
        if isinstance(backbone, str) and backbone == "auto":
            backbone, reason = choose_default_backbone()
            log(f"backbone: {backbone} ({reason})")
        backbone_name = backbone if isinstance(backbone, str) else backbone.name
    name = check_index_name(name) if name is not None else \
        check_index_name(name_from(f"{Path(data).expanduser().resolve().stem}-{backbone_name}"))
    home = index_home(index_dir)
    home.mkdir(parents=True, exist_ok=True)
    job = _BuildJob(BuildPaths(home, name), config, weights, overwrite, progress, on_batch, log)
    with IndexLock(home, name), _sigterm_as_interrupt(job.state):
        if source is None:
            return _build_locked(job, data, backbone)
        from .features_from import feature_source
        with feature_source(source, index_dir=home, building=job.paths.target, log=log) as job.source:
            return _build_locked(job, data, backbone)


def _with_options(config: BuildConfig, options: dict) -> BuildConfig:
    """The config with the fields given by name replaced (the keyword arguments build_index took before configs)."""
    (build, extraction), unknown = split_options(options, BuildConfig, ExtractionConfig)
    if unknown:
        raise TypeError(f"build_index() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if extraction:
        build["extraction"] = config.extraction.replace(**extraction)
    return config.replace(**build) if build else config


@dataclass
class _BuildJob:
    """One build's settings and the callbacks it reports to, handed down the stages as one value."""
    paths: BuildPaths
    config: BuildConfig
    weights: object = None
    overwrite: bool = False
    progress: bool = True
    on_batch: Callable[[int], None] | None = None
    log: Callable[[str], None] = print
    state: dict = field(default_factory=lambda: {"terminated": False})
    embedding_plan: dict | None = None  # what the embeddings depend on (_embedding_plan), set once per build
    source: object = None  # features_from.FeatureSource: the index whose features and kNN settings are borrowed


def _build_locked(job: _BuildJob, data, backbone) -> BuildReport:
    paths, config, log, overwrite = job.paths, job.config, job.log, job.overwrite
    extraction = config.extraction
    name, target = paths.name, paths.target
    # A run killed after its swap but before its clean-up: the index is complete; finish the clean-up.
    if paths.plan.is_file() and (target / MANIFEST).is_file():
        with contextlib.suppress(OSError, ValueError, IndexCorrupt):
            if json.loads(paths.plan.read_text()).get("build_id") == read_manifest(target).get("build_id"):
                _clean_leftovers(paths)
                log(f"index {name!r} was already complete; removed what the interrupted run left behind")
                return _report_from_index(paths)
    if target.exists():
        if not made_by_geoindex(target):
            raise GeoindexError(f"{target} exists and was not made by geoindex; choose another --name "
                                "(geoindex never deletes a folder it did not make)")
        if not overwrite:
            raise GeoindexError(f"index {name!r} already exists at {target}; pass --overwrite to rebuild it "
                                "(unchanged photos are not embedded again) or --name to build another")
        trained = _trained_parts(target) if job.source is None else []
        if trained:
            log(f"note: the rebuilt index {name!r} will not have what `geoindex train` added to this one "
                f"({', '.join(trained)}): they were made for its old embeddings; run `geoindex train` again afterwards")

    dataset = scan_dataset(data, follow_symlinks=config.follow_symlinks)
    fault_point("scan")
    for note in dataset.notes:
        log(f"data: {note}")
    records = dataset.records
    if config.per_city:
        records = limit_per_city(records, config.per_city, config.seed, config.split_by, config.cell_km)
    # The embedding order is the path order: a resumed run then embeds exactly the batches a fresh one would.
    records = records.sort_values("path", kind="stable").reset_index(drop=True)
    synthetic = (Path(dataset.root) / SYNTHETIC_MARKER).exists()
    device = resolve_device(extraction.device)
    if job.source is not None:
        from .features_from import check_backbone
        source = job.source
        backbone = create_backbone(source.manifest["backbone"], weights=source.weights_argument(),
                                   image_size=source.manifest["image_size"], device=device)
        check_backbone(source, backbone)
        if config.max_pixels == BuildConfig.max_pixels and source.max_pixels != config.max_pixels:
            config = job.config = config.replace(max_pixels=source.max_pixels)  # decoded as NAME's photos were
        log(f"features from index {source.name!r}: {backbone.name} at {backbone.image_size} px, "
            f"{'tuned ' if source.manifest.get('adapted') else ''}{backbone.weights.source} weights")
    elif isinstance(backbone, str):
        backbone = create_backbone(backbone, weights=job.weights, image_size=extraction.image_size, device=device)
    calibration = None
    if extraction.precision in QUANTIZED:
        from .runtime import Calibration
        calibration = Calibration(_calibration_photos(records, config), load=None).key
    embedding_plan = job.embedding_plan = _embedding_plan(backbone, config.max_pixels, extraction.precision,
                                                          calibration)

    if paths.staging.exists():
        try:
            previous = json.loads(paths.plan.read_text())
        except (OSError, ValueError):
            previous = None
        if previous is None or previous.get("embedding") != embedding_plan:
            if not overwrite:
                raise GeoindexError(f"an unfinished build of {name!r} with other settings (backbone, weights or image "
                                    f"size) is in {paths.staging}; rerun it with the settings it was started with, "
                                    "or pass --overwrite to discard it")
            remove_geoindex_folder(paths.staging, paths.home)
    paths.staging.mkdir(parents=True, exist_ok=True)
    if paths.assembly.exists():  # an assembly a killed run did not finish: redone from the cache
        shutil.rmtree(paths.assembly)
    build_id = uuid.uuid4().hex
    write_json_atomic(paths.plan, {"build_id": build_id, "embedding": embedding_plan, "started_by_pid": os.getpid()})

    cache = EmbeddingCache(paths.cache, backbone.embed_dim)
    cache.load_shards()
    old_store = None
    try:
        if overwrite and (target / EMBEDDINGS).is_file():
            old_store = _open_reusable_index(target, embedding_plan, config.dtype, log)
            if old_store is not None:
                cache.add_index(old_store)
        report = BuildReport(name, target, {})
        if synthetic:
            log("NOTE: this data tree is SYNTHETIC (generated images); its figures say nothing about real photos")
        try:
            report.manifest = _run(job, cache, records, dataset, backbone,
                                   _Settings(build_id, str(device), synthetic), report)
        except KeyboardInterrupt:
            log(f"\ninterrupted{' (SIGTERM)' if job.state['terminated'] else ''}: {len(cache)} photos' embeddings are "
                f"saved in {paths.cache}; rerun the same command to resume")
            raise
        except (OSError, RuntimeError) as exc:
            if not _is_disk_full(exc):
                raise
            raise GeoindexError(f"disk full while writing {getattr(exc, 'filename', None) or paths.staging}: "
                                f"{len(cache)} photos' embeddings are kept in {paths.cache}; free some space and "
                                "rerun the same command to resume") from None
    finally:
        if old_store is not None:
            old_store.close()

    _commit_assembly(paths)
    return report


@dataclass
class _Settings:
    """What one run decided on the way (not the user's settings: those are the job's config)."""
    build_id: str
    device: str
    synthetic: bool
    split_info: object = None


def _open_reusable_index(target: Path, embedding_plan: dict, dtype: str, log) -> EmbeddingStore | None:
    """The index being replaced, when its embeddings can stand in for recomputing them; else None."""
    try:
        manifest = read_manifest(target)
        verify_files(target, manifest)
    except IndexCorrupt as exc:
        log(f"not reusing the old index's embeddings: {exc}")
        return None
    if manifest.get("embedding") != embedding_plan:
        return None
    if manifest.get("dtype") == "float16" and dtype == "float32":
        return None  # its rows lost precision the new index asks to keep
    try:
        return EmbeddingStore(target / EMBEDDINGS)
    except OSError:
        return None


def _run(job: _BuildJob, cache: EmbeddingCache, records: pd.DataFrame, dataset, backbone: Backbone,
         settings: _Settings, report: BuildReport) -> dict:
    config, log = job.config, job.log
    keys, stat_problems = _photo_keys(records["path"].tolist())
    cache.bind(keys)
    known = np.array([k in cache.entries for k in keys], dtype=bool)
    for i in stat_problems:
        known[i] = True  # nothing to embed: its error is recorded below
    pending = np.flatnonzero(~known)
    report.resumed_rows = int(known.sum()) - len(stat_problems)
    if report.resumed_rows:
        log(f"resuming: {report.resumed_rows} of {len(records)} photos already embedded")
    report.seconds_extracting = _extract(job, backbone, records, pending, cache, report)

    n = len(records)
    ok = np.zeros(n, dtype=bool)
    source = np.full(n, -1, dtype=np.int64)
    row_in_source = np.full(n, -1, dtype=np.int64)
    errors = [""] * n
    digests = [""] * n
    for i, key in enumerate(keys):
        if i in stat_problems:
            errors[i] = stat_problems[i]
            continue
        src, row, good, error, digest = cache.entries[key]
        ok[i], source[i], row_in_source[i], errors[i], digests[i] = good, src, row, error, digest
    skipped = list(dataset.skipped) + [{"path": records["path"][i], "reason": errors[i]} for i in np.flatnonzero(~ok)]
    report.skipped = skipped
    if not ok.any():
        raise GeoindexError("no photo could be read; see the skipped files for reasons")

    # The split is drawn over the photos that decode, so every split gets its share of usable photos.
    decodable = records[ok].assign(size=[keys[i][1] for i in np.flatnonzero(ok)],
                                   mtime_ns=[keys[i][2] for i in np.flatnonzero(ok)],
                                   digest=[digests[i] for i in np.flatnonzero(ok)],
                                   _source=source[ok], _row=row_in_source[ok])
    if job.source is not None:  # the source index did the training and tuning: everything is searchable
        split = pd.Series("train", index=decodable.index, dtype=object)
        split_info = SplitInfo("none", config.seed, (1.0, 0.0, 0.0))
        log(f"split: none, every photo is searchable (index {job.source.name!r} did the training and tuning)")
    else:
        split, split_info = split_records(decodable, config.seed, config.fractions, config.split_by, config.cell_km)
        log(f"split: by {split_info.by}" + (f" ({config.cell_km:g} km cells)" if split_info.by == "cell" else ""))
    settings.split_info = split_info
    decodable = decodable.assign(split=split)
    if split_info.warning:
        log(f"WARNING: {split_info.warning}")
    if split_info.small_cities:
        log(f"WARNING: too few places/cells for train, val and test in: {', '.join(split_info.small_cities)}")

    decodable, duplicates, dropped = _handle_duplicates(decodable)
    report.duplicates = duplicates
    skipped.extend(dropped)
    if duplicates:
        cross = sum(1 for d in duplicates if len(set(d["cities"])) > 1)
        log(f"WARNING: {len(duplicates)} photo(s) stored more than once ({cross} under different cities); "
            f"{len(dropped)} copies kept out of val/test (listed in {SKIPPED})")
    ordered = order_by_split(decodable)
    return _assemble(job, ordered, cache, backbone, dataset, settings, report)


def _handle_duplicates(decodable: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """Byte-identical photos: listed; copies in val/test dropped (a test photo must not be in the index)."""
    repeated = decodable["digest"].duplicated(keep=False) & (decodable["digest"] != "")
    if not repeated.any():
        return decodable, [], []
    groups = []
    for digest, group in decodable[repeated].groupby("digest", sort=True):
        groups.append({"digest": digest, "paths": group["path"].tolist(), "cities": group["city"].tolist(),
                       "splits": group["split"].tolist()})
    drop = repeated & (decodable["split"] != "train")
    first_path = decodable[repeated].groupby("digest")["path"].first()
    dropped = [{"path": row.path, "reason": f"same bytes as {first_path[row.digest]}"
                + (" (under another city)" if decodable[decodable["digest"] == row.digest]["city"].nunique() > 1 else "")
                + "; kept out of val/test"} for row in decodable[drop].itertuples()]
    return decodable[~drop], groups, dropped


def _extract(job: _BuildJob, backbone: Backbone, records: pd.DataFrame, pending: np.ndarray,
             checkpoints: EmbeddingCache, report: BuildReport) -> float:
    """Embed the pending rows through an engine (geoindex.engines); every shard it finishes becomes a checkpoint."""
    if len(pending) == 0:
        return 0.0
    from .engines import get_engine

    config, extraction, state = job.config, job.config.extraction, job.state
    engine = get_engine(config.engine) if isinstance(config.engine, str) else config.engine

    def persist(shard):
        checkpoints.write(shard.rows, shard.ok, shard.errors, shard.embeddings, shard.digests or None)
        report.extracted_rows += int(shard.ok.sum())
        report.failed_rows += int((~shard.ok).sum())

    paths = records["path"].to_numpy()[pending]
    if extraction.precision in QUANTIZED:
        if getattr(engine, "name", None) != "local":
            raise GeoindexError(f"--precision {extraction.precision} runs with --engine local only (the calibrated "
                                "model is made in this process)")
        set_precision(backbone, extraction.precision, _calibration_photos(records, config))
    else:
        set_precision(backbone, extraction.precision)
    prepare_runtime(backbone, resolve_device(extraction.device))  # a one-off export (cached) is not embedding time: photos/s leaves it out
    start = time.perf_counter()
    try:
        engine.embed(backbone, pending, paths, sink=persist, batch_size=extraction.batch_size,
                     num_workers=extraction.num_workers, device=resolve_device(extraction.device),
                     progress=job.progress, shard_rows=config.checkpoint_rows, shard_seconds=config.checkpoint_seconds,
                     on_batch=job.on_batch, max_pixels=config.max_pixels)
    except BaseException as exc:
        if state and state.get("terminated") and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt("SIGTERM") from None  # e.g. a DataLoader worker that got the signal too
        raise
    return time.perf_counter() - start


def _calibration_photos(records: pd.DataFrame, config: BuildConfig) -> list[str]:
    """A seeded sample of the photos the split will put in train (drawn here over every listed photo, since the
    build splits only the photos that decode; _calibration_record counts how many did end in train)."""
    split, _ = split_records(records, config.seed, config.fractions, config.split_by, config.cell_km)
    train = records["path"][(split == "train").to_numpy()].to_numpy()
    n = min(len(train), config.extraction.calibration_photos)
    return sorted(np.random.default_rng(config.seed).choice(train, size=n, replace=False).tolist()) if n else []


def _calibration_record(backbone: Backbone, ordered: pd.DataFrame) -> dict:
    calibration = (backbone.extras.get(PRECISION_KEY) or {}).get("calibration")
    if calibration is None:
        return {}
    in_train = set(ordered["path"][ordered["split"] == "train"])
    return {"calibration": {"photos": len(calibration.paths),
                            "in_train": sum(path in in_train for path in calibration.paths)}}


def _assemble(job: _BuildJob, ordered: pd.DataFrame, cache: EmbeddingCache, backbone: Backbone, dataset,
              settings: _Settings, report: BuildReport) -> dict:
    paths, config = job.paths, job.config
    dtype, index_type = config.dtype, config.index_type
    skipped, duplicates = report.skipped, report.duplicates
    out = _new_assembly(paths)
    classes = sorted(ordered["city"].unique())
    counts = {s: int((ordered["split"] == s).sum()) for s in SPLITS}
    if counts["train"] == 0:
        raise GeoindexError("no training image could be read; see the skipped files for reasons")
    _check_free_space(out, ordered, counts, backbone.embed_dim, dtype, index_type, len(cache))
    split_of = ordered["split"].to_numpy()
    position = np.zeros(len(ordered), dtype=np.int64)
    for split in SPLITS:
        mine = split_of == split
        position[mine] = np.arange(int(mine.sum()))

    with atomic_path(out / EMBEDDINGS) as tmp:
        with create_store(tmp, counts, backbone.embed_dim, dtype, classes,
                          {"backbone": backbone.name, "normalization": "l2"}) as f:
            for split in SPLITS:
                write_metadata(f[split], ordered[split_of == split], classes)
            sources = ordered["_source"].to_numpy()
            rows = ordered["_row"].to_numpy()
            for src in np.unique(sources):
                mine = np.flatnonzero(sources == src)
                for start in range(0, len(mine), 65536):
                    chunk = mine[start:start + 65536]
                    vectors = cache.embeddings(int(src), rows[chunk])
                    for split in SPLITS:
                        sel = split_of[chunk] == split
                        if sel.any():
                            pos = position[chunk[sel]]
                            order = np.argsort(pos)
                            f[split]["embeddings"][pos[order]] = vectors[sel][order].astype(dtype)
    fault_point("h5")

    features_from = None
    with EmbeddingStore(out / EMBEDDINGS) as store:
        index_info = _build_faiss(store, out, index_type, config.index_params, job.progress)
        if job.source is not None:
            from .features_from import copy_into
            features_from = copy_into(job.source, out, store, settings.build_id)
    fault_point("index")

    write_json_atomic(out / SKIPPED, {"skipped": skipped, "duplicates": duplicates})
    reasons: dict[str, int] = {}
    for item in skipped:
        reason = item["reason"].split(" (")[0].split(":")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    kept = ordered
    per_city = {split: kept[split_of == split]["city"].value_counts().sort_index().to_dict() for split in SPLITS}
    manifest = {
        "format": 1,
        "name": paths.name,
        "build_id": settings.build_id,
        "backbone": backbone.name,
        "weights": backbone.weights.to_dict(),
        "embed_dim": backbone.embed_dim,
        "normalization": "l2",
        "dtype": dtype,
        "image_size": backbone.image_size,
        "preprocessing": {"resize": backbone.transform.resize_size, "crop": backbone.image_size,
                          "interpolation": backbone.transform.interpolation, "mean": list(backbone.mean),
                          "std": list(backbone.std), "max_pixels": config.max_pixels},
        "embedding": job.embedding_plan,
        "data_root": str(Path(dataset.root).resolve()),
        "layout": dataset.layout,
        "synthetic": settings.synthetic,
        "split": settings.split_info.to_dict() | {"per_city": config.per_city},
        "classes": classes,
        "counts": counts,
        "counts_per_city": per_city,
        "skipped": {"count": len(skipped), "file": SKIPPED, "reasons": dict(sorted(reasons.items()))},
        "duplicates": {"groups": len(duplicates),
                       "across_cities": sum(1 for d in duplicates if len(set(d["cities"])) > 1),
                       "file": SKIPPED},
        "index": index_info,
        "extraction": {"batch_size": config.extraction.batch_size, "device": settings.device,
                       "images_per_second": round(report.images_per_second, 2) if report.extracted_rows else None,
                       "embedded_rows": report.extracted_rows, "unreadable_rows": report.failed_rows,
                       "resumed_rows": report.resumed_rows, "runtime": backbone.extras.get("runtime"),
                       "precision": config.extraction.precision} | _calibration_record(backbone, ordered),
        "config": config.to_dict(),  # what the build was asked (BuildConfig), beside what it found above
        "versions": _library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": describe_files(out, INDEX_FILES),
    }
    if features_from is not None:
        copied = tuple(features_from.pop("files"))
        manifest["features_from"] = features_from
        if TUNED_WEIGHTS in copied:  # the copy in this index, named relative to it and checked like its other files
            manifest["weights"] = dict(job.source.manifest["weights"], path=TUNED_WEIGHTS)
        manifest["files"] = describe_files(out, INDEX_FILES + copied)
    write_json_atomic(out / MANIFEST, manifest)
    fault_point("manifest")
    return manifest


def _check_free_space(out: Path, ordered: pd.DataFrame, counts: dict, dim: int, dtype: str, index_type: str,
                      kept: int) -> None:
    """Refuse before writing rather than after: HDF5 cannot recover from a full disk mid-write (it may even crash)."""
    n = len(ordered)
    embeddings = n * dim * np.dtype(dtype).itemsize
    metadata = int(ordered["path"].str.len().sum()) + n * 96
    vectors = counts["train"] * dim * 4 * (1.3 if index_type == "hnsw" else 1 if index_type == "flat" else 0.2)
    needed = int(1.1 * (embeddings + metadata + vectors)) + (1 << 16)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise GeoindexError(f"disk full: the index needs about {needed / 1e6:.1f} MB in {out.parent}, "
                            f"{free / 1e6:.1f} MB are free; {kept} photos' embeddings are kept in "
                            f"{out.parent / 'cache'}; free some space and rerun the same command to resume")


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
        # A seeded sample across the whole split: its first rows would be one or two cities only.
        count = store.count(split)
        rows = np.sort(np.random.default_rng(0).choice(count, size=min(recall_queries, count), replace=False))
        queries = store.embeddings(split, rows)
        kk = min(k, n)
        _, approx = search(index, queries, kk, store.memmap("train"), int(params.get("rerank", 1)))
        _, exact = exact_search(queries, store.iter_blocks("train"), kk)
        info[f"recall@{kk}"] = round(recall_at_k(approx, exact), 4)
    return info


# ---------------------------------------------------------------------------------------------- re-embedding
def _check_reembedding_space(index, backbone: Backbone, home: Path) -> None:
    """Refuse before writing: HDF5 cannot recover from a full disk mid-write (it may even crash the process).
    The new copy is the size of the old one (same rows, same dtype), plus the tuned weights."""
    folder = Path(index.path)
    sizes = [folder / EMBEDDINGS, folder / FAISS_INDEX, folder / SKIPPED, Path(backbone.weights.path)]
    needed = int(1.1 * sum(p.stat().st_size for p in sizes if p.is_file())) + (1 << 20)
    free = shutil.disk_usage(home).free
    if free < needed:
        raise GeoindexError(f"disk full: re-embedding index {index.name!r} needs about {needed / 1e6:.1f} MB in {home}, "
                            f"{free / 1e6:.1f} MB are free; nothing was replaced (the index answers as before) and the "
                            "tail fine-tuning is kept in heads/tail/; free some space and rerun `geoindex train` to "
                            "finish")


def reembed_index(index, backbone: Backbone, adapted: dict, batch_size: int = ExtractionConfig.batch_size,
                  num_workers: int | None = None,
                  device="auto", progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Embed every photo of a built index again with `backbone` (its weights a file, e.g. a tuned tail), keeping
    the rows, splits and metadata, and swap the index for the result in one atomic step, as a build does.

    The weights file is copied into the index (backbone.pt, recorded relative to the index folder and checked
    like its other files), so the index stays whole when moved. Heads trained on the old embeddings are not
    carried over (they read another space); heads/<adapted mode>/ (curves, history) is. A photo that can no
    longer be read stops the run before anything is replaced.
    """
    from .extraction import iter_embeddings

    if backbone.weights.source != "file":
        raise GeoindexError("re-embedding an index takes a backbone whose weights are a file")
    home, name = Path(index.path).parent, Path(index.path).name
    paths = BuildPaths(home, name)
    dtype = index.manifest.get("dtype", "float16")
    classes = index.classes
    old = index.store
    counts = {s: old.count(s) for s in SPLITS}
    with writing_to(index, "train"):
        _check_reembedding_space(index, backbone, home)
        out = _new_assembly(paths)
        # Tells `geoindex indexes` (and rm --unfinished) that this staging is train's, not a build's.
        write_json_atomic(paths.staging / REEMBED_MARK, {"by": "train", "started_by_pid": os.getpid()})
        shutil.copyfile(backbone.weights.path, out / TUNED_WEIGHTS)
        prepare_runtime(backbone, device)
        started, embedded = time.perf_counter(), 0
        estimate = StageEstimate(log, "re-embedding", sum(counts.values()))
        try:
            with atomic_path(out / EMBEDDINGS) as tmp:
                with create_store(tmp, counts, backbone.embed_dim, dtype, classes,
                                  {"backbone": backbone.name, "normalization": "l2"}) as f:
                    for split in SPLITS:
                        meta = old.metadata(split)
                        keys = old.photo_keys(split)
                        write_metadata(f[split], meta if keys is None else meta.assign(
                            size=keys["size"].to_numpy(), mtime_ns=keys["mtime_ns"].to_numpy(),
                            digest=keys["digest"].to_numpy()), classes)
                        if not len(meta):
                            continue
                        for item in iter_embeddings(backbone, meta["path"].tolist(), batch_size=batch_size,
                                                    num_workers=num_workers, device=device, progress=progress,
                                                    desc=f"re-embedding {split} ({backbone.name}, tuned)"):
                            if not item.ok.all():
                                bad = int(item.positions[~item.ok][0])
                                why = item.errors[int(np.flatnonzero(~item.ok)[0])]
                                raise GeoindexError(f"{meta['path'].iat[bad]} can no longer be read ({why}); "
                                                    f"re-embedding needs every photo of index {name!r}: nothing was "
                                                    "replaced")
                            rows = slice(int(item.positions[0]), int(item.positions[-1]) + 1)  # batches come in order
                            f[split]["embeddings"][rows] = item.embeddings.astype(dtype)
                            embedded += len(item.positions)
                            estimate.seen(len(item.positions))
        except (OSError, RuntimeError) as exc:
            if not _is_disk_full(exc):
                raise
            shutil.rmtree(paths.staging, ignore_errors=True)  # a half-written copy: redone in full by the rerun
            raise GeoindexError(f"disk full while re-embedding index {name!r} in {home}; nothing was replaced (the "
                                "index answers as before) and the tail fine-tuning is kept in heads/tail/; free some "
                                "space and rerun `geoindex train` to finish") from None
        fault_point("reembed-h5")
        with EmbeddingStore(out / EMBEDDINGS) as store:
            index_info = _build_faiss(store, out, index.manifest["index"]["type"], index.manifest["index"].get("params"),
                                      progress)
        shutil.copyfile(Path(index.path) / SKIPPED, out / SKIPPED)
        mode_folder = head_dir(adapted["mode"])
        if (Path(index.path) / mode_folder).is_dir():
            (out / mode_folder).mkdir(parents=True)
            for kept in (HISTORY, CURVES, HEAD_META):
                if (Path(index.path) / mode_folder / kept).is_file():
                    shutil.copyfile(Path(index.path) / mode_folder / kept, out / mode_folder / kept)
        seconds = time.perf_counter() - started
        weights = backbone.weights.to_dict() | {"path": TUNED_WEIGHTS, "sha256": backbone.weights.sha256,
                                                 "description": f"{backbone.name}, {adapted['mode']} fine-tuned on "
                                                                f"index {name!r} (val accuracy "
                                                                f"{adapted['best_val_accuracy']:.3f})"}
        manifest = dict(index.manifest)
        manifest.update({
            "build_id": uuid.uuid4().hex, "weights": weights, "adapted": adapted,
            "embedding": _embedding_plan(backbone, index.manifest["embedding"].get("max_pixels")) | {
                "weights_path": TUNED_WEIGHTS},
            "index": index_info,
            "extraction": dict(index.manifest.get("extraction", {}), reembedded_rows=embedded,
                               reembedding_runtime=backbone.extras.get("runtime"),
                               reembedding_precision=precision_of(backbone),
                               reembedding_images_per_second=round(embedded / seconds, 2) if seconds else None),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": describe_files(out, INDEX_FILES + (TUNED_WEIGHTS,)),
        })
        try:
            write_json_atomic(out / MANIFEST, manifest)
        except OSError as exc:
            if not _is_disk_full(exc):
                raise
            shutil.rmtree(paths.staging, ignore_errors=True)
            raise GeoindexError(f"disk full while re-embedding index {name!r} in {home}; nothing was replaced and the "
                                "tail fine-tuning is kept in heads/tail/; free some space and rerun `geoindex train` "
                                "to finish") from None
        fault_point("reembed-manifest")
        _commit_assembly(paths)
    log(f"index {name!r} re-embedded: {embedded} photos in {seconds:.0f} s ({embedded / max(seconds, 1e-9):.1f} photos/s)")
    return manifest
