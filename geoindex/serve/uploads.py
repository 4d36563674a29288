"""Request bodies -> PIL images, in memory only, with every limit checked before the work it guards.

An upload is read with a byte cap while it streams, parsed (multipart or a raw image body) without
spooling to disk, then decoded with a pixel cap checked from the header before any pixel is
decoded, so a decompression bomb costs a few bytes of parsing, not gigabytes of memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000  # a 48 MP phone photo fits; a 20k x 20k bomb does not
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


async def read_body(request, max_bytes: int, drain_bytes: int = 64 * 2**20) -> bytes:
    """The whole body, refusing (413) one over max_bytes.

    An oversize body is still drained (up to drain_bytes) before answering: a client that is
    still sending would otherwise see a reset connection instead of the 413 that says why.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        await _drain(request, drain_bytes)
        raise UploadError(413, "too_large", f"upload of {int(declared) / 2**20:.1f} MB is over the limit of "
                                            f"{max_bytes / 2**20:.1f} MB (--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            await _drain(request, drain_bytes)
            raise UploadError(413, "too_large", f"upload is over the limit of {max_bytes / 2**20:.1f} MB "
                                                "(--max-upload-mb)")
        chunks.append(chunk)
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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, or UploadError saying why not.

    The very decoder `geoindex query` and a build use for files (geoindex.images.decode_image: pixel limit
    before decoding, JPEG draft scaling to draft_size, truncated data refused, EXIF rotation, alpha on
    white), so a photo answers the same over HTTP.
    """
    from ..errors import ImageError
    from ..images import decode_image as decode

    try:
        return decode(data, draft_size=draft_size, max_pixels=max_pixels)
    except ImageError as exc:
        hint = "; send a JPEG, PNG or WebP photo" if exc.kind == "not_an_image" else ""
        raise UploadError(_STATUS.get(exc.kind, 422), exc.kind, f"{exc}{hint}") from None
