"""The FastAPI app: `create_app(index)` serves one loaded GeoIndex over HTTP, and the page at `/`.

Answers come from the public API only (`index.query(images, k=...)` and `Prediction.to_dict()`),
so a photo gets the same JSON here as from `geoindex query --json`, plus timings and, for each
neighbour, the index row its thumbnail is served under. A micro-batch's uploads are decoded on a
small thread pool just before its model call. On a CPU the model runs as two batches side by side,
each on one thread (`--model-threads`, MicroBatcher's workers), rather than one batch on all cores:
a multi-threaded operator waits at every step for its slowest thread, so whatever else the server
does (HTTP, decoding) stalls the whole model; a one-thread batch only loses what it lost itself.
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

from ..jsonio import jsonable
from .batching import MicroBatcher, QueueFull
from .uploads import DEFAULT_MAX_PIXELS, MULTIPART_OVERHEAD, UploadError, decode_image, read_body, split_uploads

STATIC = Path(__file__).resolve().parent / "static"
THUMBNAIL_PX = 320
MAX_K = 200
log = logging.getLogger("geoindex.serve")


def default_decode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _error_responses(*codes: int) -> dict:
    schema = {"type": "object", "properties": {"error": {"type": "string"}, "code": {"type": "string"}}}
    why = {400: "empty body or malformed form", 413: "over --max-upload-mb, or too many pixels (decompression bomb)",
           415: "not an image, or a Content-Type other than multipart/form-data or image/*",
           422: "corrupt or truncated image, or a bad query parameter", 503: "too many photos already waiting",
           404: "no such row in the index"}
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
    """The index, the micro-batcher in front of its model, and the decoding pool: all a request needs."""

    def __init__(self, index, max_upload_mb: float = 20.0, max_batch: int = 16, max_wait_ms: float = 5.0,
                 decode_threads: int | None = None, k: int | None = None, max_files: int = 32, max_queue: int = 256,
                 max_pixels: int = DEFAULT_MAX_PIXELS, warmup: bool = True, model_threads: int = 1):
        self.index = index
        self.k = k
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.max_files = max_files
        self.max_pixels = max_pixels
        self.train = index.store.metadata("train")  # row numbers are the neighbour ids, and the only photos served
        self.row_of_path = {p: i for i, p in enumerate(self.train["path"])}
        self.transform = index.backbone.transform  # loads the backbone now, not on the first request
        classifier = index.classifier
        self.classifier_mode = getattr(classifier, "mode", None) if classifier is not None else None
        self.decode_pool = ThreadPoolExecutor(decode_threads or default_decode_threads(), thread_name_prefix="decode")
        if warmup:  # first calls pay for allocator and kernel set-up; not a user's request
            from PIL import Image
            gray = io.BytesIO()
            Image.new("RGB", (256, 256), (128, 128, 128)).save(gray, format="JPEG")
            for n in sorted({1, max_batch}):
                self._run_batch([gray.getvalue()] * n, k)
        self.reading = 0  # requests whose body is still arriving: the batcher waits for them, and only for them
        self.batcher = MicroBatcher(self._run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                    expecting=lambda: self.reading, workers=model_threads)
        self.thumbnail = lru_cache(maxsize=1024)(self._thumbnail)

    def close(self):
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, data: bytes):
        """Upload -> the model's uint8 input tensor (decoded, resized and cropped on the pool), or why not."""
        try:
            return self.transform(decode_image(data, self.max_pixels, self.transform.resize_size))
        except UploadError as exc:
            return exc

    def _run_batch(self, uploads, k):
        """Raw uploads -> one answer (or the UploadError saying why not) per upload, in order."""
        started = time.perf_counter()
        decoded = list(self.decode_pool.map(self._decode, uploads))
        decode_ms = round((time.perf_counter() - started) * 1000, 2)
        images = [d for d in decoded if not isinstance(d, UploadError)]  # tensors: the transform already ran
        answers = iter([dict(p.to_dict(), _decode_ms=decode_ms) for p in self.index.query(images, k=k)] if images else [])
        return [d if isinstance(d, UploadError) else next(answers) for d in decoded]

    async def locate(self, uploads, k: int | None, each: bool = False) -> list[dict]:
        """One answer per upload, in order. each=True (the batch endpoint): a bad photo gets an error entry
        in its place, {source, error, code}, and the others are answered, as `geoindex query` does."""
        async def one(upload):
            try:
                if len(upload.data) > self.max_upload_bytes:
                    raise UploadError(413, "too_large", f"{len(upload.data) / 2**20:.1f} MB is over the limit of "
                                                        f"{self.max_upload_bytes / 2**20:g} MB (--max-upload-mb)")
                answer, timing = await self.batcher(upload.data, k)
            except UploadError as exc:
                if each:
                    return {"source": upload.filename, "error": exc.message, "code": exc.code}
                if len(uploads) > 1:  # say which photo of a batch is the bad one
                    exc.message = f"{upload.filename}: {exc.message}"
                raise
            answer = dict(answer, source=upload.filename)
            decode_ms = answer.pop("_decode_ms")
            answer["neighbours"] = [dict(n, row=self.row_of_path.get(n.get("path"))) for n in answer["neighbours"]]
            answer["timings_ms"] = {"decode": decode_ms, "queue": timing.queue_ms,  # decode: of its whole batch
                                    "model_batch": round(timing.batch_ms - decode_ms, 2),
                                    "batch_size": timing.batch_size}
            return answer

        return list(await asyncio.gather(*(one(u) for u in uploads)))

    def describe(self) -> dict:
        m = self.index.manifest
        train = self.train
        classes = []
        for city in self.index.classes:
            rows = train[train["city"] == city]
            classes.append({"city": city, "name": _display_name(city), "train_photos": int(len(rows)),
                            "lat": _median(rows["lat"]), "lon": _median(rows["lon"])})
        from ..tuning import load_lead_choice
        choice = load_lead_choice(self.index, self.index.classifier)
        methods = ["knn"] + (["classifier"] if self.classifier_mode else []) + (["hybrid"] if choice["weights"] else [])
        return jsonable({
            "name": self.index.name, "backbone": m["backbone"], "weights": m["weights"].get("source"),
            "embed_dim": m["embed_dim"], "image_size": m["image_size"], "index_type": m["index"]["type"],
            "counts": m["counts"], "synthetic": bool(m.get("synthetic", False)), "cities": classes,
            "methods": methods, "classifier": self.classifier_mode, "device": str(self.index.device),
            "answer_method": choice["lead"], "answer_method_note": choice["note"],
            "limits": {"max_upload_mb": self.max_upload_bytes / 2**20, "max_pixels": self.max_pixels,
                       "max_files_per_batch": self.max_files, "k_default": self.k or self.index.knn_method().k, "k_max": MAX_K},
            "batching": {"max_batch": self.batcher.max_batch, "max_wait_ms": self.batcher.max_wait * 1000},
            "version": _version()})

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


