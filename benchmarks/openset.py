"""Open-set check: what an index says about photos from none of its cities, beside its own test photos.

    python benchmarks/openset.py --index NAME [--index-dir DIR] [--photos ../shared/data/real/osv5m-sample/select.csv]

For each method (the tuned kNN, the best classifier head) it prints the mean top probability on the index's
test photos and on the foreign photos, and the share of each that kNN flags as "unlike anything indexed"
(top-1 similarity below the threshold tuned on val). Saves JSON in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoindex.data import scan_dataset  # noqa: E402
from geoindex.extraction import embed_paths  # noqa: E402
from geoindex.geo_index import load_index  # noqa: E402
from geoindex.jsonio import dumps  # noqa: E402
from geoindex.methods import Photos  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True)
    parser.add_argument("--index-dir", default=None)
    parser.add_argument("--photos", default=str(SHARED / "data" / "real" / "osv5m-sample" / "select.csv"))
    parser.add_argument("--out", default=os.environ.get("GEOINDEX_BENCH_RESULTS", Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    index = load_index(args.index, args.index_dir, device="cpu")
    foreign = scan_dataset(args.photos).records
    print(f"embedding {len(foreign)} foreign photos from {args.photos} ...", flush=True)
    emb, ok, _ = embed_paths(index.backbone, foreign["path"].tolist(), progress=False)
    sets = {"test": Photos.of_split(index, "test"),
            "foreign": Photos(emb[ok], foreign["path"][ok].tolist(), name="foreign")}
    methods = [index.knn_method()]
    if index.classifier_method() is not None:
        methods.append(index.classifier_method())
    rows = {}
    for name, photos in sets.items():
        for method in methods:
            answer = method.predict(photos)
            entry = {"n": len(photos), "mean_top_probability": float(answer.probs.max(1).mean())}
            if method.name == "knn":
                entry["share_unlike_indexed"] = float(answer.extra["unlike"].mean())
                entry["mean_top_similarity"] = float(answer.extra["similarities"][:, 0].mean())
                entry["unlike_threshold"] = method.unlike_threshold
            rows[f"{name}/{method.name}"] = entry
    print(f"{'set/method':<28} {'n':>5} {'mean top p':>11} {'unlike':>7} {'top sim':>8}")
    for key, r in rows.items():
        unlike = r.get("share_unlike_indexed")
        sim = r.get("mean_top_similarity")
        print(f"{key:<28} {r['n']:>5} {r['mean_top_probability']:>11.3f} "
              f"{'-' if unlike is None else f'{unlike:.3f}':>7} {'-' if sim is None else f'{sim:.3f}':>8}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"index": index.name, "backbone": index.manifest["backbone"], "photos": str(args.photos), "rows": rows,
              "command": "python benchmarks/openset.py " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU", "date": time.strftime("%Y-%m-%d")}
    path = out / f"openset_{index.name}.json"
    path.write_text(dumps(record) + "\n")
    print(f"saved {path}")
    return record


if __name__ == "__main__":
    main()
