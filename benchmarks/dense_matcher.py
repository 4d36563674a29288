"""The dense matcher's CPU cost: features per photo in eager PyTorch against the runtime geoindex compiles the
matcher's trunk with (OpenVINO fp32 on a CPU where it is installed), interleaved in one run, and whether the two
give the same inlier counts.

    python benchmarks/dense_matcher.py [--data DIR] [--photos 200] [--rounds 3] [--pairs 400]

DIR is a folder with `index.csv` (`path,lat,lon,yyyymm`; default: ../shared/data/real/london-or-london). Photos
are a seeded sample; pairs are photos within 25 m of each other of different capture months (what re-scoring
matches: a revisit and an older capture of its spot), so their counts span the range calibration thresholds.
Each round times both runtimes over the same photos, in alternating order, with no feature cache (the files are
read once first, so neither runtime pays for the disk). Saves
benchmarks/results/dense_matcher.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "london-or-london"


def revisit_pairs(table, n: int, rng) -> list[tuple[int, int]]:
    from sklearn.neighbors import BallTree

    from geoindex.revisit import SPOT_M
    from geoindex.voting import EARTH_RADIUS_KM

    points = np.radians(table[["lat", "lon"]].to_numpy(np.float64))
    near = BallTree(points, metric="haversine").query_radius(points, SPOT_M / 1000 / EARTH_RADIUS_KM)
    months = table["yyyymm"].to_numpy()
    pairs = [(i, int(j)) for i, found in enumerate(near) for j in found if j > i and months[j] != months[i]]
    take = rng.choice(len(pairs), min(n, len(pairs)), replace=False)
    return [pairs[t] for t in sorted(take)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args(argv)

    import pandas as pd

    from geoindex.verification import DenseMatcher, dense_unavailable, shared_dense_matcher

    if not (args.data / "index.csv").is_file():
        sys.exit(f"no index.csv in {args.data}: pass --data DIR")
    if shared_dense_matcher() is None:
        sys.exit(f"the dense matcher is unavailable: {dense_unavailable()}")
    table = pd.read_csv(args.data / "index.csv")
    paths = [str(args.data / p) for p in table["path"]]
    rng = np.random.default_rng(0)
    sample = [paths[i] for i in sorted(rng.choice(len(paths), min(args.photos, len(paths)), replace=False))]
    matchers = {"torch": DenseMatcher(cache_photos=0, runtime="torch"), "compiled": DenseMatcher(cache_photos=0)}
    for path in sample:  # every file in the OS's cache before either runtime is timed
        Path(path).read_bytes()
    for matcher in matchers.values():
        for path in sample[:3]:
            matcher.features(path)  # export or load, and warm up, outside the timing
    runtime = matchers["compiled"].runtime
    print(f"{len(sample)} photos, {args.rounds} rounds; compiled trunk runs in {runtime}")
    seconds = {name: [] for name in matchers}
    for r in range(args.rounds):
        for name in (list(matchers) if r % 2 == 0 else list(matchers)[::-1]):
            started = time.perf_counter()
            for path in sample:
                matchers[name].features(path)
            seconds[name].append((time.perf_counter() - started) / len(sample))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {seconds[n][-1] * 1000:.1f} ms" for n in matchers))
    per_photo = {name: float(np.median(s)) for name, s in seconds.items()}
    ratio = per_photo["torch"] / per_photo["compiled"]
    print(f"features, median ms a photo (decode, resize and trunk): torch {per_photo['torch'] * 1000:.1f}, "
          f"{runtime} {per_photo['compiled'] * 1000:.1f}: {ratio:.2f}x")

    pairs = revisit_pairs(table, args.pairs, rng)
    counts = {}
    for name, matcher in matchers.items():
        found = {}
        for i in sorted({i for pair in pairs for i in pair}):
            found[i] = matcher.features(paths[i])
        started = time.perf_counter()
        counts[name] = np.array([matcher.inliers(found[a], found[b]) for a, b in pairs])
        counts[name + "_match_ms"] = (time.perf_counter() - started) / max(len(pairs), 1) * 1000
    torch_counts, compiled_counts = counts["torch"], counts["compiled"]
    agreement = {"pairs": len(pairs),
                 "identical": float((torch_counts == compiled_counts).mean()) if len(pairs) else None,
                 "max_abs_difference": int(np.abs(torch_counts - compiled_counts).max()) if len(pairs) else 0,
                 "median_inliers": float(np.median(torch_counts)) if len(pairs) else None,
                 "match_ms_a_pair": counts["torch_match_ms"]}
    if pairs:
        print(f"inliers on {len(pairs)} revisit pairs (median {agreement['median_inliers']:g}): identical for "
              f"{agreement['identical']:.1%}, largest difference {agreement['max_abs_difference']}; matching "
              f"{agreement['match_ms_a_pair']:.1f} ms a pair")
    else:
        print("no pair of photos within 25 m of different capture months: inlier agreement not measured")
    save("dense_matcher", {"data": args.data.name, "photos": len(sample), "rounds": args.rounds,
                           "compiled_runtime": runtime, "seconds_a_photo": per_photo, "rounds_seconds": seconds,
                           "speedup": ratio, "agreement": agreement, "matcher": DenseMatcher.name,
                           "command": "python benchmarks/dense_matcher.py " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
