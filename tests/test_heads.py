import json

import numpy as np
import pandas as pd
import pytest
import torch

from geoindex import build_index
from geoindex.geo_index import load_index
from geoindex.heads import fit_probe, load_classifier, train_finetune, train_probe
from geoindex.methods import ClassifierMethod, Photos


def clustered(centres, n_per_class, spread, rng):
    y = np.repeat(np.arange(len(centres)), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_probe_learns_clusters_and_falls_to_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 64))
    x, y = clustered(centres, 60, 0.6, rng)
    xv, yv = clustered(centres, 30, 0.6, rng)
    head, history, _, best = fit_probe(x, y, xv, y_val=yv, n_classes=6, epochs=40, patience=40)
    assert best >= 0.95
    assert list(history.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    _, _, _, best_shuffled = fit_probe(x, rng.permutation(y), xv, y_val=yv, n_classes=6, epochs=40, patience=40)
    assert best_shuffled < 1 / 6 + 0.15


@pytest.fixture(scope="module")
def small_index(gsv_tree, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("heads")
    build_index(gsv_tree, name="h", index_dir=index_dir, backbone="cnn", weights="none", image_size=32, batch_size=16,
                num_workers=0, progress=False, log=lambda m: None)
    return index_dir


def test_probe_is_saved_with_curves_and_used_by_query(small_index):
    index = load_index("h", small_index)
    result = train_probe(index, epochs=5, progress=False)
    for name in ("head.pt", "history.csv", "curves.png", "meta.json"):
        assert (result.folder / name).is_file(), name
    assert len(pd.read_csv(result.folder / "history.csv")) == len(result.history) <= 5
    assert (result.folder / "curves.png").read_bytes()[:4] == b"\x89PNG"
    clf = load_classifier(index)
    probs = ClassifierMethod(index, clf).predict_proba(Photos.of_split(index, "test"))
    assert probs.shape == (index.store.count("test"), 4) and np.allclose(probs.sum(1), 1)
    prediction = index.query([index.store.metadata("test")["path"][0]], k=3)[0]
    assert prediction.classifier is not None and len(prediction.classifier) == 4


def test_finetune_checkpoints_and_resumes(small_index, tmp_path):
    index = load_index("h", small_index)
    first = train_finetune(index, epochs=1, batch_size=16, num_workers=0, device="cpu", progress=False, log=lambda m: None)
    assert (first.folder / "checkpoint.pt").is_file() and (first.folder / "backbone.pt").is_file()
    with pytest.raises(Exception, match="--resume"):
        train_finetune(index, epochs=2, num_workers=0, device="cpu", progress=False, log=lambda m: None)
    second = train_finetune(index, epochs=2, batch_size=16, num_workers=0, resume=True, device="cpu", progress=False,
                            log=lambda m: None)
    assert list(second.history["epoch"]) == [1, 2]
    assert second.history.iloc[0].to_dict() == pytest.approx(first.history.iloc[0].to_dict())
    clf = load_classifier(index, "finetune")
    assert ClassifierMethod(index, clf).predict_proba(Photos.of_split(index, "test")).shape == (index.store.count("test"), 4)
    meta = json.loads((second.folder / "meta.json").read_text())
    assert meta["mode"] == "finetune" and meta["amp"] is False


def test_finetune_augmentations_differ_between_epochs(gsv_tree):
    from geoindex.data import scan_dataset
    from geoindex.config import ExtractionConfig
    from geoindex.heads import make_loader
    from geoindex.images import ImageTransform

    paths = scan_dataset(gsv_tree).records["path"].tolist()[:8]
    transform = ImageTransform(32, 36)

    def first_batch(epoch):
        loader = make_loader(paths, [0] * len(paths), transform, True, ExtractionConfig(batch_size=8, num_workers=1),
                             seed=0, epoch=epoch)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(1), first_batch(1)), "the same epoch must be reproducible"
    assert not torch.equal(first_batch(1), first_batch(2)), "epoch 2 repeated epoch 1's augmentations"
