"""The end-to-end job behind the README's first command: build an index, query it, score it."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def find_demo_data(data=None, log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """The user's data, else a real sample in ../shared, else a generated tree (returns (root, synthetic))."""
    if data:
        return Path(data), False
    for candidate in (SHARED / "data" / "gsv_cities", SHARED / "data" / "GSV-Cities", SHARED / "data"):
        if (candidate / "Images").is_dir():
            log(f"using the real sample in {candidate}")
            return candidate, False
    from .synthetic import make_synthetic_gsv

    root = make_synthetic_gsv(Path(tempfile.mkdtemp(prefix="geoindex-demo-")) / "GSV-Synthetic",
                              places_per_city=12, images_per_place=2, image_size=(160, 120))
    banner = "=" * 78
    log(f"{banner}\nNO REAL PHOTOS FOUND: running on a tiny SYNTHETIC tree at {root}\n"
        f"(pass --data /path/to/GSV-Cities for real figures; these ones mean nothing)\n{banner}")
    return root, True
