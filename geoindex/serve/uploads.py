"""Request bodies -> PIL images, in memory only, with every limit checked before the work it guards.

An upload is read with byte caps while it streams (per photo, per request, and all requests' bodies in
memory together), parsed (multipart or a raw image body) without spooling to disk, then decoded with
pixel caps checked from the header before any pixel is decoded, so a decompression bomb costs a few
bytes of parsing, not gigabytes of memory.

Each limit's default is written once, in geoindex.config.ServeConfig; `geoindex serve` and `create_app` use it.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..config import DEFAULT_MAX_PIXELS, ServeConfig  # the one pixel limit of build, query and the service

MULTIPART_OVERHEAD = 64 * 1024   # headers and boundaries around the photo itself
FIELD_NAMES = ("image", "images", "file", "files", "photo")
RAW_TYPES = ("image/", "application/octet-stream")


class UploadError(Exception):
    """A request the client must fix: becomes a 4xx JSON answer {"error": message, "code": code}."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Upload:
    filename: str
    data: bytes


class ClientGone(Exception):
    """The client closed the connection before its upload was complete: nobody is left to answer."""


class ByteBudget:
    """Bytes of request bodies held in memory, all requests together, against one cap. Touched by the event loop
    thread only, so no lock."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def hold(self) -> "Held":
        return Held(self)


class Held:
    """One request's share of a ByteBudget: grows as its body arrives, released once it is answered."""

    def __init__(self, budget: ByteBudget):
        self.budget, self.size = budget, 0

    def grow_to(self, size: int) -> None:
        extra = size - self.size
        if extra <= 0:
            return
        if self.budget.held + extra > self.budget.limit:
            raise UploadError(503, "busy", f"the server holds {self.budget.held / 2**20:.0f} MB of uploads already "
                                           f"(--max-inflight-mb {self.budget.limit / 2**20:g}); retry in a moment")
        self.budget.held += extra
        self.size = size

    def release(self) -> None:
        self.budget.held -= self.size
        self.size = 0


async def read_body(request, max_bytes: int, held: Held, option: str = "--max-upload-mb",
                    drain_bytes: int = 64 * 2**20) -> bytes:
    """The whole body, refusing one over max_bytes (413) or over what the server may hold in memory (503).

    An oversize body is still drained (up to drain_bytes) before answering: a client that is
    still sending would otherwise see a reset connection instead of the 413 that says why.
    """
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and declared > max_bytes:
        await _drain(request, drain_bytes)
        raise UploadError(413, "too_large", f"upload of {declared / 2**20:.1f} MB is over the limit of "
                                            f"{max_bytes / 2**20:.1f} MB ({option})")
    if declared is not None:
        held.grow_to(declared)  # refused before a byte is read, when the server is already full
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                await _drain(request, drain_bytes)
                raise UploadError(413, "too_large", f"upload is over the limit of {max_bytes / 2**20:.1f} MB "
                                                    f"({option})")
            held.grow_to(size)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"client disconnected after sending {size:,} of "
                         f"{f'{declared:,}' if declared is not None else 'an unknown number of'} bytes") from None
    return b"".join(chunks)


async def _drain(request, limit: int) -> None:
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return
    except Exception:  # the client gave up or the stream was already consumed: nothing left to drain
        return


def split_uploads(body: bytes, content_type: str | None, max_files: int) -> list[Upload]:
    """The photos in a body: the file parts of a multipart form, or the raw body of an image/* request."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = _parse_multipart(body, content_type, max_files)
    elif media_type.startswith(RAW_TYPES):
        uploads = [Upload("body", body)]
    else:
        raise UploadError(415, "unsupported_media_type",
                          f"send the photo as multipart/form-data field 'image', or as a raw image/* body "
                          f"(got Content-Type {media_type or 'none'!r})")
    if not uploads:
        raise UploadError(400, "no_image", "the form holds no file: send the photo in a field named 'image'")
    for upload in uploads:  # refused here, before anything is queued for the model
        if not upload.data:
            raise UploadError(400, "empty", f"{upload.filename}: empty upload (0 bytes)" if len(uploads) > 1
                              else "empty upload (0 bytes)")
    return uploads


def _parse_multipart(body: bytes, content_type: str, max_files: int) -> list[Upload]:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "bad_multipart", "multipart/form-data without a boundary")
    uploads: list[Upload] = []
    part: dict = {}
    header_field, header_value = bytearray(), bytearray()

    def on_part_begin():
        part.clear()
        part.update(headers={}, data=[])

    def on_header_field(data, start, end):
        header_field.extend(data[start:end])

    def on_header_value(data, start, end):
        header_value.extend(data[start:end])

    def on_header_end():
        part["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data, start, end):
        part["data"].append(data[start:end])

    def on_part_end():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        if filename is None and name not in FIELD_NAMES:
            return  # a plain form field (k=..., a submit button): not a photo
        if len(uploads) >= max_files:
            raise UploadError(413, "too_many_files", f"at most {max_files} photos per request")
        label = (filename or name.encode()).decode("utf-8", "replace")
        uploads.append(Upload(label.replace("\\", "/").rsplit("/", 1)[-1][:200], b"".join(part["data"])))

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise UploadError(400, "bad_multipart", f"malformed multipart body ({exc})") from None
    return uploads


_STATUS = {"not_an_image": 415, "too_many_pixels": 413, "corrupt": 422}
# A decode this big (pixels after JPEG scaling, or bytes) goes to the one-thread lane for costly photos, so a
# client sending them waits behind its own kind and ordinary photos keep their decoding threads.
COSTLY_PIXELS = 4_000_000
COSTLY_BYTES = 4 * 2**20


class Costly(Exception):
    """Raised before decoding a photo that belongs in the lane for costly decodes."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None,
                 max_unscaled_pixels: int | None = ServeConfig.max_unscaled_pixels,
                 costly_ok: bool = True) -> Image.Image:
    """Bytes -> RGB PIL image, or UploadError saying why not (Costly, before decoding, unless costly_ok).

    The very decoder `geoindex query` and a build use for files (geoindex.images.decode_image: pixel limit
    before decoding, JPEG draft scaling to draft_size, truncated data refused, EXIF rotation, alpha on
    white), so a photo answers the same over HTTP; the service adds a lower pixel limit for the formats
    decoded whole.
    """
    from ..errors import ImageError
    from ..images import JPEG_FORMATS
    from ..images import decode_image as decode

    def check(img: Image.Image) -> None:
        w, h = img.size
        if max_unscaled_pixels is not None and img.format not in JPEG_FORMATS and w * h > max_unscaled_pixels:
            raise ImageError(f"a {img.format} of {w} x {h} = {w * h / 1e6:.1f} MP: the service decodes PNG, WebP, BMP "
                             f"and TIFF whole, up to {max_unscaled_pixels / 1e6:g} MP (JPEG up to "
                             f"{max_pixels / 1e6:g} MP); send a JPEG or a smaller picture", "too_many_pixels")
        if not costly_ok and (w * h > COSTLY_PIXELS or len(data) > COSTLY_BYTES):
            raise Costly()

    try:
        return decode(data, draft_size=draft_size, max_pixels=max_pixels, before_decode=check)
    except ImageError as exc:
        hint = "; send a JPEG, PNG or WebP photo" if exc.kind == "not_an_image" else ""
        raise UploadError(_STATUS.get(exc.kind, 422), exc.kind, f"{exc}{hint}") from None
