"""Decoding image files into RGB and turning them into model-sized uint8 tensors.

Decoding lives here, apart from the models, because it runs in DataLoader workers: everything
in this module must be cheap to pickle.

Nothing here trusts a file's header: the pixel count is checked before any pixel is decoded
(`max_pixels`, after JPEG draft scaling), and a JPEG whose data ends before its declared size
(libjpeg silently pads that with flat grey) is refused as truncated.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# The only formats PIL may even try to open. Without this list PIL identifies anything it knows by its bytes,
# whatever the file's name, EPS included, and decoding an EPS runs Ghostscript on it: a photo must never run a
# program.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# libjpeg's, with draft scaling and grey padding of short files. PIL's JPEG opener names the JPEGs of many phones
# and cameras (with a second, smaller picture) MPO.
JPEG_FORMATS = ("JPEG", "MPO")
# Well under PIL's own bomb limits (89 MP warning, 179 MP error): a 40 MP RGB decode is 120 MB per worker.
from .catalog import DEFAULT_MAX_PIXELS  # noqa: E402,F401  (one definition, importable without torch)
# A real file bigger than this is not a street-level photo; reading it whole into memory would be the attack.
MAX_FILE_BYTES = 200 * 1024 * 1024
ImageFile.LOAD_TRUNCATED_IMAGES = False  # never pad a short file: refuse it

_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    # Transparent pixels carry arbitrary colour; compositing on white shows what a viewer sees.
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, CMYK, I;16, P without alpha ...


def read_image_bytes(path) -> bytes:
    """A file's bytes, or ImageError (missing, unreadable, empty, absurdly large)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ImageError("empty file (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"file is {size / 1e6:.0f} MB, more than any photo ({MAX_FILE_BYTES / 1e6:.0f} MB limit)")
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("a folder, not an image file") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None


def content_digest(data: bytes) -> str:
    """What identifies a photo's bytes (duplicates under two labels are found by it)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _jpeg_padded(img: Image.Image) -> bool:
    """libjpeg fills the MCUs a short JPEG lacks with exact mid-grey and only warns; PIL passes that on.

    A real photo whose whole bottom band is exactly (128, 128, 128) is vanishingly rare; a padded one
    always has it, since the padding runs to the last row.
    """
    w, h = img.size
    band = np.asarray(img.crop((0, h - max(1, h // 64), w, h)))  # the band only: converting the whole photo costs 10x more
    return bool(band.size) and bool((band == 128).all())


def decode_image(data: bytes, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 name: str = "image", before_decode=None) -> Image.Image:
    """Bytes -> RGB image, or ImageError with the reason. The pixel limit applies before decoding.

    before_decode(img), when given, sees the opened image (format, size after draft scaling) before any pixel
    is decoded, and may raise to refuse it: the service's own, lower limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit decides
            img = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
        with img:
            if draft_size is not None and img.format in JPEG_FORMATS:
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale: several times faster, and a huge JPEG stays small.
                img.draft("RGB", (draft_size, draft_size))
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(f"image is {w} x {h} = {w * h / 1e6:.1f} MP, above the {max_pixels / 1e6:g} MP limit "
                                 "(--max-pixels); refused before decoding", "too_many_pixels")
            if before_decode is not None:
                before_decode(img)
            img.load()  # force the full decode now, so truncation is caught here
            if img.format in JPEG_FORMATS and _jpeg_padded(img):
                raise ImageError(f"corrupt or truncated image data (the JPEG's data ends before its declared "
                                 f"{w} x {h} pixels; libjpeg would pad the rest with grey)")
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)", "not_an_image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large to decode safely ({exc})", "too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image data ({exc})") from None
    except (MemoryError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large to decode safely ({type(exc).__name__})", "too_many_pixels") from None


def load_image(path, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file fully decoded as RGB, or raise ImageError with the reason.

    draft_size lets libjpeg decode at a reduced scale (never below draft_size on the short side),
    which is several times faster for photos much larger than the model input.
    """
    return decode_image(read_image_bytes(path), draft_size, max_pixels)


def load_image_with_digest(path, draft_size: int | None = None,
                           max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """(image, content digest): the bytes are read once, hashed and decoded."""
    data = read_image_bytes(path)
    return decode_image(data, draft_size, max_pixels), content_digest(data)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 CHW tensor of image_size x image_size (resize short side, centre crop).

    Normalisation is left to the model side, so workers ship 1 byte per value instead of 4
    and the float work happens batched on the target device.
    """

    image_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The centre image_size square of the photo resized to a short side of resize_size, in one resampling
        pass over the source pixels that square needs (PIL's box resize): the filter sees the same pixels as
        resizing the whole photo and cropping, without resampling the parts the crop throws away (outputs agree
        within rounding: tests/test_images.py holds them to 2 levels on under 0.5% of values)."""
        w, h = img.size
        scale = self.resize_size / min(w, h)
        new_w, new_h = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
        left, top = (new_w - self.image_size) // 2, (new_h - self.image_size) // 2
        sx, sy = w / new_w, h / new_h  # per axis, as a resize to (new_w, new_h) would scale
        box = (left * sx, top * sy, (left + self.image_size) * sx, (top + self.image_size) * sy)
        return img.resize((self.image_size, self.image_size), _INTERPOLATION[self.interpolation], box=box)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        array = np.asarray(self.resize_crop(img), dtype=np.uint8)  # a read-only copy of PIL's pixels
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # the one copy it needs

    def load(self, path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        return self(load_image(path, draft_size=self.resize_size, max_pixels=max_pixels))

    def load_with_digest(self, path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, str]:
        img, digest = load_image_with_digest(path, draft_size=self.resize_size, max_pixels=max_pixels)
        return self(img), digest
