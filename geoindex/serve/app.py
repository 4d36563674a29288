"""The FastAPI app: `create_app(index)` serves one loaded GeoIndex over HTTP, and the page at `/`.

Answers come from the public API only (`index.query(images, k=...)` and `Prediction.to_dict()`),
so a photo gets the same answer here as from `geoindex query --json`, plus timings, the build_id it
came from and, for each neighbour, the index row its thumbnail is served under (never a path on the
server). Everything a query reads is loaded together as one Snapshot; when the index on disk changes
(`build --overwrite`, `train`, `rm`), a new Snapshot is loaded whole and swapped in, so an answer never
mixes two generations. An upload is decoded as soon as it has arrived, on a small thread pool (costly
ones on a lane of their own), and only its model-sized tensor waits for a batch. On a CPU the model
runs as two batches side by side, each on one thread (`--model-threads`, MicroBatcher's workers),
rather than one batch on all cores: a multi-threaded operator waits at every step for its slowest
thread, so whatever else the server does (HTTP, decoding) stalls the whole model; a one-thread batch
only loses what it lost itself.
"""

import asyncio
import io
import logging
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

from ..config import ServeConfig
from ..jsonio import jsonable
from ..layout import MANIFEST
from ..verification import LocalFeatures, shared_dense_matcher, shared_verifier
from ..verification import cache_stats as feature_cache_stats
from . import INSTALL_HINT
from .batching import MicroBatcher, QueueFull
from .uploads import (MULTIPART_OVERHEAD, ByteBudget, ClientGone, Costly, UploadError, decode_image, read_body,
                      split_uploads)

STATIC = Path(__file__).resolve().parent / "static"
THUMBNAIL_PX = 320
MAX_K = 200
COSTLY_QUEUE = 64  # costly decodes waiting for their one-thread lane; past it, 503
log = logging.getLogger("geoindex.serve")


def index_generation(path: Path) -> tuple | None:
    """What changes whenever anything a query reads changes on disk, or None once the index is gone: the folder
    (a build and train's re-embedding swap in a new one), its manifest, and the heads and kNN tuning that train
    writes in place beside them."""
    from ..layout import HEAD_FILES, HEAD_MODES, KNN_PARAMS, WHITENED_INDEX, WHITENING, head_dir

    watched = (KNN_PARAMS, WHITENING, WHITENED_INDEX) + tuple(
        head_dir(mode) / name for mode in HEAD_MODES for name in HEAD_FILES)
    try:
        folder = os.stat(path)
        manifest = os.stat(path / MANIFEST)
    except OSError:
        return None
    parts: list = [folder.st_ino, manifest.st_ino, manifest.st_mtime_ns, manifest.st_size]
    for name in watched:
        try:
            st = os.stat(path / name)
            parts.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            parts.append(None)
    return tuple(parts)


def _disk_build_id(path: Path) -> str | None:
    try:
        return json.loads((path / MANIFEST).read_text()).get("build_id")
    except (OSError, ValueError, AttributeError):
        return None


class Snapshot:
    """One generation of the index, loaded whole: vectors, metadata, backbone, head and kNN tuning (GeoIndex.freeze),
    and the thumbnails of its rows. Nothing here reads the index folder again."""

    def __init__(self, index, generation):
        self.index = index.freeze()
        self.generation = generation
        self.build_id = index.manifest.get("build_id")
        self.train = index.train_meta  # row numbers are the neighbour ids, and the only photos served
        self.transform = index.backbone.transform
        classifier = index.classifier
        self.classifier_mode = getattr(classifier, "mode", None) if classifier is not None else None
        knn = index.knn_method()
        self.k_default = knn.k
        self.verifies = ((knn.settings.street or {}).get("verify") or {}).get("inliers") is not None
        self.rescores = bool(((knn.settings.street or {}).get("rerank") or {}).get("weight"))
        self.loaded_at = time.time()
        self.thumbnail = lru_cache(maxsize=1024)(self._thumbnail)

    def _thumbnail(self, row: int) -> bytes | None:
        from PIL import Image

        from ..errors import ImageError
        from ..images import load_image
        try:
            img = load_image(self.train["path"].iat[row], draft_size=THUMBNAIL_PX)
        except ImageError:
            return None
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=85)
        return out.getvalue()


