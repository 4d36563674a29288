import pytest

from conftest import write_bad_files
from geoindex.errors import ImageError
from geoindex.images import ImageTransform, load_image


def test_bad_files_are_refused_with_reasons_and_odd_ones_decode(tmp_path):
    files = write_bad_files(tmp_path, "Barcelona")
    with pytest.raises(ImageError, match="empty"):
        load_image(files["empty"])
    with pytest.raises(ImageError, match="truncated"):
        load_image(files["truncated"])
    with pytest.raises(ImageError, match="not an image"):
        load_image(files["text"])
    for kind in ("alpha", "gray", "cmyk"):
        img = load_image(files[kind])
        assert img.mode == "RGB" and img.size == (64, 48), kind


def test_transform_gives_uint8_square_crop(tmp_path):
    from PIL import Image
    Image.new("RGB", (640, 480), (10, 20, 30)).save(tmp_path / "a.jpg")
    t = ImageTransform(image_size=224, resize_size=256).load(tmp_path / "a.jpg")
    assert t.shape == (3, 224, 224) and str(t.dtype) == "torch.uint8"
    assert abs(int(t[0].float().mean()) - 10) <= 2


def test_resize_crop_matches_resizing_the_whole_photo_then_cropping():
    """The one-pass box resize gives the pixels a full resize followed by a centre crop gives, within rounding."""
    import numpy as np
    from PIL import Image

    from geoindex.images import ImageTransform

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    photo = Image.fromarray(base).resize((640, 480), Image.Resampling.BILINEAR)  # smooth, photo-like texture
    for image_size, resize_size, size in ((260, 292, (640, 480)), (224, 256, (480, 640)), (260, 292, (224, 224))):
        img = photo.resize(size, Image.Resampling.BILINEAR)
        t = ImageTransform(image_size, resize_size, "bicubic")
        w, h = img.size
        scale = resize_size / min(w, h)
        new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        full = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
        expected = np.asarray(full.crop((left, top, left + image_size, top + image_size)), dtype=np.int16)
        got = np.asarray(t.resize_crop(img), dtype=np.int16)
        assert got.shape == expected.shape == (image_size, image_size, 3)
        diff = np.abs(got - expected)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.005, (size, diff.max(), (diff > 0).mean())