def create_app(index, *, max_upload_mb: float = 20.0, max_batch: int = 16, max_wait_ms: float = 5.0,
               decode_threads: int | None = None, k: int | None = None, max_files: int = 32, max_queue: int = 256,
               max_pixels: int = DEFAULT_MAX_PIXELS, warmup: bool = True, root_path: str = "", model_threads: int = 1):
    """A FastAPI app answering for `index` (a loaded GeoIndex). Run it with uvicorn.

    model_threads batches run at once (see MicroBatcher); the torch threads each uses are the caller's
    to set (`geoindex serve` divides its --torch-threads among them)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.gzip import GZipMiddleware
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    from ..errors import GeoindexError

    locator = Locator(index, max_upload_mb=max_upload_mb, max_batch=max_batch, max_wait_ms=max_wait_ms,
                      decode_threads=decode_threads, k=k, max_files=max_files, max_queue=max_queue,
                      max_pixels=max_pixels, warmup=warmup, model_threads=model_threads)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        locator.close()

    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN, a blank page offline; ours serves it from
    # the fastapi-offline wheel's copy (see _docs_page). ReDoc would need a CDN too, so there is none.
    app = FastAPI(title="geoindex", version=_version(), root_path=root_path, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Which city was this street-level photo taken in? kNN over an index of photos, "
                              "classifier heads, a GPS estimate, and the nearest indexed photos as evidence. "
                              "Errors are JSON: `{\"error\": why, \"code\": short_code}`.")
    app.state.locator = locator
    app.add_middleware(GZipMiddleware, minimum_size=2048)

    def error(status: int, code: str, message: str, headers=None):
        return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)

    @app.exception_handler(UploadError)
    async def _upload_error(_request, exc: UploadError):
        return error(exc.status, exc.code, exc.message)

    @app.exception_handler(QueueFull)
    async def _busy(_request, exc: QueueFull):
        return error(503, "busy", str(exc), headers={"Retry-After": "1"})

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
        read_start = time.perf_counter()
        locator.reading += 1  # only the event loop thread touches the counter
        try:
            body = await read_body(request, locator.max_upload_bytes * max_files + MULTIPART_OVERHEAD)
        finally:
            locator.reading -= 1
        read_ms = round((time.perf_counter() - read_start) * 1000, 2)
        uploads = split_uploads(body, request.headers.get("content-type"), max_files)
        results = await locator.locate(uploads, k_value, each=each)
        answer = jsonable({"index": index.name, "backbone": index.manifest["backbone"], "results": results,
                              "timings_ms": {"read": read_ms, "total": round((time.perf_counter() - started) * 1000, 2)}})
        # Serialised here, once: FastAPI's generic encoder walks the nested answer again for nothing.
        return Response(json.dumps(answer, allow_nan=False, separators=(",", ":")), media_type="application/json")

    @app.post("/v1/locate", tags=["locate"], openapi_extra=_PHOTO_BODY, responses=_error_responses(400, 413, 415, 422, 503),
              summary="Where was this photo taken?")
    async def locate(request: Request, k: int | None = k_param()):
        """One photo, as multipart field `image` or a raw `image/*` body. The answer is `geoindex query --json`'s:
        kNN top cities with probabilities (`top5`), the classifier's (`classifier_top5`) when the index has a
        trained head, the GPS estimate, and the nearest indexed photos (`row` is their thumbnail's id), plus timings."""
        return await answer(request, k, 1, time.perf_counter())

    @app.post("/v1/locate/batch", tags=["locate"], openapi_extra=_BATCH_BODY,
              responses=_error_responses(400, 413, 415, 422, 503), summary="Several photos in one request")
    async def locate_batch(request: Request, k: int | None = k_param()):
        """Several photos as repeated multipart file fields; one result per photo, in order. A photo that cannot
        be used (not an image, corrupt, too large) gets `{source, error, code}` in its place and the others are
        answered; only a malformed request as a whole gets a 4xx."""
        return await answer(request, k, locator.max_files, time.perf_counter(), each=True)

    @app.get("/v1/index", tags=["index"], summary="What is loaded")
    async def describe():
        """Name, backbone, cities (with their median coordinates), counts, methods, limits."""
        return locator.describe()

    @app.get("/v1/photos/{row}", tags=["index"], responses={200: {"content": {"image/jpeg": {}}},
                                                            **_error_responses(404)},
             summary="Thumbnail of an indexed photo", response_class=Response)
    async def photo(row: int):
        """A JPEG thumbnail of train row `row` (the `row` of a neighbour). Only rows of the index are served."""
        if not 0 <= row < len(locator.train):
            return error(404, "no_such_row", f"row {row} is not in the index (it has rows 0-{len(locator.train) - 1})")
        data = await asyncio.get_running_loop().run_in_executor(locator.decode_pool, locator.thumbnail, row)
        if data is None:
            return error(404, "photo_unavailable", f"the photo of row {row} can no longer be read on the server")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz", tags=["index"], summary="Liveness, with batching counters")
    async def healthz():
        return {"status": "ok", "index": index.name, "batching": locator.batcher.stats(),
                "cpu_seconds_by_thread": thread_cpu_seconds()}

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
                            f"installed (pip install -e '.[serve]'); the API's description is "
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
    torch.set_num_threads(int(os.environ.get("GEOINDEX_SERVE_TORCH_THREADS", torch.get_num_threads())))
    options = json.loads(os.environ["GEOINDEX_SERVE_OPTIONS"])
    index = load_index(options.pop("index"), options.pop("index_dir"), device=options.pop("device"))
    return create_app(index, **options)
