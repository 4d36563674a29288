"""The end-to-end job behind the README's first command: build an index, train, query it, score it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_SAMPLE = SHARED / "data" / "real" / "london-or-london"


def find_demo_data(data=None, index_dir=None, log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """The user's data, else the real photos in ../shared, else a generated tree (returns (source, synthetic)).

    The generated tree lives beside the indexes (not in a temporary folder), so the demo index keeps
    pointing at photos that exist, and a second demo reuses both.
    """
    if data:
        return Path(data), False
    if (REAL_SAMPLE / "index.csv").is_file():
        log(f"using the real London-or-London photos in {REAL_SAMPLE}")
        return REAL_SAMPLE, False
    from .fileio import index_home
    from .synthetic import SYNTHETIC_MARKER, make_synthetic_gsv

    root = index_home(index_dir) / ".demo-data" / "GSV-Synthetic"
    if not (root / SYNTHETIC_MARKER).is_file():
        root = make_synthetic_gsv(root, places_per_city=12, images_per_place=2, image_size=(160, 120))
    banner = "=" * 78
    log(f"{banner}\nNO REAL PHOTOS FOUND: running on a tiny SYNTHETIC tree at {root}\n"
        f"(pass --data PATH for real figures; these ones mean nothing)\n{banner}")
    return root, True


def run_demo(data=None, *, backbone: str = "auto", per_city=None, rebuild: bool = False, device="auto", index_dir=None,
             adapt: bool = True, log: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> dict:
    """build -> train (as `geoindex train` does: adapt the backbone where it can, then probe + kNN tuning on val)
    -> query three test photos -> bench; returns the bench results."""
    from .adapt import wants_adaptation
    from .bench import format_table, run_bench
    from .build import build_index, choose_default_backbone
    from .cities import full_name
    from .errors import IndexNotFound
    from .geo_index import load_index
    from .locate import resolve_index_path
    from .pipeline import train

    source, synthetic = find_demo_data(data, index_dir, log)
    if backbone == "auto":
        backbone, reason = choose_default_backbone()
        log(f"backbone: {backbone} ({reason})")
    name = demo_index_name(source, backbone, synthetic)
    path = None
    if not rebuild:
        try:
            path = resolve_index_path(name, index_dir)
            log(f"reusing index {name!r} at {path} (pass --rebuild to build it again)")
        except IndexNotFound:
            path = None
    if path is None:
        report = build_index(source, name=name, backbone=backbone, per_city=per_city, device=device,
                             index_dir=index_dir, overwrite=True, log=log)
        counts = report.manifest["counts"]
        log(f"built {report.name!r}: train {counts['train']}, val {counts['val']}, test {counts['test']} photos, "
            f"{report.images_per_second:.1f} images/s")
        path = report.path
    index = load_index(path, device=device)
    if index.store.count("val"):
        adapting = adapt and wants_adaptation(index)
        if adapting:
            log("adapting the backbone to the index's cities (geoindex train's first step; --no-adapt skips it)")
        index = train(index, mode="auto" if adapt else "probe", device=device, log=log).index
    test = index.store.metadata("test")
    sample = test.groupby("city").head(1).head(3)
    for prediction, truth in zip(index.query(list(sample["path"])), sample["city"]):
        log(f"query {Path(prediction.source).name}: {full_name(prediction.city)} (p={prediction.probability:.2f}, "
            f"{prediction.lead}), truth {full_name(truth)}")
    # The demo downloads nothing: zero-shot runs when CLIP weights are already cached, else is reported skipped.
    os.environ.setdefault("GEOINDEX_OFFLINE", "1")
    log("\nscoring kNN, the classifier heads, CLIP zero-shot and their fusion on the test split:")
    results = run_bench(index, log=log, device=device)
    log(format_table(results))
    log(f"results in {results['out']}")
    if synthetic:
        warn("NOTE: SYNTHETIC data: these figures are meaningless; pass --data for real ones")
    log(next_steps(name, index_dir))
    return results


def demo_index_name(source, backbone: str, synthetic: bool) -> str:
    """The name the README's own commands use: `london` for the real London photos with the default backbone,
    else what `geoindex build` would call it (<data folder>-<backbone>), so its commands find the demo's index."""
    if synthetic:
        return "demo-synthetic"
    from .build import choose_default_backbone
    if Path(source).resolve() == REAL_SAMPLE.resolve():
        return "london" if backbone == choose_default_backbone()[0] else f"london-{backbone}"
    from .fileio import name_from
    return f"{name_from(Path(source).expanduser().resolve().stem)}-{backbone}"  # as build_index names it


def next_steps(name: str, index_dir=None) -> str:
    where = f" --index-dir {index_dir}" if index_dir else ""
    return (f"\nNext, with the index {name!r} (source .venv/bin/activate first to have `geoindex`):\n"
            f"  geoindex query PHOTO.jpg --index {name}{where}     where was this photo taken? (a folder works too)\n"
            f"  geoindex serve --index {name}{where}               a web page for dropping photos, at http://127.0.0.1:8000/\n"
            f"  geoindex bench --index {name}{where}               these figures again (+ --external fresh.csv)\n"
            "  geoindex --help                                  every command")
