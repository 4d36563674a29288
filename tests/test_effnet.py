"""EfficientNet-Lite0/1/2 with the real ImageNet weights shipped by pip: proof that the key mapping and
preprocessing are right is that the full classifier names real photos correctly."""
import numpy as np
import pytest
import torch
from PIL import Image

from geoindex.backbones import EFFNET_LITE, EFFNET_SHA256, create_backbone, default_weights_available

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")

# ImageNet class indices.
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967
# timm's published evaluation settings of tf_efficientnet_liteN: input size and crop fraction.
EXPECTED = {"effnet": (224, 256), "effnet-lite1": (240, 272), "effnet-lite2": (260, 292)}
SHA256 = {"effnet": EFFNET_SHA256,
          "effnet-lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
          "effnet-lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def effnet(request):
    if not default_weights_available(request.param):
        pytest.skip(f"{EFFNET_LITE[request.param].package} is not installed")
    return create_backbone(request.param)


def _top5(bb, array):
    x = bb.preprocess(Image.fromarray(array)).unsqueeze(0)
    with torch.inference_mode():
        logits = bb.model.classify(x)
    return logits.softmax(1)[0].topk(5).indices.tolist()


def test_weights_are_the_shipped_file(effnet):
    assert effnet.weights.source == "pretrained" and effnet.weights.sha256 == SHA256[effnet.name]
    assert EFFNET_LITE[effnet.name].package in effnet.weights.description
    assert effnet.embed_dim == 1280 and effnet.mean == (0.5, 0.5, 0.5) and effnet.transform.interpolation == "bicubic"
    assert (effnet.transform.image_size, effnet.transform.resize_size) == EXPECTED[effnet.name]


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


def test_a_lite_variants_weights_do_not_load_into_another():
    from geoindex.errors import GeoindexError
    with pytest.raises(GeoindexError, match="does not fit this backbone"):
        create_backbone("effnet", weights=EFFNET_LITE["effnet-lite2"].weights_path())
