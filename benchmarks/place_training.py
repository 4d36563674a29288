"""Place-aware training, lever by lever: what each setting of `geoindex train`'s tail does to street-level recall and
to the city, on one pretrained index's photos.

    python benchmarks/place_training.py --index NAME [--levers default,city-only,...] [--epochs 8]

The index must be as built (not adapted). Its photos' trunk features (train, val and test) are computed once and
cached (`--cache`, default in the user cache, keyed by the index's build id); every lever then trains the tail
with geoindex.adapt.TailTraining exactly as `geoindex train` does (same batches, loss, validation and kept epoch;
no checkpoint), and its embeddings of all three splits come from the tuned tail on the same features, which is
what re-embedding the index would store. Each row gives, in raw cosine:
* the revisit protocol (geoindex/revisit.py, the bench rule: queries of the split, gallery every dated photo of
  the index but the query's capture month): recall@1/5/10 within 25 m on val and test, and on test the share of
  best-street-cluster answers within 25 m (the GPS answer without its val threshold);
* city accuracy of a 10-neighbour majority vote over the train photos, on val and test (kNN as `geoindex train`
  tunes it does a little better; this compares levers);
* the kept epoch, epochs run, and CPU seconds per epoch and per training step.
Saves benchmarks/results/place_training<--tag>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402

# name -> (what it changes, settings over adapt.DEFAULTS; "places": False trains for the cities alone)
LEVERS = {
    "pretrained": ("no training: the ImageNet features", None),
    "city-only": ("the tail for the cities alone (the default before places)", {"places": False}),
    "default": ("cities + places: 16 places x 4 photos, place weight 1", {}),
    "weight-0.3": ("place weight 0.3", {"place_weight": 0.3}),
    "weight-3": ("place weight 3", {"place_weight": 3.0}),
    "32x2": ("32 places x 2 photos", {"places_per_batch": 32, "photos_per_place": 2}),
    "8x8": ("8 places x 8 photos", {"places_per_batch": 8, "photos_per_place": 8}),
    "lr-3e-4": ("backbone lr 3e-4 (head 3e-3)", {"lr": 3e-4}),
    # how much of the backbone trains: the default tail is the last TAIL_STAGES (2) stages and the feature head
    "tail-1": ("place weight 0.3, the last stage and the feature head only", {"place_weight": 0.3, "tail_stages": 1}),
    "tail-3": ("place weight 0.3, the last three stages and the feature head", {"place_weight": 0.3,
                                                                              "tail_stages": 3}),
}


def trunk_features(index, cache: Path, tail_stages: int):
    """{split: (N, F) float16} trunk features and {split: labels} (-1: unreadable), cached by build id and cut."""
    import torch

    from geoindex.adapt import _trunk_outputs
    from geoindex.backbones import TAIL_STAGES, create_backbone, tail_split
    from geoindex.config import ExtractionConfig

    backbone = create_backbone(index.manifest["backbone"], weights=index._weights_argument(),
                               image_size=index.manifest["image_size"], device="cpu")
    backbone.model.to(memory_format=torch.channels_last)  # as adapt does, for the same rounding
    split = tail_split(backbone, tail_stages)
    cut = "" if tail_stages == TAIL_STAGES else f"-tail{tail_stages}"  # the default cut keeps its older name
    path = cache / f"trunk-{index.manifest['build_id']}{cut}.npz"
    features, labels = {}, {}
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            features = {s: z[f"{s}_features"] for s in ("train", "val", "test")}
            labels = {s: z[f"{s}_labels"] for s in ("train", "val", "test")}
        print(f"trunk features read from {path}")
        return backbone, split, features, labels
    started = time.perf_counter()
    for s in ("train", "val", "test"):
        meta = index.store.metadata(s)
        features[s], ok = _trunk_outputs(backbone, split, meta["path"].tolist(), ExtractionConfig(), True,
                                         f"trunk features ({s})")
        labels[s] = np.where(ok, meta["label"].to_numpy(), -1).astype(np.int64)
    print(f"trunk features of {sum(len(v) for v in labels.values())} photos in {time.perf_counter() - started:.0f} s")
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{s}_features": a for s, a in features.items()}, **{f"{s}_labels": a for s, a in labels.items()})
    return backbone, split, features, labels


def scores(index, embeddings: dict, labels: dict) -> dict:
    """Revisit recall (val, test), test's best-cluster answers within 25 m, and 10-NN city accuracy (val, test)."""
    from geoindex.revisit import (STREET_K, masked_top_k, recall_within, revisit_queries, street_answers)
    from geoindex.voting import haversine_km

    splits = ("train", "val", "test")
    meta = [index.store.metadata(s) for s in splits]
    lat = np.concatenate([m["lat"].to_numpy(dtype=np.float64) for m in meta])
    lon = np.concatenate([m["lon"].to_numpy(dtype=np.float64) for m in meta])
    dates = np.concatenate([m["yyyymm"].to_numpy(dtype=np.int64) for m in meta])
    which = np.concatenate([[s] * len(m) for s, m in zip(splits, meta)])
    vectors = np.concatenate([embeddings[s] for s in splits]).astype(np.float32)
    queries = revisit_queries(lat, lon, dates)
    out = {}
    for s in ("val", "test"):
        rows = np.flatnonzero(queries & (which == s))
        sims, ids = masked_top_k(vectors[rows], vectors, rows, dates[rows], dates, 10)
        out[f"{s}_recall"] = recall_within(ids, lat, lon, rows)
        out[f"{s}_queries"] = int(len(rows))
        if s == "test":
            cluster = street_answers(sims[:, :STREET_K], ids[:, :STREET_K], lat, lon, None)["centre"]
            metres = haversine_km(lat[rows], lon[rows], cluster[:, 0], cluster[:, 1]) * 1000
            out["test_cluster_within_25m"] = float(np.mean(np.nan_to_num(metres, nan=np.inf) <= 25))
        top = np.argsort(-(embeddings[s] @ embeddings["train"].T), axis=1)[:, :10]
        votes = labels["train"][top]
        predicted = np.array([np.bincount(v[v >= 0], minlength=len(index.classes)).argmax() for v in votes])
        out[f"{s}_city_accuracy"] = float((predicted == labels[s]).mean())
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True)
    parser.add_argument("--index-dir", default=None)
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of: {', '.join(LEVERS)}")
    parser.add_argument("--epochs", type=int, default=None, help="[default: train's]")
    parser.add_argument("--cache", default=os.path.join(os.environ.get("GEOINDEX_CACHE") or
                                                        os.path.expanduser("~/.cache/geoindex"), "bench"))
    parser.add_argument("--tag", default="", help="appended to the results file's name")
    args = parser.parse_args(argv)

    import torch

    from geoindex.adapt import DEFAULTS, TailTraining, TrainPlaces
    from geoindex.geo_index import load_index
    from geoindex.locate import resolve_index_path

    index = load_index(resolve_index_path(args.index, args.index_dir), device="cpu")
    if index.manifest.get("adapted"):
        sys.exit(f"index {index.name!r} is adapted already; the levers start from a pretrained index (build one)")
    from geoindex.backbones import TAIL_STAGES

    cuts = {}  # tail stages -> (backbone, split, features, labels, its untrained state): computed once per cut

    def cut(stages):
        if stages not in cuts:
            cuts.clear()  # one cut's features in memory at a time
            backbone, split, features, labels = trunk_features(index, Path(args.cache), stages)
            cuts[stages] = (backbone, split, features, labels,
                            {k: v.clone() for k, v in backbone.model.state_dict().items()})
        return cuts[stages]

    meta = {s: index.store.metadata(s) for s in ("train", "val")}
    rows = {s: np.arange(len(meta[s])) for s in meta}
    results = []
    for name in args.levers.split(","):
        what, changes = LEVERS[name]
        stages = (changes or {}).get("tail_stages", TAIL_STAGES)
        backbone, split, features, labels, untrained = cut(stages)
        backbone.model.load_state_dict(untrained)
        row = {"lever": name, "what": what, "tail_stages": stages}
        if changes is None:
            embeddings = {s: _embed(split, features[s]) for s in features}
        else:
            settings = dict(DEFAULTS) | changes
            settings["head_lr"] = 10 * settings["lr"]
            if args.epochs:
                settings["epochs"] = args.epochs
            use_places = settings.pop("places", True)
            settings.pop("tail_stages", None)
            places = TrainPlaces(meta, rows, "cpu") if use_places else None
            training = TailTraining(backbone, split, len(index.classes), settings, places, seed=0, device="cpu")
            loop = training.loop(progress=False, log=print)
            steps = sum(1 for _ in training.batches(1, features["train"], labels["train"]))
            started, cpu = time.perf_counter(), time.process_time()
            result = training.fit(loop, {s: features[s] for s in ("train", "val")},
                                  {s: labels[s] for s in ("train", "val")})
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            embeddings = {s: training.embed(features[s]) for s in features}
            row |= {"settings": {k: v for k, v in settings.items() if k in changes or k == "epochs"},
                    "kept_epoch": result.best_epoch, "epochs_run": len(result.history),
                    "stopped_on": training.stop_on.label, "steps_per_epoch": steps,
                    "wall_s_per_epoch": wall / len(result.history), "cpu_s_per_step": cpu / (steps * len(result.history)),
                    "history": json.loads(result.history.to_json(orient="records"))}
        row |= scores(index, embeddings, labels)
        results.append(row)
        print(f"{name:12s} val r@1/5/10 {_r(row['val_recall'])}  test {_r(row['test_recall'])}  cluster "
              f"{row['test_cluster_within_25m']:.3f}  city val {row['val_city_accuracy']:.3f} test "
              f"{row['test_city_accuracy']:.3f}" + (f"  kept {row['kept_epoch']}/{row['epochs_run']}, "
                                                     f"{row['wall_s_per_epoch']:.0f} s/epoch" if changes is not None
                                                     else ""), flush=True)
        # After every lever: an interrupted run keeps what it measured
        save("place_training" + args.tag, {"index": index.name, "build_id": index.manifest["build_id"],
                                "torch_threads": torch.get_num_threads(), "levers": results,
                                "command": "python benchmarks/place_training.py " + " ".join(argv or sys.argv[1:])})


def _embed(split, features):
    import torch
    from torch import nn

    with torch.no_grad():
        return torch.cat([nn.functional.normalize(split.tail(torch.from_numpy(features[i:i + 256]).float()), dim=1)
                          for i in range(0, len(features), 256)]).numpy()


def _r(recall: dict) -> str:
    return " / ".join(f"{recall[f'r@{n}_25m']:.3f}" for n in (1, 5, 10))


if __name__ == "__main__":
    main()
