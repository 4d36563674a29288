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
