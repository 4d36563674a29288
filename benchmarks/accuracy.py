"""Accuracy levers on held-out places: backbone, kNN voting, probe, logistic regression, test-time flip, fusion.

    PYTHONPATH=$PWD python benchmarks/accuracy.py --data ../shared/data/real/london-or-london \
        --cache EMB_CACHE [--backbones effnet,effnet-lite1,effnet-lite2] [--flip effnet] [--cell-km 1,5]

Every photo is embedded once per backbone with geoindex's own pipeline and cached (benchmarks/embed_cache.py;
computed when the cache is absent). The split is geoindex's cell split (prepare_records, seed 0): no
cell_km x cell_km cell has photos in two splits. Every hyperparameter (k, vote weighting, temperature,
C, fusion weights) is chosen on val only -- best val accuracy, ties broken by lower val log-loss -- and
the test split is scored once with the chosen values, by geoindex.metrics.evaluate. Prints one table
(one row per lever) and saves benchmarks/results/accuracy.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, save  # noqa: E402
from embed_cache import cache_path, dataset_paths, embed_plain, embed_with_mirror, ensure_cached  # noqa: E402

from geoindex.data import prepare_records, scan_dataset  # noqa: E402
from geoindex.heads import fit_probe  # noqa: E402
from geoindex.metrics import evaluate  # noqa: E402
from geoindex.voting import estimate_locations, gps_estimate, vote  # noqa: E402

KS = (1, 3, 5, 10, 15, 20, 30, 50, 100)
VOTES = (("majority", None), ("weighted", None)) + tuple(("softmax", t) for t in (0.01, 0.02, 0.03, 0.05, 0.1, 0.2))
CS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
WHITEN_DIMS = (64, 128, 256, 512)
WHITEN_POWERS = (0.0, 0.5, 1.0)
PRODUCT_KNN = {"k": 20, "vote": "softmax", "temperature": 0.05}
SHORT = {"effnet": "lite0", "effnet-lite1": "lite1", "effnet-lite2": "lite2"}


# ---------------------------------------------------------------------------- data
@dataclass
class Split:
    rows: np.ndarray      # positions in the dataset's record order (= cache order)
    y: np.ndarray
    coords: np.ndarray    # (n, 2) lat, lon


@dataclass
class Task:
    classes: list[str]
    train: Split
    val: Split
    test: Split
    info: dict
    centres: np.ndarray = field(default=None)  # (C, 2) spherical mean of each city's train photos

    def __post_init__(self):
        self.centres = np.array([gps_estimate(*self.train.coords[self.train.y == c].T) for c in range(len(self.classes))])


def make_task(dataset, split_by: str, cell_km: float, seed: int = 0) -> Task:
    records = dataset.records
    position = {p: i for i, p in enumerate(records["path"].astype(str))}
    prepared, info = prepare_records(dataset, seed=seed, split_by=split_by, cell_km=cell_km)
    classes = sorted(prepared["city"].unique())
    label = {c: i for i, c in enumerate(classes)}

    def part(name):
        rows = prepared[prepared["split"] == name]
        return Split(np.array([position[p] for p in rows["path"].astype(str)]),
                     rows["city"].map(label).to_numpy(), rows[["lat", "lon"]].to_numpy(dtype=np.float64))

    return Task(classes, part("train"), part("val"), part("test"), info.to_dict())


def load_view(cache: Path, spec: str, n: int) -> np.ndarray:
    """'effnet', 'effnet+flip' (mean of a photo and its mirror), 'a|b' (two backbones concatenated)."""
    if "|" in spec:
        parts = [load_view(cache, s, n) for s in spec.split("|")]
        return np.concatenate(parts, axis=1) / math.sqrt(len(parts))
    name, _, flip = spec.partition("+")
    x = np.load(cache_path(cache, name))["embeddings"]
    if flip:
        x = x + np.load(cache_path(cache, name, True))["embeddings"]
    assert len(x) == n
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def view_label(spec: str, separate: bool = False) -> str:
    def one(s):
        name, _, flip = s.partition("+")
        return SHORT.get(name, name) + (" + flip" if flip else "")
    names = [one(s) for s in spec.split("|")]
    if len(names) == 1:
        return names[0]
    return " and ".join(names) + (" (two indexes)" if separate else " (concatenated)")


# ---------------------------------------------------------------------------- methods
def log_loss(probs, y) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-9, 1)).mean())


def val_key(probs, y):
    return (float((probs.argmax(1) == y).mean()), -log_loss(probs, y))


class Neighbours:
    """Exact cosine top-K of each query among the train photos (what a flat FAISS index returns)."""

    def __init__(self, x, task: Task, split: Split, k_max: int = max(KS)):
        gallery, queries = x[task.train.rows], x[split.rows]
        sims = queries @ gallery.T
        top = np.argpartition(-sims, k_max - 1, axis=1)[:, :k_max]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
        self.ids = np.take_along_axis(top, order, 1)
        self.sims = np.take_along_axis(sims, self.ids, 1)
        self.labels = task.train.y[self.ids]
        self.lats, self.lons = task.train.coords[self.ids, 0], task.train.coords[self.ids, 1]

    def probs(self, n_classes, k, method, temperature):
        return vote(self.labels[:, :k], self.sims[:, :k], n_classes, method, temperature or 0.05)

    def locate(self, winners, k, method, temperature, centres):
        coords = estimate_locations(self.labels[:, :k], self.sims[:, :k], self.lats[:, :k], self.lons[:, :k],
                                    winners, method, temperature or 0.05)
        missing = ~np.isfinite(coords).all(axis=1)  # no neighbour of the winning city: its centre
        coords[missing] = centres[winners[missing]]
        return coords


def tune_knn(nb_val: Neighbours, y_val, n_classes):
    best, best_key = None, None
    for k, (method, t) in itertools.product(KS, VOTES):
        key = val_key(nb_val.probs(n_classes, k, method, t), y_val)
        if best_key is None or key > best_key:
            best, best_key = {"k": k, "vote": method, "temperature": t}, key
    return best, best_key[0]


def pca(x, task: Task):
    mean = x[task.train.rows].mean(0)
    _, singular, axes = np.linalg.svd(x[task.train.rows] - mean, full_matrices=False)
    return mean, singular, axes


def whiten(x, fitted, dims: int, power: float) -> np.ndarray:
    """Centre on the train mean, project on the top `dims` principal axes of train, divide each by
    its singular value ** power (0: plain PCA, 1: full whitening), L2-normalise again."""
    mean, singular, axes = fitted
    projected = ((x - mean) @ axes[:dims].T) / (singular[:dims] / singular[0]) ** power
    return (projected / np.linalg.norm(projected, axis=1, keepdims=True)).astype(np.float32)


def fit_logreg(x_train, y_train, c):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)


def fuse(parts, weights) -> np.ndarray:
    """Log-linear fusion, the same rule as geoindex.bench.Bench.fuse (the product's hybrid)."""
    logp = sum(w * np.log(np.clip(p, 1e-9, 1)) for w, p in zip(weights, parts))
    probs = np.exp(logp - logp.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def tune_fusion(parts_val, y_val, step=0.1):
    """Two-part fusion with the weight chosen on val (best accuracy, then log-loss)."""
    best, best_key = None, None
    for w in np.round(np.arange(0, 1 + 1e-9, step), 3):
        key = val_key(fuse(parts_val, [w, 1 - w]), y_val)
        if best_key is None or key > best_key:
            best, best_key = float(w), key
    return best, best_key[0]


# ---------------------------------------------------------------------------- scoring
def score(task, split, probs, coords) -> dict:
    m = evaluate(split.y, probs, task.classes, pred_coords=coords, true_coords=split.coords)
    return {k: m.get(k) for k in ("n", "accuracy", "macro_f1", "median_km", "within_25km")}


def centre_coords(task, probs):
    return task.centres[probs.argmax(1)]


def evaluate_view(task: Task, x: np.ndarray, log, with_probe=True) -> dict:
    """All single-view levers on one embedding view; returns {method: {...}} with val/test figures and choices."""
    n_classes = len(task.classes)
    nb = {s: Neighbours(x, task, getattr(task, s)) for s in ("val", "test")}
    out = {}

    def knn_row(cfg):
        k, method, t = cfg["k"], cfg["vote"], cfg["temperature"]
        val = nb["val"].probs(n_classes, k, method, t)
        test = nb["test"].probs(n_classes, k, method, t)
        coords = nb["test"].locate(test.argmax(1), k, method, t, task.centres)
        return val, test, coords

    val, test, coords = knn_row(PRODUCT_KNN)
    out["knn_default"] = {"chosen": dict(PRODUCT_KNN), "val_accuracy": float((val.argmax(1) == task.val.y).mean()),
                          "test": score(task, task.test, test, coords), "_val": val, "_test": test}
    cfg, _ = tune_knn(nb["val"], task.val.y, n_classes)
    val, test, coords = knn_row(cfg)
    out["knn"] = {"chosen": cfg, "val_accuracy": float((val.argmax(1) == task.val.y).mean()),
                  "test": score(task, task.test, test, coords), "_val": val, "_test": test, "_cfg": cfg,
                  "_nb_test": nb["test"]}
    log(f"    knn: default val {out['knn_default']['val_accuracy']:.3f} test {out['knn_default']['test']['accuracy']:.3f}; "
        f"tuned {cfg} val {out['knn']['val_accuracy']:.3f} test {out['knn']['test']['accuracy']:.3f}")

    # Centring + PCA whitening learnt on train (a classic retrieval fix: drops the directions every
    # street photo shares), with the dimension and whitening power chosen on val together with the vote.
    best, best_key, fitted = None, None, pca(x, task)
    for dims, power in itertools.product(WHITEN_DIMS, WHITEN_POWERS):
        xw = whiten(x, fitted, dims, power)
        nb_w = Neighbours(xw, task, task.val)
        cfg_w, _ = tune_knn(nb_w, task.val.y, n_classes)
        key = val_key(nb_w.probs(n_classes, cfg_w["k"], cfg_w["vote"], cfg_w["temperature"]), task.val.y)
        if best_key is None or key > best_key:
            best, best_key = {"dims": dims, "power": power, **cfg_w}, key
    xw = whiten(x, fitted, best["dims"], best["power"])
    nb_wv, nb_ws = Neighbours(xw, task, task.val), Neighbours(xw, task, task.test)
    args = (best["k"], best["vote"], best["temperature"])
    val, test = nb_wv.probs(n_classes, *args), nb_ws.probs(n_classes, *args)
    out["knn_whiten"] = {"chosen": best, "val_accuracy": float((val.argmax(1) == task.val.y).mean()),
                         "test": score(task, task.test, test, nb_ws.locate(test.argmax(1), *args, task.centres)),
                         "_val": val, "_test": test, "_cfg": {k: best[k] for k in ("k", "vote", "temperature")},
                         "_nb_test": nb_ws}
    log(f"    whitened knn {best}: val {out['knn_whiten']['val_accuracy']:.3f} test {out['knn_whiten']['test']['accuracy']:.3f}")

    xt, xv, xs = x[task.train.rows], x[task.val.rows], x[task.test.rows]
    classifiers = {}
    if with_probe:
        import torch
        with Timer() as t:
            head, history, best_epoch, _ = fit_probe(xt, task.train.y, xv, y_val=task.val.y, n_classes=n_classes)
        with torch.no_grad():
            pv, ps = (head(torch.as_tensor(a)).softmax(1).double().numpy() for a in (xv, xs))
        classifiers["probe"] = (pv, ps, {"epochs_run": len(history), "best_epoch": best_epoch,
                                         "stopped_by": "val loss" if len(history) < 30 else "epoch cap (30)",
                                         "train_seconds": round(t.seconds, 1)})
    best_c, best_key, fits, seconds = None, None, {}, {}
    for c in CS:
        with Timer() as t:
            model = fit_logreg(xt, task.train.y, c)
        fits[c], seconds[c] = model, t.seconds
        key = val_key(model.predict_proba(xv), task.val.y)
        if best_key is None or key > best_key:
            best_c, best_key = c, key
    model = fits[best_c]
    classifiers["logreg"] = (model.predict_proba(xv), model.predict_proba(xs),
                             {"C": best_c, "train_seconds": round(seconds[best_c], 1)})
    for name, (pv, ps, chosen) in classifiers.items():
        out[name] = {"chosen": chosen, "val_accuracy": float((pv.argmax(1) == task.val.y).mean()),
                     "test": score(task, task.test, ps, centre_coords(task, ps)), "_val": pv, "_test": ps}
        log(f"    {name}: {chosen} val {out[name]['val_accuracy']:.3f} test {out[name]['test']['accuracy']:.3f}")

    # Fusion of the kNN and the classifier that each did better on val.
    clf = max(classifiers, key=lambda n: val_key(out[n]["_val"], task.val.y))
    knn = max(("knn", "knn_whiten"), key=lambda n: val_key(out[n]["_val"], task.val.y))
    w, _ = tune_fusion([out[knn]["_val"], out[clf]["_val"]], task.val.y)
    fv = fuse([out[knn]["_val"], out[clf]["_val"]], [w, 1 - w])
    fs = fuse([out[knn]["_test"], out[clf]["_test"]], [w, 1 - w])
    cfg = out[knn]["_cfg"]
    coords = out[knn]["_nb_test"].locate(fs.argmax(1), cfg["k"], cfg["vote"], cfg["temperature"], task.centres)
    out["fusion"] = {"chosen": {"knn": knn, **out[knn]["chosen"], "classifier": clf, **out[clf]["chosen"],
                                "knn_weight": w},
                     "val_accuracy": float((fv.argmax(1) == task.val.y).mean()),
                     "test": score(task, task.test, fs, coords), "_val": fv, "_test": fs}
    log(f"    fusion {knn}+{clf} w_knn={w} val {out['fusion']['val_accuracy']:.3f} test {out['fusion']['test']['accuracy']:.3f}")
    return out


def fuse_two_knn(task, a: dict, b: dict, log) -> dict:
    """kNN votes of two backbones, log-linear with a weight chosen on val (GPS from the first backbone's neighbours)."""
    w, _ = tune_fusion([a["_val"], b["_val"]], task.val.y)
    fv = fuse([a["_val"], b["_val"]], [w, 1 - w])
    fs = fuse([a["_test"], b["_test"]], [w, 1 - w])
    cfg = a["_cfg"]
    coords = a["_nb_test"].locate(fs.argmax(1), cfg["k"], cfg["vote"], cfg["temperature"], task.centres)
    row = {"chosen": {"weight_first": w, "first": a["_cfg"], "second": b["_cfg"]},
           "val_accuracy": float((fv.argmax(1) == task.val.y).mean()), "test": score(task, task.test, fs, coords),
           "_val": fv, "_test": fs}
    log(f"    two-backbone kNN vote fusion w={w}: val {row['val_accuracy']:.3f} test {row['test']['accuracy']:.3f}")
    return row


# ---------------------------------------------------------------------------- costs
def measure_speed(paths, backbones, flips, n, log) -> dict:
    """Pipeline images/s per backbone (and with the mirror), on the same photos in this run."""
    from geoindex.backbones import create_backbone

    speed = {}
    sample = list(paths[:n])
    for name in backbones:
        backbone = create_backbone(name)
        embed_plain(backbone, sample[:16], batch_size=16, progress=False)  # warm-up
        _, _, seconds = embed_plain(backbone, sample, batch_size=32, progress=False)
        speed[name] = n / seconds
        if name in flips:
            *_, seconds = embed_with_mirror(backbone, sample, batch_size=32, progress=False)
            speed[name + "+flip"] = n / seconds
        log(f"  speed {name}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in speed.items() if k.startswith(name)))
    return speed


def measure_finetune(paths, backbone_name: str, n_train: int, batches: int = 2, batch_size: int = 32) -> dict:
    """Seconds per epoch of full fine-tuning on this CPU: timed train steps, scaled to the train split."""
    import torch
    from torch import nn

    from geoindex.backbones import create_backbone
    from geoindex.heads import FineTuneModel
    from geoindex.images import load_image

    backbone = create_backbone(backbone_name)
    model = FineTuneModel(backbone.model, backbone.embed_dim, 2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.stack([backbone.transform(load_image(p, draft_size=backbone.transform.resize_size))
                          for p in paths[:batch_size]])
    labels = torch.randint(0, 2, (batch_size,))

    def step():
        loss = nn.functional.cross_entropy(model(backbone.normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    with Timer() as t:
        for _ in range(batches):
            step()
    per_batch = t.seconds / batches
    return {"backbone": backbone_name, "batch_size": batch_size, "seconds_per_batch": per_batch,
            "train_photos": n_train, "seconds_per_epoch": per_batch * math.ceil(n_train / batch_size),
            "note": "forward+backward+Adam step on decoded photos (decoding not counted), torch threads "
                    f"{torch.get_num_threads()}"}


# ---------------------------------------------------------------------------- table
def cost(speed, spec) -> float | None:
    """images/s of embedding a query for a view (two backbones: both run, times add)."""
    try:
        return 1 / sum(1 / speed[s] for s in spec.split("|"))
    except KeyError:
        return None


METHOD_TEXT = {
    "knn_default": ("kNN (product defaults)", lambda c: f"none: k={c['k']}, softmax T={c['temperature']}"),
    "knn": ("kNN", lambda c: f"k={c['k']}, {c['vote']}" + (f" T={c['temperature']}" if c["temperature"] else "")),
    "knn_whiten": ("kNN, centred + PCA-whitened", lambda c: f"dims={c['dims']}, power={c['power']}, k={c['k']}, "
                   f"{c['vote']}" + (f" T={c['temperature']}" if c["temperature"] else "")),
    "probe": ("probe (geoindex fit_probe)", lambda c: f"epochs by val loss: best {c['best_epoch']} of {c['epochs_run']}"),
    "logreg": ("logistic regression (sklearn)", lambda c: f"C={c['C']}"),
    "fusion": ("kNN + classifier fusion (log-linear)", lambda c: f"{METHOD_TEXT[c['knn']][0]} and "
               f"{METHOD_TEXT[c['classifier']][0]} as above; w_kNN={c['knn_weight']}"),
    "knn_vote_fusion": ("kNN votes of two backbones", lambda c: f"weight of first={c['weight_first']}"),
}


def table_rows(results: dict, speed: dict) -> list[dict]:
    rows = []
    for spec, methods in results.items():
        for method, r in methods.items():
            name, text = METHOD_TEXT[method]
            rows.append({"backbone": view_label(spec, method == "knn_vote_fusion"), "view": spec, "method": name, "key": method,
                         "tuned_on_val": text(r["chosen"]), "val_accuracy": r["val_accuracy"], **r["test"],
                         "images_per_s": cost(speed, spec)})
    return rows


def markdown(rows) -> str:
    def f(v, p="{:.3f}"):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else p.format(v)
    lines = ["| backbone | method | tuned on val (chosen) | val acc | test acc | test macro-F1 | median km | within 25 km | img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['method']} | {r['tuned_on_val']} | {f(r['val_accuracy'])} | "
                     f"{f(r['accuracy'])} | {f(r['macro_f1'])} | {f(r['median_km'], '{:.1f}')} | "
                     f"{f(r['within_25km'])} | {f(r['images_per_s'], '{:.1f}')} |")
    return "\n".join(lines)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder or CSV (london-or-london)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "geoindex-accuracy"),
                        help="where per-backbone embeddings are cached (computed when absent)")
    parser.add_argument("--backbones", default="effnet,effnet-lite1,effnet-lite2")
    parser.add_argument("--flip", default="effnet", help="backbones also embedded mirrored (test-time flip)")
    parser.add_argument("--pairs", default="effnet|effnet-lite1,effnet|effnet-lite2",
                        help="two-backbone combinations, comma-separated 'a|b' (concatenation and vote fusion)")
    parser.add_argument("--cell-km", default="1,5", help="cell sizes to compare; the first gives the main table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-n", type=int, default=64, help="photos per backbone for the images/s figures (0: skip)")
    parser.add_argument("--finetune-batches", type=int, default=2, help="timed fine-tuning steps (0: skip)")
    parser.add_argument("--variance-seeds", default="0,1,2,3,4",
                        help="split seeds over which the best view's kNN/logreg/fusion are re-tuned and re-scored")
    parser.add_argument("--out", default="accuracy")
    args = parser.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731

    started = time.time()
    cache = Path(args.cache)
    dataset = scan_dataset(args.data)
    paths = dataset_paths(args.data)
    backbones = [b for b in args.backbones.split(",") if b]
    flips = [b for b in args.flip.split(",") if b]
    pairs = [p for p in args.pairs.split(",") if p]
    for name in backbones:
        ensure_cached(paths, name, cache, flip=name in flips)
    specs = backbones + [f"{b}+flip" for b in flips] + pairs

    cell_kms = [float(c) for c in args.cell_km.split(",")]
    tasks = {f"cell {c:g} km": make_task(dataset, "cell", c, args.seed) for c in cell_kms}
    tasks["image (leaky reference)"] = make_task(dataset, "image", 1.0, args.seed)
    main_name = f"cell {cell_kms[0]:g} km"

    views = {spec: load_view(cache, spec, len(paths)) for spec in specs}
    results, others = {}, {}
    for task_name, task in tasks.items():
        log(f"{task_name}: train {len(task.train.y)}, val {len(task.val.y)}, test {len(task.test.y)}")
        per_view = {}
        # Other splits: the first backbone and the main split's best view (by val accuracy of the fusion).
        chosen = specs if task_name == main_name else list(dict.fromkeys([specs[0], best_spec]))
        for spec in chosen:
            log(f"  {view_label(spec)}")
            per_view[spec] = evaluate_view(task, views[spec], log)
        for pair in pairs:
            a, b = pair.split("|")
            if task_name == main_name and a in per_view and b in per_view:
                better = lambda m: max((m["knn"], m["knn_whiten"]), key=lambda r: val_key(r["_val"], task.val.y))  # noqa: E731
                per_view.setdefault(pair, {})["knn_vote_fusion"] = fuse_two_knn(task, better(per_view[a]),
                                                                                better(per_view[b]), log)
        if task_name == main_name:
            results = per_view
            best_spec = max(specs, key=lambda s: (per_view[s]["fusion"]["val_accuracy"], -log_loss(
                per_view[s]["fusion"]["_val"], task.val.y)))
        else:
            others[task_name] = per_view

    # How much of a difference is the split itself: re-draw the cell split, re-tune on val, re-score test.
    seeds = [int(v) for v in args.variance_seeds.split(",") if v]
    spread_tasks = {seed: tasks[main_name] if seed == args.seed else make_task(dataset, "cell", cell_kms[0], seed)
                    for seed in seeds}
    variance = {}
    for spec in dict.fromkeys([specs[0], best_spec]) if seeds else []:
        spread = {}
        for seed, task in spread_tasks.items():
            log(f"seed {seed} ({main_name}): {view_label(spec)}")
            methods = results[spec] if seed == args.seed else evaluate_view(task, views[spec], log, with_probe=False)
            for method in ("knn", "knn_whiten", "logreg", "fusion"):
                spread.setdefault(method, []).append({"seed": seed, "val_accuracy": methods[method]["val_accuracy"],
                                                      "test_accuracy": methods[method]["test"]["accuracy"]})
        variance[spec] = {m: {"seeds": v, "test_mean": float(np.mean([r["test_accuracy"] for r in v])),
                              "test_sd": float(np.std([r["test_accuracy"] for r in v], ddof=1)) if len(v) > 1 else None,
                              "val_mean": float(np.mean([r["val_accuracy"] for r in v])),
                              "test_minus_val_mean": float(np.mean([r["test_accuracy"] - r["val_accuracy"] for r in v]))}
                          for m, v in spread.items()}
    for spec, per_method in variance.items():
        for m, v in per_method.items():
            print(f"{view_label(spec)} {m} over split seeds {[r['seed'] for r in v['seeds']]}: test {v['test_mean']:.3f} "
                  f"(sd {v['test_sd'] or 0:.3f}), val {v['val_mean']:.3f}, test - val {v['test_minus_val_mean']:+.3f}")

    speed = measure_speed(paths, backbones, flips, args.speed_n, log) if args.speed_n else {}
    finetune = (measure_finetune(paths, backbones[0], len(tasks[main_name].train.y), args.finetune_batches)
                if args.finetune_batches else None)
    rows = table_rows(results, speed)
    table = markdown(rows)
    comparison = []
    for task_name, per_view in [(main_name, results), *others.items()]:
        for spec, methods in per_view.items():
            for method in ("knn", "knn_whiten", "logreg", "fusion"):
                if method in methods:
                    comparison.append({"split": task_name, "backbone": view_label(spec), "method": method,
                                       "val_accuracy": methods[method]["val_accuracy"],
                                       "test_accuracy": methods[method]["test"]["accuracy"],
                                       "test_median_km": methods[method]["test"]["median_km"]})
    print("\n" + table + "\n")
    print("| split | backbone | method | val acc | test acc | val - test | test median km |\n|---|---|---|---|---|---|---|")
    for c in comparison:
        print(f"| {c['split']} | {c['backbone']} | {c['method']} | {c['val_accuracy']:.3f} | {c['test_accuracy']:.3f} | "
              f"{c['val_accuracy'] - c['test_accuracy']:+.3f} | {c['test_median_km']:.1f} |")
    if finetune:
        print(f"\nfine-tuning {finetune['backbone']} on this CPU: {finetune['seconds_per_batch']:.1f} s per batch of "
              f"{finetune['batch_size']} -> {finetune['seconds_per_epoch'] / 60:.0f} min per epoch of "
              f"{finetune['train_photos']} photos")
    payload = {"command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "data": str(args.data), "n_photos": len(paths), "splits": {k: t.info | {"n": [len(t.train.y), len(t.val.y), len(t.test.y)]}
                                                                          for k, t in tasks.items()},
               "selection": "best val accuracy, ties by lower val log-loss; test scored once",
               "speed_images_per_s": speed, "speed_note": f"pipeline on {args.speed_n} photos, batch 32, this run; "
               f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)",
               "finetune": finetune, "rows": rows, "best_view": best_spec,
               "seed_spread": {"split": main_name, "by_view": variance}, "val_test_by_split": comparison,
               "cache_seconds": {b: float(np.load(cache_path(cache, b))["seconds"]) for b in backbones},
               "wall_seconds": time.time() - started}
    save(args.out, json.loads(json.dumps(strip(payload), default=float)))


if __name__ == "__main__":
    main()
