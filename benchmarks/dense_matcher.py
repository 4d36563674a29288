"""The dense matcher's CPU cost: features per photo in eager PyTorch against the runtime geoindex compiles the
matcher's trunk with (OpenVINO fp32 on a CPU where it is installed), interleaved in one run, and whether the two
give the same inlier counts; then matching a shortlist's pairs as `shortlist_inliers` does (pairs on
match_threads() threads, BLAS at one thread each, mutual neighbours screened by column maxima) against the code
before it (one pair at a time, BLAS on every core, both argmaxes in full), interleaved, with the counts compared.

    python benchmarks/dense_matcher.py [--data DIR] [--photos 200] [--rounds 3] [--pairs 400] [--queries 20]

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


def one_pair_at_a_time(matcher, a, b) -> int:
    """The inlier count as the matcher computed it before shortlists were matched on threads: the baseline."""
    from geoindex.verification import DENSE_ESTIMATOR, DENSE_RANSAC_CELLS, _homography_inliers

    if a is None or b is None:
        return 0
    (points_a, desc_a), (points_b, desc_b) = a, b
    similarity = desc_a.astype(np.float32) @ desc_b.astype(np.float32).T
    forward, backward = similarity.argmax(1), similarity.argmax(0)
    mutual = np.flatnonzero(backward[forward] == np.arange(len(forward)))
    return _homography_inliers(matcher.cv2, points_a[mutual], points_b[forward[mutual]], DENSE_RANSAC_CELLS,
                               DENSE_ESTIMATOR)


def shortlist_matching(matcher, sample: list, n_queries: int, rounds: int) -> dict:
    """Pairs a second of each way on the first n_queries photos, each listing every other photo of the sample
    (their features computed first and held: only the matching is timed)."""
    from geoindex.verification import match_threads

    n_queries = min(n_queries, len(sample) - 1)
    if n_queries < 1:
        return {}
    matcher.cache_photos = max(matcher.cache_photos, len(sample))
    found = matcher.features_many(sample)
    shortlists = np.array([[j for j in range(len(sample)) if j != i] for i in range(n_queries)])
    seconds, counts = {"one pair at a time": [], "shortlist_inliers": []}, {}
    for r in range(rounds):
        for name in (list(seconds) if r % 2 == 0 else list(seconds)[::-1]):
            started = time.perf_counter()
            if name == "shortlist_inliers":
                counts[name] = matcher.shortlist_inliers(sample[:n_queries], shortlists, sample)
            else:
                counts[name] = np.array([[one_pair_at_a_time(matcher, found[i], found[j]) for j in row]
                                         for i, row in enumerate(shortlists)])
            seconds[name].append(time.perf_counter() - started)
    rate = {name: shortlists.size / float(np.median(s)) for name, s in seconds.items()}
    same = float((counts["shortlist_inliers"] == counts["one pair at a time"]).mean())
    print(f"matching {shortlists.size} listed pairs, median of {rounds} rounds: one pair at a time "
          f"{rate['one pair at a time']:.0f} pairs/s, shortlist_inliers on {match_threads()} threads "
          f"{rate['shortlist_inliers']:.0f} pairs/s ({rate['shortlist_inliers'] / rate['one pair at a time']:.2f}x); "
          f"identical counts for {same:.1%}")
    return {"pairs": int(shortlists.size), "threads": match_threads(), "pairs_a_second": rate,
            "rounds_seconds": seconds, "speedup": rate["shortlist_inliers"] / rate["one pair at a time"],
            "identical": same}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=20, help="photos of the sample whose shortlist is every other")
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
    shortlists = shortlist_matching(matchers["compiled"], sample, args.queries, args.rounds)
    save("dense_matcher", {"data": args.data.name, "photos": len(sample), "rounds": args.rounds,
                           "compiled_runtime": runtime, "seconds_a_photo": per_photo, "rounds_seconds": seconds,
                           "speedup": ratio, "agreement": agreement, "shortlist_matching": shortlists,
                           "matcher": DenseMatcher.name,
                           "command": "python benchmarks/dense_matcher.py " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
