"""Decoding image files into RGB and turning them into model-sized uint8 tensors.

Decoding lives here, apart from the models, because it runs in DataLoader workers: everything
in this module must be cheap to pickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

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


def load_image(path, draft_size: int | None = None) -> Image.Image:
    """Open an image file fully decoded as RGB, or raise ImageError with the reason.

    draft_size lets libjpeg decode at a reduced scale (never below draft_size on the short side),
    which is several times faster for photos much larger than the model input.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageError("empty file (0 bytes)")
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()  # force the full decode now, so truncation is caught here
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image data ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large to decode safely ({exc})") from None


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 CHW tensor of image_size x image_size (resize short side, centre crop).

    Normalisation is left to the model side, so workers ship 1 byte per value instead of 4
    and the float work happens batched on the target device.
    """

    image_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        scale = self.resize_size / min(w, h)
        new_w, new_h = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
        img = img.resize((new_w, new_h), _INTERPOLATION[self.interpolation])
        left, top = (new_w - self.image_size) // 2, (new_h - self.image_size) // 2
        img = img.crop((left, top, left + self.image_size, top + self.image_size))
        array = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def load(self, path) -> torch.Tensor:
        return self(load_image(path, draft_size=self.resize_size))
