"""Street level: what each lever of the revisit protocol's GPS answer gives, on an index's stored embeddings.

    python benchmarks/place.py --index NAME [--index-dir DIR]

kNN as tuned on val (`geoindex train`), else tuned here on val the same way. Rows (see geoindex/revisit.py for
the protocol; nothing is embedded again):
* `own split`: each split's revisit queries among that split's own photos, raw cosine (what `train --places`
  stops on, for val);
* `issue rule`: raw cosine; queries over the whole index, the gallery every photo that is not a query (the rule
  that gave issue 22's 22.6%), as a check that the numbers here are the issue's;
* per space the street cluster is searched in (raw cosine, kNN's city space, the street space val chose, and a
  place-aware learned whitening fit on train revisit pairs, not in geoindex itself: see learned_whitening), on the
  revisit queries of val and test under the bench rule: recall@1/5/10 within 25 m (and @50/100: what re-ranking
  the neighbours could at best reach), the share of GPS answers within 25 m for the city-level mean (the old
  answer), the best cluster always, and the answer with that space's own support threshold calibrated on val as
  `calibrate_street` does (with its street share and precision), its city-level point the mean always or, as
  `query` answers, the cluster's spot above the spot threshold val chose for that space (within 25 m and 25 km);
* `query` itself on the val and test photos (it searches the train photos, which with a split by place or map
  cell never hold their spot): how many street-level answers it makes there, how many are right, the worst.
Saves JSON in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoindex.geo_index import load_index  # noqa: E402
from geoindex.jsonio import dumps  # noqa: E402
from geoindex.methods import KNNMethod, Photos  # noqa: E402
from geoindex.revisit import (RECALL_AT, SPOT_M, STREET_K, RevisitSet, city_answers, gps_answers,  # noqa: E402
                              revisit_queries, space_calibration, spot_calibration, street_answers, val_winners)
from geoindex.voting import haversine_km  # noqa: E402


def learned_whitening(index, regulariser: float = 0.3):
    """Whitening learnt from matching pairs (Radenović, Tolias & Chum 2018, "Lw"): pairs of train photos within
    25 m of each other taken on different dates; their differences are whitened (with a ridge of `regulariser`
    times the mean variance), then all train photos are rotated onto their principal axes in that space. A place-aware
    projection that costs two eigendecompositions and no backbone training."""
    from sklearn.neighbors import BallTree

    from geoindex.whitening import Whitening
    from geoindex.voting import EARTH_RADIUS_KM

    meta, x = index.store.metadata("train"), index.store.embeddings("train")
    usable = np.flatnonzero((meta["yyyymm"].to_numpy() >= 0) & np.isfinite(meta["lat"].to_numpy(dtype=float)))
    points = np.radians(meta[["lat", "lon"]].to_numpy(dtype=float)[usable])
    dates = meta["yyyymm"].to_numpy()[usable]
    near = BallTree(points, metric="haversine").query_radius(points, SPOT_M / 1000 / EARTH_RADIUS_KM)
    pairs = np.array([(usable[i], usable[j]) for i, found in enumerate(near) for j in found
                      if j > i and dates[j] != dates[i]])
    if len(pairs) < 10:
        return None, 0
    diffs = (x[pairs[:, 0]] - x[pairs[:, 1]]).astype(np.float64)
    within_pairs = diffs.T @ diffs / len(diffs)
    within_pairs += regulariser * np.trace(within_pairs) / len(within_pairs) * np.eye(len(within_pairs))
    values, vectors = np.linalg.eigh(within_pairs)
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    mean = x.mean(axis=0)
    spread = (x - mean).astype(np.float64) @ inverse_root
    values, vectors = np.linalg.eigh(spread.T @ spread / len(spread))
    axes = (vectors[:, np.argsort(values)[::-1]].T @ inverse_root).astype(np.float32)
    return Whitening(mean.astype(np.float32), axes, np.ones(len(axes), np.float32), len(axes), 1.0), len(pairs)


DEEP_RECALL_AT = (50, 100)  # how often the spot is among many neighbours: what any re-ranking could reach


def within(pred, lat, lon, metres=SPOT_M):
    return np.nan_to_num(haversine_km(lat, lon, pred[:, 0], pred[:, 1]) * 1000, nan=np.inf) <= metres


def issue_rule(data: RevisitSet) -> dict:
    query = revisit_queries(data.lat, data.lon, data.dates)
    q, g = np.flatnonzero(query), np.flatnonzero(~query)
    vectors = data.vectors(None)
    scores = vectors[q] @ vectors[g].T
    top = np.argsort(-scores, axis=1)[:, :5]
    metres = haversine_km(data.lat[q, None], data.lon[q, None], data.lat[g][top], data.lon[g][top]) * 1000
    first = metres[:, 0]
    return {"queries": int(len(q)), "gallery": int(len(g)), "r@1_25m": float((first <= 25).mean()),
            "r@1_100m": float((first <= 100).mean()), "r@5_25m": float((metres <= 25).any(axis=1).mean()),
            "median_top1_km": float(np.median(first) / 1000)}


def own_split(index) -> dict:
    """Recall@1/5/10 within 25 m of each split's revisit queries among that split's own photos (raw cosine, the
    protocol's exclusions): what `train --places` stops on for val, and the same measure on test."""
    from geoindex.revisit import masked_top_k, recall_within

    out = {}
    for split in ("val", "test"):
        meta, vectors = index.store.metadata(split), index.store.embeddings(split).astype(np.float32)
        lat, lon, dates = meta["lat"].to_numpy(float), meta["lon"].to_numpy(float), meta["yyyymm"].to_numpy()
        rows = np.flatnonzero(revisit_queries(lat, lon, dates))
        _, ids = masked_top_k(vectors[rows], vectors, rows, dates[rows], dates, max(RECALL_AT))
        out[split] = {"n": int(len(rows)), **recall_within(ids, lat, lon, rows)}
    return out


def val_thresholds(index, knn, space):
    """The street-level and spot thresholds calibrate_street would set for this space (see its docstring)."""
    data = RevisitSet(index, splits=("train", "val"))
    rows = data.rows_of("val")
    city, winners = val_winners(data, rows, knn)
    threshold, _, support, street_m, _ = space_calibration(data, rows, winners, space)
    city_m = haversine_km(np.tile(data.lat[rows], 2), np.tile(data.lon[rows], 2), city[:, 0], city[:, 1]) * 1000
    return threshold, spot_calibration(support, threshold, street_m, city_m)[0]


def protocol(data: RevisitSet, knn, space, threshold, spot_threshold, split: str) -> dict:
    rows = np.flatnonzero(revisit_queries(data.lat, data.lon, data.dates) & (data.table["split"].to_numpy() == split))
    lat, lon = data.lat[rows], data.lon[rows]
    sims, ids = data.neighbours(rows, max(*RECALL_AT, *DEEP_RECALL_AT, STREET_K), space)
    metres = haversine_km(lat[:, None], lon[:, None], data.lat[np.clip(ids, 0, None)], data.lon[np.clip(ids, 0, None)])
    hit = (ids >= 0) & (metres * 1000 <= SPOT_M)
    city, winners = city_answers(knn, *data.neighbours(rows, knn.k, knn.whitening), data.lat, data.lon, data.labels,
                                 with_winners=True)
    street = street_answers(sims, ids, data.lat, data.lon, threshold, data.labels, winners)
    final, spot_answer = gps_answers(city, street), gps_answers(city, street, spot_threshold)
    at = street["street"]
    return {"n": int(len(rows)), **{f"r@{n}": float(hit[:, :n].any(1).mean()) for n in RECALL_AT + DEEP_RECALL_AT},
            "city_25m": float(within(city, lat, lon).mean()), "cluster_25m": float(within(street["centre"], lat, lon).mean()),
            "answer_25m": float(within(final, lat, lon).mean()),
            "answer_spot_25m": float(within(spot_answer, lat, lon).mean()),
            "answer_spot_25km": float(within(spot_answer, lat, lon, 25_000).mean()),
            "answer_25km": float(within(final, lat, lon, 25_000).mean()),
            "street_share": float(at.mean()),
            "street_precision": float(within(final[at], lat[at], lon[at]).mean()) if at.any() else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True)
    parser.add_argument("--index-dir", default=None)
    parser.add_argument("--out", default=os.environ.get("GEOINDEX_BENCH_RESULTS", Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="", help="appended to the results file's name (place_<index><tag>.json)")
    args = parser.parse_args(argv)

    index = load_index(args.index, args.index_dir, device="cpu")
    knn = index.knn_method()
    if knn.tuned_on is None:
        print("kNN not tuned yet: tuning it on val (as `geoindex train` does) ...", flush=True)
        knn = KNNMethod(index)
        knn.fit(Photos.of_split(index, "val"))
    results = {"index": index.name, "backbone": index.manifest["backbone"],
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "knn": knn.params}
    data = RevisitSet(index)
    results["issue_rule_raw"] = issue_rule(data)
    print("issue rule (raw cosine):", dumps(results["issue_rule_raw"], indent=None))
    results["own_split_raw"] = own_split(index)
    print("within each split's own photos (raw cosine):", dumps(results["own_split_raw"], indent=None))
    learned, n_pairs = learned_whitening(index)
    results["learned_whitening_pairs"] = n_pairs
    spaces = (("raw cosine", None), ("kNN city space", knn.whitening), ("street space (val's choice)", knn.street_whitening),
              ("learned whitening (train revisit pairs)", learned))
    for name, space in spaces:
        if name.startswith("learned") and space is None:
            continue  # too few revisit pairs among the train photos to learn from
        threshold, spot_threshold = val_thresholds(index, knn, space)
        results[name] = {"val_threshold": threshold, "val_spot_threshold": spot_threshold,
                         **{split: protocol(data, knn, space, threshold, spot_threshold, split) for split in ("val", "test")}}
        for split in ("val", "test"):
            row = results[name][split]
            print(f"{name:>28} {split:>4}: n={row['n']} r@1/5/10/50/100 {row['r@1']:.3f} {row['r@5']:.3f} "
                  f"{row['r@10']:.3f} {row['r@50']:.3f} {row['r@100']:.3f} | within 25 m: city mean "
                  f"{row['city_25m']:.3f}, cluster always {row['cluster_25m']:.3f}, answer {row['answer_25m']:.3f} "
                  f"(25 km {row['answer_25km']:.3f}), with the spot threshold {row['answer_spot_25m']:.3f} "
                  f"(25 km {row['answer_spot_25km']:.3f}) "
                  f"(street {row['street_share']:.3f}, precision "
                  f"{'-' if row['street_precision'] is None else format(row['street_precision'], '.3f')})", flush=True)
    meta = index.train_meta
    for split in ("val", "test"):
        photos = Photos.of_split(index, split)
        answer = knn.predict(photos)
        street = answer.extra["gps_level"] == "street"
        metres = haversine_km(photos.coords[:, 0], photos.coords[:, 1], answer.coords[:, 0], answer.coords[:, 1]) * 1000
        results[f"query_{split}"] = {"n": len(photos), "street": int(street.sum()),
                                     "street_within_25m": int((metres[street] <= SPOT_M).sum()),
                                     "worst_street_m": float(metres[street].max()) if street.any() else None,
                                     "train_photos": int(len(meta))}
        print(f"query on {split} photos (vs the train photos): {dumps(results[f'query_{split}'], indent=None)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["command"] = "python benchmarks/place.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"place_{index.name}{args.tag}.json").write_text(dumps(results) + "\n")
    index.close()


if __name__ == "__main__":
    main()
