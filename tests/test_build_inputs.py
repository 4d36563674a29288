"""What a build is given that is not a photo, or a place id it cannot use, is refused with the true reason;
a rebuild says what it will not keep."""
import os

import numpy as np
import pandas as pd
from PIL import Image

from geoindex import build_index
from geoindex.data import scan_dataset
from geoindex.heads import train_probe

FAST = dict(backbone="cnn", weights="none", image_size=32, batch_size=4, num_workers=0, progress=False)


def _jpeg(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_devices_fifos_and_negative_place_ids_are_refused_with_their_reason(tmp_path):
    good = _jpeg(tmp_path / "imgs" / "good.jpg")
    negative = _jpeg(tmp_path / "imgs" / "negative.jpg", 1)
    fifo = tmp_path / "imgs" / "fifo.jpg"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    rows = [(str(good), "Rome", "3"), ("/dev/zero", "Rome", ""), (str(fifo), "Rome", ""),
            ("imgs/missing.jpg", "Rome", ""), (str(negative), "Rome", "-3")]
    pd.DataFrame(rows, columns=["path", "city", "place_id"]).to_csv(tmp_path / "m.csv", index=False)
    ds = scan_dataset(tmp_path / "m.csv")
    assert ds.records["path"].tolist() == [str(good)]
    reasons = {os.path.basename(s["path"]): s["reason"] for s in ds.skipped}
    assert reasons["zero"].startswith("not a regular file (a device)")
    assert reasons["fifo.jpg"].startswith("not a regular file (a FIFO)")
    assert reasons["missing.jpg"].startswith("file not found")
    assert "place id -3 is negative" in reasons["negative.jpg"]


def test_a_fifo_named_like_a_photo_in_a_folder_is_listed_not_opened(tmp_path):
    for i in range(3):
        _jpeg(tmp_path / "data" / "Rome" / f"{i}.jpg", i)
    os.mkfifo(tmp_path / "data" / "Rome" / "pipe.jpg")
    ds = scan_dataset(tmp_path / "data")
    assert len(ds.records) == 3 and not any(p.endswith("pipe.jpg") for p in ds.records["path"])
    assert [s["reason"] for s in ds.skipped if s["path"].endswith("pipe.jpg")] == ["not a regular file (a FIFO); not opened"]


def test_a_rebuild_says_at_its_start_that_trained_heads_are_not_kept(tree, tmp_path):
    home = tmp_path / "home"
    build_index(tree, name="ix", index_dir=home, log=lambda m: None, **FAST)
    from geoindex.geo_index import load_index
    index = load_index("ix", home, device="cpu")
    train_probe(index, epochs=1, progress=False, log=lambda m: None)
    index.close()
    said = []
    build_index(tree, name="ix", index_dir=home, overwrite=True, log=said.append, **FAST)
    notes = [m for m in said if "will not have" in m]
    assert len(notes) == 1 and "the probe head" in notes[0] and "geoindex train" in notes[0]
    assert said.index(notes[0]) == 0  # said before any work
    assert not (home / "ix" / "heads").exists()
