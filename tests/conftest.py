import os
import sys
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# No test process may start OpenVINO's usage telemetry (it posts to Google Analytics from a forked process, which
# can hang the run at exit); geoindex.runtime imports openvino the same way.
sys.modules.setdefault("openvino_telemetry", None)

# Tests never reach the network: a missing weights file must fail fast with its message.
os.environ["GEOINDEX_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CITIES = ("Barcelona", "London", "Osaka", "PRS")


@pytest.fixture(scope="session")
def gsv_tree(tmp_path_factory):
    from geoindex.synthetic import make_synthetic_gsv
    return make_synthetic_gsv(tmp_path_factory.mktemp("gsv") / "GSV-Cities", cities=CITIES, places_per_city=8,
                              images_per_place=2, image_size=(64, 48))


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """Three cities, 30 tiny photos: enough for a build's every phase, fast enough to build many times."""
    from geoindex.synthetic import make_synthetic_gsv
    return make_synthetic_gsv(tmp_path_factory.mktemp("small") / "GSV", cities=("Barcelona", "London", "Osaka"),
                              places_per_city=5, images_per_place=2, image_size=(40, 32))


def build_cnn_index(root, index_dir, name: str, *options) -> None:
    """`geoindex build` of a small tree with the seeded-random plain CNN at 32 px: seconds, and every phase runs."""
    from click.testing import CliRunner

    from geoindex.cli import main

    result = CliRunner().invoke(main, ["build", "--data", str(root), "--backbone", "cnn", "--weights", "none",
                                       "--image-size", "32", "--workers", "0", "--name", name,
                                       "--index-dir", str(index_dir), *map(str, options)])
    assert result.exit_code == 0, result.output


@pytest.fixture
def index_dir(tmp_path):
    return tmp_path / "indexes"


def write_bad_files(folder: Path, city: str) -> dict[str, str]:
    """Odd and broken files with GSV-Cities names; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)

    def name(place, tag):
        return folder / f"{city}_{place:07d}_2020_01_000_41.400000_2.170000_{tag}.jpg"

    files = {k: name(900 + i, k) for i, k in enumerate(["empty", "truncated", "text", "alpha", "gray", "cmyk"])}
    files["empty"].write_bytes(b"")
    good = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good.save(files["truncated"], format="JPEG")
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("this is not a picture\n")
    rgba = Image.fromarray(rng.integers(0, 255, (48, 64, 4), dtype=np.uint8), "RGBA")
    rgba.save(files["alpha"], format="PNG")  # a PNG behind a .jpg name, as happens in scraped data
    good.convert("L").save(files["gray"], format="JPEG")
    good.convert("CMYK").save(files["cmyk"], format="JPEG")
    return {k: str(v) for k, v in files.items()}


def shared_photos_root():
    """Real street-level photos in ../shared/data (a GSV-Cities tree, or the London-or-London folder read through
    its index.csv), else None with the reason."""
    for candidate in (SHARED / "data" / "gsv_cities", SHARED / "data" / "GSV-Cities", SHARED / "data"):
        if (candidate / "Images").is_dir():
            return candidate, ""
    london = SHARED / "data" / "real" / "london-or-london"
    if (london / "index.csv").is_file():
        return london, ""
    return None, f"no real street-level photos under {SHARED / 'data'} (see ../shared/README.md)"


def london_csvs(tmp_path, n_index: int = 100, n_external: int = 40):
    """Two geotagged CSVs of real London-or-London photos with absolute paths, from disjoint areas: photos west of
    a per-city longitude for the index, east of it for the external set. None (with the reason) when absent."""
    import pandas as pd
    london = SHARED / "data" / "real" / "london-or-london"
    if not (london / "index.csv").is_file():
        return None, None, f"no London-or-London photos at {london} (see ../shared/README.md)"
    table = pd.read_csv(london / "index.csv")
    table["path"] = [str(london / p) for p in table["path"]]
    index_rows, external_rows = [], []
    for city, group in table.groupby("city"):
        group = group.sort_values("lon")
        index_rows.append(group.head(len(group) // 2).sample(n_index, random_state=0))
        external_rows.append(group.tail(len(group) // 3).sample(n_external, random_state=0))
    index_csv, external_csv = tmp_path / "index.csv", tmp_path / "external.csv"
    pd.concat(index_rows)[["path", "city", "lat", "lon"]].to_csv(index_csv, index=False)
    pd.concat(external_rows)[["path", "city", "lat", "lon"]].to_csv(external_csv, index=False)
    return index_csv, external_csv, ""


@contextmanager
def small_tmpfs(folder: Path, size: str):
    """A real, size-limited file system mounted at `folder` for the test's duration (root only; else skip)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (mount -t tmpfs -o size=...)")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here (container without CAP_SYS_ADMIN)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)])
