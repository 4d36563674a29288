"""What `geoindex train` says: which index, which epoch was kept and why, and nothing called a validation figure
that was measured on training photos."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import build_cnn_index

from geoindex.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def index_without_val(tmp_path) -> Path:
    """An index 'novals' of three cities with two photos each (too few for a val split); returns the photos' folder."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c, city in enumerate(["Lisbon", "Madrid", "Rome"]):  # two photos a city: too few for a val split
        (root / city).mkdir(parents=True)
        for i in range(2):
            img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            img[..., c] = 230
            Image.fromarray(img).save(root / city / f"{i}.png")
    build_cnn_index(root, tmp_path / "indexes", "novals", "--device", "cpu")
    return root


def test_training_without_a_validation_split_says_so_and_reports_no_validation_figure(tmp_path):
    root = index_without_val(tmp_path)
    manifest = json.loads((tmp_path / "indexes" / "novals" / "manifest.json").read_text())
    assert manifest["counts"]["val"] == 0  # the premise
    out = run("train", "--mode", "probe", "--epochs", "3", "--index-dir", tmp_path / "indexes", "--device", "cpu")
    assert out.exit_code == 0, out.output
    assert "training index 'novals'" in out.output  # which index, although none was named
    assert "no validation split" in out.output and "early stopping" in out.output
    assert "validation accuracy 1.000" not in out.output and "best validation accuracy" not in out.output
    assert "kNN not tuned" in out.output
    meta = json.loads((tmp_path / "indexes" / "novals" / "heads" / "probe" / "meta.json").read_text())
    assert meta["best_val_accuracy"] is None and meta["validated_on"] is None
    history = pd.read_csv(tmp_path / "indexes" / "novals" / "heads" / "probe" / "history.csv")
    assert history["val_accuracy"].isna().all()  # training figures are not stored as validation ones either
    query = run("query", next((root / "Rome").glob("*.png")), "--index-dir", tmp_path / "indexes", "--device", "cpu",
                "--json")
    assert json.loads(query.stdout)["results"][0]["method"] == "knn"


def test_fine_tuning_without_a_validation_split_stores_no_training_figure_as_a_validation_one(tmp_path):
    root = index_without_val(tmp_path)
    out = run("train", "--mode", "finetune", "--epochs", "2", "--workers", "0", "--index-dir", tmp_path / "indexes",
              "--device", "cpu")
    assert out.exit_code == 0, out.output
    assert "train (no val split) loss" in out.output and "no validation split: kept epoch" in out.output
    folder = tmp_path / "indexes" / "novals" / "heads" / "finetune"
    assert json.loads((folder / "meta.json").read_text())["best_val_accuracy"] is None
    history = pd.read_csv(folder / "history.csv")
    # Before the shared loop the fine-tuning stored its checks on the training photos under val_loss/val_accuracy.
    assert len(history) >= 1 and history["val_accuracy"].isna().all() and history["val_loss"].isna().all()


def test_the_kept_epoch_is_explained_by_validation_loss(gsv_tree, tmp_path):
    built = run("build", "--data", gsv_tree, "--backbone", "cnn", "--weights", "none", "--image-size", "64",
                "--workers", "0", "--name", "t", "--index-dir", tmp_path, "--device", "cpu")
    assert built.exit_code == 0, built.output
    out = run("train", "--index", "t", "--mode", "probe", "--epochs", "8", "--patience", "8", "--index-dir", tmp_path,
              "--device", "cpu")
    assert out.exit_code == 0, out.output
    assert "training index 't'" in out.output and "--index NAME picks another" not in out.output
    history = pd.read_csv(tmp_path / "t" / "heads" / "probe" / "history.csv")
    kept = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert f"kept epoch {kept} of {len(history)}, the one with the lowest validation loss" in out.output
    best = history.loc[history["val_accuracy"].idxmax()]
    kept_accuracy = history.loc[history["epoch"] == kept, "val_accuracy"].iloc[0]
    if best["val_accuracy"] > kept_accuracy:  # another epoch was more accurate: the message says which
        assert f"epoch {int(best['epoch'])} reached {best['val_accuracy']:.3f}" in out.output


def test_top_level_help_says_train_adapts_the_backbone():
    out = run("--help")
    line = next(l for l in out.output.splitlines() if l.strip().startswith("geoindex train"))
    assert "adapt" in line


def test_curves_of_one_epoch_have_whole_epoch_ticks(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from geoindex.heads import save_curves
    history = pd.DataFrame([{"epoch": 1, "train_loss": 0.9, "train_accuracy": 0.6, "val_loss": 1.0,
                             "val_accuracy": 0.5}])
    figures = []
    original = plt.close
    plt.close = lambda fig=None: figures.append(fig)  # keep the figure to read its ticks
    try:
        save_curves(history, tmp_path, "one epoch", kept_epoch=1)
    finally:
        plt.close = original
    for ax in figures[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_confusion_matrix_keeps_its_axis_labels_inside_the_picture(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from geoindex.bench import plot_confusion
    figures = []
    original = plt.close
    plt.close = lambda fig=None: figures.append(fig)
    try:
        plot_confusion({"confusion": [[250, 20], [10, 260]], "classes": ["London", "London_Ontario"],
                        "accuracy": 0.944, "n": 540}, tmp_path / "confusion.png", "kNN on test")
    finally:
        plt.close = original
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["London, United Kingdom", "London, Ontario, Canada"]
    for text in (ax.yaxis.label, ax.xaxis.label, *ax.get_yticklabels(), *ax.get_xticklabels()):
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, (text.get_text(), box)


def test_a_stage_estimate_leaves_the_first_batch_out():
    """The first batch pays for warming up (on a GPU a 13-second stage was once announced as "about 4 min"): the
    estimate is the time so far plus what is left at the speed since, measured over a few seconds."""
    from geoindex.build import StageEstimate

    # started at 0; the first batch of 10 ends at 100 s, then one batch a second
    clock = iter([0.0, 100.0, 101.0, 102.0, 103.0, 104.0])
    said = []
    estimate = StageEstimate(said.append, "trunk features", 1000, clock=lambda: next(clock))
    for _ in range(3):  # the first batch, then two more: under StageEstimate.MEASURE_S of speed measured
        estimate.seen(10)
    assert said == []
    estimate.seen(10)
    assert said == ["trunk features: 1,000 photos, about 3 min at 10.0 photos/s"]  # 103 s + 960 / 10 s
    estimate.seen(10)
    estimate.seen(0)
    assert len(said) == 1

    for batches in ([8], [4, 4], [4, 0, 4]):  # stages over before a speed was measured: nothing to say
        quiet = []
        short = StageEstimate(quiet.append, "re-embedding", 8, clock=lambda: 5.0)
        for photos in batches:
            short.seen(photos)
        assert quiet == []