class IndexUnavailable(Exception):
    """The index on disk was removed, or its new generation cannot be loaded: nothing consistent to answer from."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def default_decode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _error_responses(*codes: int) -> dict:
    schema = {"type": "object", "properties": {"error": {"type": "string"}, "code": {"type": "string"}}}
    why = {400: "empty body or malformed form",
           413: "over --max-upload-mb or --max-request-mb, too many photos, or too many pixels (decompression bomb)",
           415: "not an image (JPEG, PNG, WebP, BMP and TIFF are read), or a Content-Type other than "
                "multipart/form-data or image/*",
           422: "corrupt or truncated image, or a bad query parameter",
           503: "busy (too many photos waiting, or --max-inflight-mb of uploads held), or the index was removed or "
                "cannot be loaded; see /healthz",
           404: "no such row in the index", 410: "the index was rebuilt since the answer that named this row"}
    return {c: {"description": why[c], "content": {"application/json": {"schema": schema}}} for c in codes}


_PHOTO_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                       "properties": {"image": {"type": "string", "format": "binary"}}}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}}}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "one file part per photo (field name 'image' or 'images')"}}}}}}}


class Locator:
    """The index snapshot, the micro-batcher in front of its model, and the decoding lanes: all a request needs.

    A watcher thread compares the index on disk with the snapshot every reload_check_s. A change is loaded only once
    it has held still for one check (train writes its head and tuning one after the other) and is swapped in only if
    the disk did not change again while it loaded. Until then answers come from the snapshot already loaded, each
    naming its build_id. An index removed from disk, or one that cannot be loaded, is not answered from (503)."""

    def __init__(self, index, config: ServeConfig = ServeConfig(), *, warmup: bool = True):
        self.path, self.device = Path(index.path), index.device
        self.k = config.k
        self.max_upload_bytes = int(config.max_upload_mb * 2**20)
        self.max_request_bytes = int(config.max_request_mb * 2**20)
        self.budget = ByteBudget(int(config.max_inflight_mb * 2**20))
        self.max_files = config.max_files
        self.max_pixels = config.max_pixels
        self.max_unscaled_pixels = config.max_unscaled_pixels
        self.warmup = warmup
        self.decode_pool = ThreadPoolExecutor(config.decode_threads or default_decode_threads(),
                                              thread_name_prefix="decode")
        self.costly_pool = ThreadPoolExecutor(1, thread_name_prefix="decode-costly")
        self.costly_waiting = 0
        # Requests whose body is still arriving, and photos being decoded: the batcher waits for them, only for them.
        self.reading = 0
        self.decoding = 0
        self.batcher = MicroBatcher(self._run_batch, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                                    max_queue=config.max_queue, expecting=lambda: self.reading + self.decoding,
                                    workers=config.model_threads or 1)
        generation = index_generation(self.path)
        if _disk_build_id(self.path) != index.manifest.get("build_id"):
            generation = ("replaced since it was opened",)  # the watcher's first look loads what the disk has now
        self.snapshot = self._prepare(index, generation)
        self.disk_build_id = self.snapshot.build_id
        self.problem: IndexUnavailable | None = None
        self.reloading = False
        self.reloads = 0
        self._stop = threading.Event()
        self._watcher = None
        if config.reload_check_s > 0:
            self._watcher = threading.Thread(target=self._watch, args=(config.reload_check_s,), name="index-watch",
                                             daemon=True)
            self._watcher.start()

    def close(self):
        self._stop.set()
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.costly_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ snapshots
    def _prepare(self, index, generation) -> Snapshot:
        snapshot = Snapshot(index, generation)
        if self.warmup:  # first calls pay for allocator and kernel set-up; not a user's request
            from PIL import Image
            gray = snapshot.transform(Image.new("RGB", (256, 256), (128, 128, 128)))
            for n in sorted({1, self.batcher.max_batch}):
                snapshot.index.query([gray] * n, k=self.k)
        return snapshot

    def current(self) -> Snapshot:
        """The snapshot to answer from, or IndexUnavailable."""
        if self.problem is not None:
            raise self.problem
        return self.snapshot

    def _watch(self, every: float) -> None:
        from ..geo_index import load_index

        seen, failed = self.snapshot.generation, None
        while not self._stop.wait(every):
            generation = index_generation(self.path)
            if generation == self.snapshot.generation:  # unchanged, or back as it was
                seen, self.reloading, self.problem = generation, False, None
                self.disk_build_id = self.snapshot.build_id
                continue
            if generation is None:
                seen, self.reloading, self.disk_build_id = None, False, None
                self.problem = IndexUnavailable("index_removed", f"index {self.snapshot.index.name!r} was removed "
                                                                 f"from disk; the service answers from no index")
                continue
            if generation == failed:
                continue  # loading it failed already; a change on disk is the next chance
            self.reloading = True
            self.disk_build_id = _disk_build_id(self.path)
            if generation != seen:  # still being written: wait until it holds still for one check
                seen = generation
                continue
            try:
                snapshot = self._prepare(load_index(self.path, device=self.device), generation)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the old snapshot and says why
                if index_generation(self.path) == generation:  # not merely caught mid-write
                    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    failed, self.reloading = generation, False
                    # Clients are told which file, not where the index lies on this server; the log says where.
                    public = message.replace(str(self.path) + os.sep, "").replace(str(self.path), self.path.name)
                    self.problem = IndexUnavailable("index_unusable", f"the index on disk changed and cannot be "
                                                                      f"loaded: {public}")
                    log.warning("index %s changed on disk and cannot be loaded: %s", self.path.name, message)
                seen = None
                continue
            if index_generation(self.path) != generation:
                seen = None  # it changed again while loading: load what it becomes
                continue
            old, self.snapshot = self.snapshot, snapshot
            self.problem, self.reloading, self.reloads, failed = None, False, self.reloads + 1, None
            log.info("index %s reloaded: build %s -> %s", self.path.name, old.build_id, snapshot.build_id)

    # ------------------------------------------------------------------ answering
    def _decode(self, snapshot: Snapshot, data: bytes, costly_ok: bool):
        """Upload -> the model's uint8 input tensor (decoded, resized and cropped), with the photo's local and
        dense features where the index verifies or re-scores street answers; Costly, or why not."""
        try:
            tensor = snapshot.transform(decode_image(data, self.max_pixels, snapshot.transform.resize_size,
                                                     self.max_unscaled_pixels, costly_ok))
        except (UploadError, Costly) as exc:
            return exc
        if not (snapshot.verifies or snapshot.rescores):
            return tensor
        # the photo's features for spatial verification and dense re-scoring, in the decoding lane rather than the
        # model's thread, from the upload's bytes decoded as `geoindex query` decodes a file: both match the same
        # pixels
        found = {}
        for wanted, matcher in ((snapshot.verifies, shared_verifier), (snapshot.rescores, shared_dense_matcher)):
            matcher = matcher() if wanted else None
            if matcher is not None:
                found[matcher.kind] = matcher.features(data)
        return tensor, LocalFeatures(**found)

    async def decode(self, snapshot: Snapshot, data: bytes):
        """Decode on the ordinary lane; a photo found costly from its header goes to the lane of its own kind."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.decode_pool, self._decode, snapshot, data, False)
        if isinstance(result, Costly):
            if self.costly_waiting >= COSTLY_QUEUE:
                raise UploadError(503, "busy", f"{self.costly_waiting} large photos are already waiting to be "
                                               "decoded; retry in a moment")
            self.costly_waiting += 1
            try:
                result = await loop.run_in_executor(self.costly_pool, self._decode, snapshot, data, True)
            finally:
                self.costly_waiting -= 1
        if isinstance(result, UploadError):
            raise result
        return result

    def _run_batch(self, tensors, group):
        """Decoded photos of one snapshot -> one answer each, in order."""
        snapshot, k = group
        pairs = [t if isinstance(t, tuple) else (t, t) for t in tensors]  # (model input, what verification reads)
        return [p.to_dict() for p in snapshot.index.query([t for t, _ in pairs], k=k,
                                                          verify_sources=[v for _, v in pairs])]

    async def locate(self, snapshot: Snapshot, uploads, k: int | None, each: bool = False) -> list[dict]:
        """One answer per upload, in order. each=True (the batch endpoint): a bad photo gets an error entry
        in its place, {source, error, code}, and the others are answered, as `geoindex query` does."""
        async def one(upload):
            started = time.perf_counter()
            self.decoding += 1  # only the event loop thread touches the counter
            try:
                if len(upload.data) > self.max_upload_bytes:
                    raise UploadError(413, "too_large", f"{len(upload.data) / 2**20:.1f} MB is over the limit of "
                                                        f"{self.max_upload_bytes / 2**20:g} MB (--max-upload-mb)")
                tensor = await self.decode(snapshot, upload.data)
            except UploadError as exc:
                if each:
                    return {"source": upload.filename, "error": exc.message, "code": exc.code}
                if len(uploads) > 1:  # say which photo of a batch is the bad one
                    exc.message = f"{upload.filename}: {exc.message}"
                raise
            finally:
                self.decoding -= 1
            decode_ms = round((time.perf_counter() - started) * 1000, 2)
            answer, timing = await self.batcher(tensor, (snapshot, k))
            answer = dict(answer, source=upload.filename)
            answer["neighbours"] = [self.neighbour(snapshot, n) for n in answer["neighbours"]]
            if answer.get("gps", {}).get("cluster"):
                answer["gps"]["cluster"] = [self.neighbour(snapshot, n) for n in answer["gps"]["cluster"]]
            answer["timings_ms"] = {"decode": decode_ms, "queue": timing.queue_ms,
                                    "model_batch": timing.batch_ms, "batch_size": timing.batch_size}
            return answer

        tasks = [asyncio.ensure_future(one(u)) for u in uploads]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one photo failed: the others need no more work
                task.cancel()

    @staticmethod
    def neighbour(snapshot: Snapshot, n: dict) -> dict:
        """A neighbour as a client may see it: its row and thumbnail, not where it lies on this server's disk."""
        out = {key: value for key, value in n.items() if key != "path"}
        out["thumbnail"] = f"v1/photos/{n['row']}?build={snapshot.build_id}"
        return out

    def describe(self) -> dict:
        snapshot = self.current()
        index, train = snapshot.index, snapshot.train
        m = index.manifest
        classes = []
        for city in index.classes:
            rows = train[train["city"] == city]
            classes.append({"city": city, "name": _display_name(city), "train_photos": int(len(rows)),
                            "lat": _median(rows["lat"]), "lon": _median(rows["lon"])})
        choice = index.lead_choice(index.classifier)
        methods = ["knn"] + (["classifier"] if snapshot.classifier_mode else []) + (["hybrid"] if choice["weights"] else [])
        return jsonable({
            "name": index.name, "build_id": snapshot.build_id, "backbone": m["backbone"],
            "weights": m["weights"].get("source"),
            "embed_dim": m["embed_dim"], "image_size": m["image_size"], "index_type": m["index"]["type"],
            "counts": m["counts"], "synthetic": bool(m.get("synthetic", False)), "cities": classes,
            "methods": methods, "classifier": snapshot.classifier_mode, "device": str(index.device),
            "answer_method": choice["lead"], "answer_method_note": choice["note"],
            "limits": self.limits() | {"k_default": self.k or snapshot.k_default, "k_max": MAX_K},
            "batching": {"max_batch": self.batcher.max_batch, "max_wait_ms": self.batcher.max_wait * 1000},
            "version": _version()})

    def limits(self) -> dict:
        return {"max_upload_mb": self.max_upload_bytes / 2**20, "max_request_mb": self.max_request_bytes / 2**20,
                "max_inflight_mb": self.budget.limit / 2**20, "max_pixels": self.max_pixels,
                "max_unscaled_pixels": self.max_unscaled_pixels, "max_files_per_batch": self.max_files}

    def health(self) -> tuple[int, dict]:
        snapshot = self.snapshot
        if self.problem is not None:
            status = self.problem.code
        elif self.reloading:
            status = "reloading"
        else:
            status = "ok"
        body = {"status": status, "index": snapshot.index.name, "build_id": snapshot.build_id,
                "build_id_on_disk": self.disk_build_id, "problem": self.problem.message if self.problem else None,
                "loaded_at": snapshot.loaded_at, "reloads": self.reloads,
                "uploads_held_mb": round(self.budget.held / 2**20, 2), "costly_decodes_waiting": self.costly_waiting,
                "batching": self.batcher.stats(), "cpu_seconds_by_thread": thread_cpu_seconds(),
                # bounded (verification.CACHE_PHOTOS, DENSE_CACHE_PHOTOS), and outside --max-inflight-mb, which
                # counts uploads
                "feature_caches": feature_cache_stats()}
        return (503 if self.problem is not None else 200), body


