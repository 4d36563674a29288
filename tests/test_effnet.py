"""EfficientNet-Lite0 with the real ImageNet weights shipped by pip: proof that the key mapping and
preprocessing are right is that the full classifier names real photos correctly."""
import numpy as np
import pytest
import torch
from PIL import Image

from geoindex.backbones import EFFNET_SHA256, create_backbone

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")

# ImageNet class indices.
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


@pytest.fixture(scope="module")
def effnet():
    return create_backbone("effnet")


def _top5(bb, array):
    x = bb.preprocess(Image.fromarray(array)).unsqueeze(0)
    with torch.inference_mode():
        logits = bb.model.classify(x)
    return logits.softmax(1)[0].topk(5).indices.tolist()


def test_weights_are_the_shipped_file(effnet):
    assert effnet.weights.source == "pretrained" and effnet.weights.sha256 == EFFNET_SHA256
    assert effnet.embed_dim == 1280 and effnet.mean == (0.5, 0.5, 0.5) and effnet.transform.interpolation == "bicubic"


def test_cat_is_a_cat_and_coffee_is_espresso(effnet):
    assert _top5(effnet, skimage_data.chelsea())[0] in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert _top5(effnet, skimage_data.coffee())[0] == ESPRESSO


def test_embeddings_are_stable_and_meaningful(effnet):
    cat = Image.fromarray(skimage_data.chelsea())
    flipped = cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    coffee = Image.fromarray(skimage_data.coffee())
    a, b, f, c = effnet.embed([cat, cat, flipped, coffee])
    np.testing.assert_array_equal(a, b)
    assert float(a @ f) > float(a @ c) + 0.2
    assert float(a @ a) == pytest.approx(1, abs=1e-5)
