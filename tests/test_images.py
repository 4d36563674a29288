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


def _decode_both(data: bytes, draft_size=None, monkeypatch=None):
    from geoindex.images import DECODER_ENV, decode_image
    monkeypatch.setenv(DECODER_ENV, "pil")
    by_pil = decode_image(data, draft_size)
    monkeypatch.delenv(DECODER_ENV)
    return by_pil, decode_image(data, draft_size)


def test_simplejpeg_decodes_the_pixels_pil_decodes(tmp_path, monkeypatch):
    """The fast JPEG decoder gives PIL's pixels: same draft scale, EXIF orientation, grey JPEGs; CMYK still decodes
    (through PIL); a truncated JPEG is refused by both."""
    import io

    import numpy as np
    from PIL import Image

    from geoindex.images import jpeg_decoder
    pytest.importorskip("simplejpeg")
    assert jpeg_decoder() == "simplejpeg"
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((1280, 960), Image.Resampling.BILINEAR)
    cases = []
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        cases.append((f"orientation {orientation}", buf.getvalue()))
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        photo.convert(mode).save(buf, "JPEG", quality=90)
        cases.append((mode, buf.getvalue()))
    for label, data in cases:
        for draft_size in (None, 292, 100):  # full size, half scale (960 / 2 >= 292), 1/8 scale
            by_pil, fast = _decode_both(data, draft_size, monkeypatch)
            assert fast.mode == by_pil.mode == "RGB" and fast.size == by_pil.size, (label, draft_size, fast.size, by_pil.size)
            diff = np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(by_pil, dtype=np.int16))
            assert diff.max() <= 1, (label, draft_size, diff.max())
    assert _decode_both(cases[2][1], 292, monkeypatch)[1].size == (480, 640)  # orientation 6: upright is portrait
    for decoder in ("pil", ""):
        monkeypatch.setenv("GEOINDEX_JPEG_DECODER", decoder)
        with pytest.raises(ImageError, match="truncated"):
            from geoindex.images import decode_image
            decode_image(cases[0][1][: len(cases[0][1]) * 2 // 3])


def test_simplejpeg_embeds_real_photos_as_pil_does(monkeypatch):
    """Real street photos: the model's input tensors from the two decoders are equal (within 1 level)."""
    import numpy as np

    from conftest import shared_photos_root
    from geoindex.images import DECODER_ENV, ImageTransform
    pytest.importorskip("simplejpeg")
    root, why = shared_photos_root()
    if root is None:
        pytest.skip(why)
    import itertools
    paths = list(itertools.islice(root.rglob("*.jpg"), 80))
    assert paths
    for transform in (ImageTransform(224, 256, "bicubic"), ImageTransform(260, 292, "bicubic")):
        fast = np.stack([transform.load(p).numpy() for p in paths]).astype(np.int16)
        monkeypatch.setenv(DECODER_ENV, "pil")
        by_pil = np.stack([transform.load(p).numpy() for p in paths]).astype(np.int16)
        monkeypatch.delenv(DECODER_ENV)
        assert np.abs(fast - by_pil).max() <= 1
