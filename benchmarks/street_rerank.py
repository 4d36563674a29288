"""Street level after the search: can re-ranking the street space's shortlist find the spot more often?

    python benchmarks/street_rerank.py --index NAME [--splits val,test] [--shortlist 100]
    python benchmarks/street_rerank.py --index NAME --shortlist 300    # also re-scoring deeper than train tries

The setting is issue 22's acceptance path (`street_heldout.py`): the revisit queries of a split (a photo that has
a capture of another date within 25 m and is the newest within 25 m of itself) against a gallery of every other
photo of the index, searched in the street space `geoindex train` chose on val (`street.space`). The gallery's
embeddings are the stored ones, which is what `geoindex build --features-from NAME` stores for the same photos.
Each row gives recall@1 and @10 within 25 m (the first neighbour's spot is what the street answer stands on):

* `street space`: the shortlist as `query` searches it, and its recall@100: what any re-ranker of that shortlist
  can at best reach;
* `spatial verification`: geoindex's `Verifier` (RootSIFT, Lowe's ratio test, a RANSAC homography), the
  shortlist's first K re-ordered by inlier count (the classic re-ranking of landmark and place retrieval); also how
  often a verified first neighbour (at least T inliers) is within 25 m, and the seconds a query costs; and how many
  queries any gallery photo within 25 m of them verifies at T inliers at all (`verifiable`): the share of revisits
  whose spot a local-feature matcher can see, whatever the shortlist. Needs `pip install opencv-python-headless`;
  skipped, saying so, without it;
* `dense re-scoring`: geoindex's `DenseMatcher` (mutual nearest neighbours of EfficientNet-Lite0 feature maps, a
  homography), the first k of `revisit.RERANK_DEPTHS` re-scored at each of `revisit.RERANK_WEIGHTS` as `query`
  re-scores them (similarity + weight x inliers / 100); what `geoindex train` chose on val is the index's
  `street.rerank` (`k`, `weight`); with `--shortlist 200` or `300`, depths beyond what `train` tries
  (BEYOND_DEPTHS) too, and how often the best dense count among a query's spot photos (every gallery photo within
  25 m, wherever it ranks) beats the best of the shortlist's look-alikes (`spot_outscores_lookalikes`): the share
  of queries any re-ranking by this matcher's count can get right, however deep;
* `database-side augmentation` (DBA, each gallery vector summed with its n nearest gallery vectors, weighted by
  similarity to the power a) and `alpha query expansion` on top of it;
* `whitening fit on the gallery`: the street space's whitening learnt on the gallery's own photos instead of the
  train photos (an index of new places could refit it at build time).

Nothing is chosen here: every variant is printed for val and test side by side, so that val alone can pick.
Saves benchmarks/results/street_rerank_<NAME><TAG>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402

SHORTLISTS = (10, 25, 100)
BEYOND_DEPTHS = (200, 300)  # dense re-scoring depths printed beyond revisit.RERANK_DEPTHS where --shortlist holds them
RECALL_DEPTHS = (100, 200, 300)
INLIER_THRESHOLDS = (10, 15, 20)
DBA_SETTINGS = [(n, a) for n in (1, 2, 3) for a in (1.0, 3.0)]


def recall(ids, gallery_lat, gallery_lon, lat, lon) -> dict:
    from geoindex.revisit import SPOT_M
    from geoindex.voting import haversine_km

    hit = haversine_km(lat[:, None], lon[:, None], gallery_lat[ids], gallery_lon[ids]) * 1000 <= SPOT_M
    return {"r@1_25m": float(hit[:, 0].mean()), "r@10_25m": float(hit[:, :10].any(1).mean()),
            **{f"r@{k}_25m": float(hit[:, :k].any(1).mean()) for k in RECALL_DEPTHS if ids.shape[1] >= k},
            "hits": hit}


def ranked(queries, gallery, k, chunk: int = 256):
    """Each query's k most similar gallery rows, best first; queries go in chunks, so memory is chunk x gallery
    whatever the number of queries (a 530k-photo gallery asked by itself included)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ gallery.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out[start:start + chunk] = np.take_along_axis(
            top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
    return out


def spot_photos(gallery, g_lat, g_lon, lat, lon):
    """Each query's spot photos: the gallery rows (numbers into the index) within 25 m of it, -1 padded."""
    from sklearn.neighbors import BallTree

    from geoindex.revisit import SPOT_M
    from geoindex.voting import EARTH_RADIUS_KM

    near = BallTree(np.radians(np.column_stack([g_lat, g_lon]).astype(np.float64)), metric="haversine") \
        .query_radius(np.radians(np.column_stack([lat, lon]).astype(np.float64)), SPOT_M / 1000 / EARTH_RADIUS_KM)
    spot = np.full((len(lat), max(1, max((len(found) for found in near), default=0))), -1)
    for i, found in enumerate(near):
        spot[i, :len(found)] = gallery[np.sort(found)]
    return spot


def similarities(queries, gallery, ids):
    """Each query's similarity to its gallery rows `ids` (Q, K), without a queries x gallery matrix."""
    return np.einsum("qd,qkd->qk", queries, gallery[ids])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True)
    parser.add_argument("--index-dir", default=None)
    parser.add_argument("--splits", default="val,test")
    parser.add_argument("--tag", default="", help="appended to the results file's name")
    parser.add_argument("--shortlist", type=int, default=max(SHORTLISTS), help="neighbours verified at most")
    args = parser.parse_args(argv)

    from geoindex.geo_index import load_index
    from geoindex.locate import resolve_index_path
    from geoindex.revisit import RevisitSet, revisit_queries
    from geoindex.whitening import Whitening

    index = load_index(resolve_index_path(args.index, args.index_dir), device="cpu")
    knn = index.knn_method()
    space = knn.settings.street_whitening
    if not (knn.settings.street or {}).get("space") or space is None:
        sys.exit(f"index {index.name!r} has no whitened street space; run `geoindex train --index {index.name}` first")
    data = RevisitSet(index)
    is_query = revisit_queries(data.lat, data.lon, data.dates)
    split_of = data.table["split"].to_numpy()
    paths = data.table["path"].to_numpy()
    from geoindex.revisit import RERANK_DEPTHS, RERANK_WEIGHTS, rerank_street
    from geoindex.verification import dense_unavailable, shared_dense_matcher, shared_verifier

    verifier, dense = shared_verifier(), shared_dense_matcher()
    if verifier is None:
        print("spatial verification skipped: OpenCV is not installed (pip install opencv-python-headless)")
    if dense is None:
        print(f"dense re-scoring skipped: {dense_unavailable()}")

    out = {}
    for split in args.splits.split(","):
        rows = np.flatnonzero(is_query & (split_of == split))
        gallery = np.flatnonzero(~(is_query & (split_of == split)))  # as street_heldout.py --gallery all
        lat, lon = data.lat[rows], data.lon[rows]
        g_lat, g_lon = data.lat[gallery], data.lon[gallery]
        queries, photos = space(data.embeddings[rows]), space(data.embeddings[gallery])
        shortlist = ranked(queries, photos, min(args.shortlist, len(gallery)))
        base = recall(shortlist, g_lat, g_lon, lat, lon)
        hits = base.pop("hits")
        result = {"queries": int(len(rows)), "gallery_photos": int(len(gallery)), "street_space": base}
        print(f"{split}: {len(rows)} queries, {len(gallery)} gallery photos; street space r@1 {base['r@1_25m']:.3f} "
              f"r@10 {base['r@10_25m']:.3f}" + "".join(f" r@{k} {base[f'r@{k}_25m']:.3f}" for k in RECALL_DEPTHS
                                                        if f"r@{k}_25m" in base))

        rows_at = np.arange(len(rows))
        spot = spot_photos(gallery, g_lat, g_lon, lat, lon)
        if verifier is not None:
            verified = shortlist[:, :max(SHORTLISTS)]
            started = time.perf_counter()
            inliers = verifier.shortlist_inliers(list(paths[rows]), gallery[verified], paths)
            seconds = (time.perf_counter() - started) / max(len(rows), 1)
            seeable = verifier.shortlist_inliers(list(paths[rows]), spot, paths).max(1)
            verification = {"seconds_per_query": seconds, "shortlists": {},
                            "verifiable": {t: float((seeable >= t).mean()) for t in INLIER_THRESHOLDS}}
            print("  verifiable: a gallery photo within 25 m holds " + ", ".join(
                f">= {t} inliers for {(seeable >= t).mean():.2f}" for t in INLIER_THRESHOLDS) + " of queries")
            for k in SHORTLISTS:
                if k > verified.shape[1]:
                    continue
                # ties keep the search's order: a later neighbour needs more inliers, not as many
                best = np.argmax(inliers[:, :k] - 1e-3 * np.arange(k), axis=1)
                right, count = hits[rows_at, best], inliers[rows_at, best]
                verification["shortlists"][k] = {
                    "r@1_25m": float(right.mean()),
                    "verified": {t: {"share": float((count >= t).mean()),
                                     "within_25m": float(right[count >= t].mean()) if (count >= t).any() else None}
                                 for t in INLIER_THRESHOLDS}}
                print(f"  verified, first {k:3d}: r@1 {right.mean():.3f}; " + ", ".join(
                    f">= {t} inliers {(count >= t).mean():.2f} of queries, {right[count >= t].mean():.2f} right"
                    if (count >= t).any() else f">= {t} inliers none" for t in INLIER_THRESHOLDS))
            print(f"  verification: {seconds:.2f} s a query ({verified.shape[1]} pairs)")
            result["spatial_verification"] = verification

        if dense is not None:
            depths = [d for d in RERANK_DEPTHS + BEYOND_DEPTHS if d <= shortlist.shape[1]] or [shortlist.shape[1]]
            head = shortlist  # --shortlist is how deep dense matching goes (100 by default: train's deepest)
            started = time.perf_counter()
            found = dense.shortlist_inliers(list(paths[rows]), gallery[head], paths)
            seconds = (time.perf_counter() - started) / max(len(rows), 1)
            similarity = similarities(queries, photos, head)
            rescoring = {"seconds_per_query": seconds, "pairs_per_query": int(head.shape[1]), "depths": {}}
            for depth in depths:
                rescoring["depths"][depth] = {}
                for weight in RERANK_WEIGHTS:
                    _, order = rerank_street(similarity[:, :depth], head[:, :depth], found[:, :depth], weight)
                    scored = recall(order, g_lat, g_lon, lat, lon)
                    scored.pop("hits")
                    rescoring["depths"][depth][f"{weight:g}"] = scored
                print(f"  dense re-scoring of the first {depth:3d}, weights " + ", ".join(
                    f"{w}: r@1 {v['r@1_25m']:.3f}" for w, v in rescoring["depths"][depth].items()))
            spot_best = np.where(spot >= 0, dense.shortlist_inliers(list(paths[rows]), spot, paths), -1).max(1)
            lookalike_best = np.where(hits[:, :head.shape[1]], -1, found).max(1)
            rescoring["spot_outscores_lookalikes"] = float((spot_best > lookalike_best).mean())
            print(f"  the best dense count among the spot's photos beats the first {head.shape[1]}'s look-alikes for "
                  f"{rescoring['spot_outscores_lookalikes']:.3f} of queries (any re-ranking by this count at best)")
            print(f"  dense matching: {seconds:.2f} s a query ({head.shape[1]} pairs, candidates computed once "
                  f"a chunk of queries)")
            result["dense_rescoring"] = rescoring

        order = ranked(photos, photos, max(n for n, _ in DBA_SETTINGS) + 1)  # itself first
        similarity = similarities(photos, photos, order)
        result["dba"] = {}
        for n, power in DBA_SETTINGS:
            weights = similarity[:, :n + 1].clip(0) ** power
            augmented = (photos[order[:, :n + 1]] * weights[..., None]).sum(1)
            augmented /= np.linalg.norm(augmented, axis=1, keepdims=True)
            first = ranked(queries, augmented, n)
            q_weights = similarities(queries, augmented, first).clip(0) ** power
            expanded = queries + (augmented[first] * q_weights[..., None]).sum(1)
            expanded /= np.linalg.norm(expanded, axis=1, keepdims=True)
            dba = recall(ranked(queries, augmented, 10), g_lat, g_lon, lat, lon)
            both = recall(ranked(expanded, augmented, 10), g_lat, g_lon, lat, lon)
            dba.pop("hits"), both.pop("hits")
            result["dba"][f"n={n},a={power:g}"] = {"dba": dba, "dba_and_query_expansion": both}
            print(f"  DBA n={n} a={power:g}: r@1 {dba['r@1_25m']:.3f} r@10 {dba['r@10_25m']:.3f}; with alpha-QE "
                  f"r@1 {both['r@1_25m']:.3f} r@10 {both['r@10_25m']:.3f}")

        refit = Whitening.fit(data.embeddings[gallery], max_dims=space.dims).using(space.dims, space.power)
        own = recall(ranked(refit(data.embeddings[rows]), refit(data.embeddings[gallery]), 10),
                     g_lat, g_lon, lat, lon)
        own.pop("hits")
        result["whitening_fit_on_gallery"] = own
        print(f"  whitening fit on the gallery ({space.dims} dims, power {space.power:g}): r@1 {own['r@1_25m']:.3f} "
              f"r@10 {own['r@10_25m']:.3f}")
        out[split] = result

    import geoindex.verification as verification_settings

    save(f"street_rerank_{index.name}{args.tag}", {
        "index": index.name, "street_space": {"dims": space.dims, "power": space.power},
        "settings": {"ratio": verification_settings.RATIO, "ransac_px": verification_settings.RANSAC_PX,
                     "sift_features": verification_settings.SIFT_FEATURES,
                     "dense": verification_settings.DenseMatcher.name,
                     "chosen_weight": ((knn.settings.street or {}).get("rerank") or {}).get("weight"),
                     "chosen_k": ((knn.settings.street or {}).get("rerank") or {}).get("k")},
        "splits": out,
        "command": "python benchmarks/street_rerank.py " + " ".join(argv or sys.argv[1:])})
    index.close()


if __name__ == "__main__":
    main()