def thread_cpu_seconds() -> dict | None:
    """CPU seconds this process's threads have used, summed by thread name (numbering dropped): where the
    server's time goes (model threads, decoding pool, the event loop; "native" for threads Python did not
    start, such as torch's intra-op pool). From /proc, so None off Linux."""
    try:
        tasks = os.listdir("/proc/self/task")
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError):
        return None
    names = {str(t.native_id): re.sub(r"[-_]?\d+$", "", t.name) for t in threading.enumerate()}
    totals: dict[str, float] = {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(task, "native")
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return {k: round(v, 3) for k, v in sorted(totals.items())} or None


def _median(values):
    values = values.dropna()
    return float(values.median()) if len(values) else None


def _display_name(city: str) -> str:
    from ..cities import full_name  # one name everywhere: the page, the CLI and the JSON say "London, United Kingdom"
    return full_name(city)


def _version() -> str:
    from .. import __version__
    return __version__


def create_app(index, *, config: ServeConfig | None = None, warmup: bool = True,
               max_upload_mb: float = ServeConfig.max_upload_mb, max_batch: int = ServeConfig.max_batch,
               max_wait_ms: float = ServeConfig.max_wait_ms, decode_threads: int | None = ServeConfig.decode_threads,
               k: int | None = ServeConfig.k, max_files: int = ServeConfig.max_files,
               max_queue: int = ServeConfig.max_queue, max_pixels: int = ServeConfig.max_pixels,
               root_path: str = ServeConfig.root_path, model_threads: int | None = ServeConfig.model_threads,
               max_request_mb: float = ServeConfig.max_request_mb, max_inflight_mb: float = ServeConfig.max_inflight_mb,
               max_unscaled_pixels: int = ServeConfig.max_unscaled_pixels,
               reload_check_s: float = ServeConfig.reload_check_s):
    """A FastAPI app answering for `index` (a loaded GeoIndex; reloaded from its folder when that changes, every
    reload_check_s, 0 for never). Run it with uvicorn.

    config: a ServeConfig (its host, port, workers and connection limits are the server's, not the app's); without
    one, the keywords make it. model_threads batches run at once (see MicroBatcher; None: 1); the torch threads
    each uses are the caller's to set (`geoindex serve` divides its --torch-threads among them)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.gzip import GZipMiddleware
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    from ..errors import GeoindexError

    if config is None:
        config = ServeConfig(max_upload_mb=max_upload_mb, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             decode_threads=decode_threads, k=k, max_files=max_files, max_queue=max_queue,
                             max_pixels=max_pixels, root_path=root_path, model_threads=model_threads,
                             max_request_mb=max_request_mb, max_inflight_mb=max_inflight_mb,
                             max_unscaled_pixels=max_unscaled_pixels, reload_check_s=reload_check_s)
    locator = Locator(index, config, warmup=warmup)
    max_upload_mb, max_request_mb, max_inflight_mb = config.max_upload_mb, config.max_request_mb, config.max_inflight_mb
    max_files, max_pixels, max_unscaled_pixels = config.max_files, config.max_pixels, config.max_unscaled_pixels
    root_path = config.root_path

    @asynccontextmanager
    async def lifespan(_app):
        yield
        locator.close()

    limits = (f"Limits: a photo up to {max_upload_mb:g} MB (`--max-upload-mb`); a request up to {max_request_mb:g} MB "
              f"(`--max-request-mb`) and {max_files} photos (`/v1/locate/batch`); {max_inflight_mb:g} MB of uploads "
              f"held at once by the whole server (`--max-inflight-mb`, then 503); a JPEG up to "
              f"{max_pixels / 1e6:g} MP after decoding at reduced scale (`--max-pixels`), PNG, WebP, BMP and TIFF up "
              f"to {max_unscaled_pixels / 1e6:g} MP (decoded whole). Other formats are refused (415).")
    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN, a blank page offline; ours serves it from
    # the fastapi-offline wheel's copy (see _docs_page). ReDoc would need a CDN too, so there is none.
    app = FastAPI(title="geoindex", version=_version(), root_path=root_path, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Which city was this street-level photo taken in? kNN over an index of photos, "
                              "classifier heads, a GPS estimate, and the nearest indexed photos as evidence. "
                              "Errors are JSON: `{\"error\": why, \"code\": short_code}`. " + limits)
    app.state.locator = locator
    app.add_middleware(GZipMiddleware, minimum_size=2048)

    def error(status: int, code: str, message: str, headers=None):
        return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)

    @app.exception_handler(UploadError)
    async def _upload_error(_request, exc: UploadError):
        return error(exc.status, exc.code, exc.message, headers={"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(QueueFull)
    async def _busy(_request, exc: QueueFull):
        return error(503, "busy", str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(IndexUnavailable)
    async def _unavailable(_request, exc: IndexUnavailable):
        return error(503, exc.code, exc.message, headers={"Retry-After": "5"})

    @app.exception_handler(ClientGone)
    async def _gone(request, exc: ClientGone):
        # Nobody reads the answer; an aborted upload is the client's business, not an error of the server.
        log.info("%s %s: %s", request.method, request.url.path, exc)
        return Response(status_code=400)

    @app.exception_handler(GeoindexError)
    async def _geoindex_error(_request, exc: GeoindexError):
        return error(422, "unusable_image", str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return error(exc.status_code, f"http_{exc.status_code}", str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        why = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error(422, "invalid_request", why)

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        log.exception("unexpected error")
        return error(500, "internal", f"internal error ({type(exc).__name__}); the server keeps serving")

    def k_param(default=k):
        return Query(default, ge=1, le=MAX_K, description="Neighbours that vote [default: as tuned on val].")

    async def answer(request: Request, k_value: int | None, max_files: int, started: float, each: bool = False) -> dict:
        snapshot = locator.current()  # every photo of this request is answered from this one generation
        read_start = time.perf_counter()
        held = locator.budget.hold()
        locator.reading += 1  # only the event loop thread touches the counter
        try:
            try:
                if max_files == 1:
                    body = await read_body(request, locator.max_upload_bytes + MULTIPART_OVERHEAD, held)
                else:
                    body = await read_body(request, locator.max_request_bytes, held, "--max-request-mb")
            finally:
                locator.reading -= 1
            read_ms = round((time.perf_counter() - read_start) * 1000, 2)
            uploads = split_uploads(body, request.headers.get("content-type"), max_files)
            del body
            results = await locator.locate(snapshot, uploads, k_value, each=each)
        finally:
            held.release()
        answer = jsonable({"index": snapshot.index.name, "build_id": snapshot.build_id,
                           "backbone": snapshot.index.manifest["backbone"], "results": results,
                           "timings_ms": {"read": read_ms, "total": round((time.perf_counter() - started) * 1000, 2)}})
        # Serialised here, once: FastAPI's generic encoder walks the nested answer again for nothing.
        return Response(json.dumps(answer, allow_nan=False, separators=(",", ":")), media_type="application/json")

    @app.post("/v1/locate", tags=["locate"], openapi_extra=_PHOTO_BODY, responses=_error_responses(400, 413, 415, 422, 503),
              summary="Where was this photo taken?",
              description="One photo, as multipart field `image` or a raw `image/*` body. The answer is `geoindex "
                          "query --json`'s: kNN top cities with probabilities (`top5`), the classifier's "
                          "(`classifier_top5`) when the index has a trained head, the GPS estimate, and the nearest "
                          "indexed photos (`row`, and `thumbnail`, the URL of their thumbnail; never a path on the "
                          "server), plus timings and the `build_id` of the index that answered. " + limits)
    async def locate(request: Request, k: int | None = k_param()):
        return await answer(request, k, 1, time.perf_counter())

    @app.post("/v1/locate/batch", tags=["locate"], openapi_extra=_BATCH_BODY,
              responses=_error_responses(400, 413, 415, 422, 503), summary="Several photos in one request",
              description=f"Up to {max_files} photos as repeated multipart file fields, {max_request_mb:g} MB in all; "
                          "one result per photo, in order. A photo that cannot be used (not an image, corrupt, too large) gets "
                          "`{source, error, code}` in its place and the others are answered. "
                          + limits)
    async def locate_batch(request: Request, k: int | None = k_param()):
        return await answer(request, k, locator.max_files, time.perf_counter(), each=True)

    @app.get("/v1/index", tags=["index"], summary="What is loaded", responses=_error_responses(503))
    async def describe():
        """Name, build_id, backbone, cities (with their median coordinates), counts, methods, limits."""
        return locator.describe()

    @app.get("/v1/photos/{row}", tags=["index"], responses={200: {"content": {"image/jpeg": {}}},
                                                            **_error_responses(404, 410, 503)},
             summary="Thumbnail of an indexed photo", response_class=Response)
    async def photo(row: int, build: str | None = Query(None, description="The build_id of the answer that named "
                                                                           "the row: refused (410) once rebuilt.")):
        """A JPEG thumbnail of train row `row` (the `row` of a neighbour; its `thumbnail` URL names the build too).
        Only rows of the index are served."""
        snapshot = locator.current()
        if build is not None and build != snapshot.build_id:
            return error(410, "rebuilt", f"row {row} was of build {build}; the index is now build "
                                         f"{snapshot.build_id}: locate the photo again")
        if not 0 <= row < len(snapshot.train):
            return error(404, "no_such_row", f"row {row} is not in the index (it has rows 0-{len(snapshot.train) - 1})")
        data = await asyncio.get_running_loop().run_in_executor(locator.decode_pool, snapshot.thumbnail, row)
        if data is None:
            return error(404, "photo_unavailable", f"the photo of row {row} can no longer be read on the server")
        # A URL naming its build always shows the same photo; a bare row may show another after a rebuild.
        cache = "public, max-age=86400, immutable" if build is not None else "no-cache"
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": cache})

    @app.get("/healthz", tags=["index"], summary="Which index build is served, and whether the disk still has it",
             responses=_error_responses(503))
    async def healthz():
        """`status`: `ok` (serving the index as it is on disk), `reloading` (the index on disk changed; answers
        still come, whole, from `build_id` until the new one is loaded), `index_removed` or `index_unusable` (503:
        nothing is answered). `build_id` is what answers come from, `build_id_on_disk` what the disk holds."""
        status, body = locator.health()
        return JSONResponse(jsonable(body), status_code=status)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        return _docs_page(app, request.scope.get("root_path", ""))

    swagger = _swagger_ui_assets()
    if swagger is not None:
        app.mount("/static/swagger", StaticFiles(directory=swagger), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _swagger_ui_assets() -> Path | None:
    """Swagger UI's script and style as shipped in the fastapi-offline wheel (the serve extra), or None."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _docs_page(app, root: str):
    """Swagger UI from this server's own files: the page must work with no network."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    if _swagger_ui_assets() is None:  # an install without the serve extra's fastapi-offline: a page needing nothing
        return HTMLResponse(f"<!doctype html><title>geoindex API</title><h1>geoindex API</h1><p>Swagger UI is not "
                            f"installed ({INSTALL_HINT}); the API's description is "
                            f"<a href='{root}{app.openapi_url}'>{app.openapi_url}</a> (OpenAPI JSON).</p>")
    return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title="geoindex API",
                               swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
                               swagger_favicon_url=f"{root}/static/swagger/favicon.png")


def create_app_from_env():
    """Factory for `uvicorn --factory` worker processes (`geoindex serve --workers N`): options come as JSON."""
    import json

    import torch

    from ..geo_index import load_index
    from .connections import GuardedH11Protocol
    GuardedH11Protocol.configure_from_env()
    torch.set_num_threads(int(os.environ.get("GEOINDEX_SERVE_TORCH_THREADS", torch.get_num_threads())))
    options = json.loads(os.environ["GEOINDEX_SERVE_OPTIONS"])
    index = load_index(options.pop("index"), options.pop("index_dir"), device=options.pop("device"))
    return create_app(index, **options)
