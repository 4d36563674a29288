"""`geoindex bench`: kNN vs classifier heads vs CLIP zero-shot vs their fusion, on the same photos,
every row from the same method objects `query` uses, every figure from `metrics.evaluate`.

Beside the city table, where the index's photos carry capture dates, the street-level revisit protocol
(`geoindex.revisit`): recall@1/5/10 within 25 m and kNN's GPS answer's error on the scored split's revisits.

Honesty rules: anything tuned (kNN's k and temperature, fusion weights) is tuned on the validation
split and says so; with no validation split the tuned methods are skipped with the reason. External
photos that are also in the index (same bytes, same place, or same map cell) are dropped, with counts.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .catalog import backbone_info
from .cities import full_name
from .errors import GeoindexError
from .data.records import SPLITS
from .fileio import atomic_path, write_json_atomic
from .jsonio import dumps
from .layout import BENCH_DIR, RESULTS_JSON, RESULTS_MD
from .methods import ClassifierMethod, HybridMethod, Photos, ZeroShotMethod, classifier_methods, registered_methods
from .metrics import evaluate
from .zeroshot import ENSEMBLE_TEMPLATES, SINGLE_TEMPLATE, read_templates

METHODS = tuple(registered_methods())  # ("knn", "classifier", "zeroshot", "hybrid")
# (row name, label format, templates): the seed study prompted with the bare label; the rest add a sentence.
ZERO_SHOT_VARIANTS = (("zeroshot:bare", "city", ("{place}",)), ("zeroshot:city_country", "city_country", (SINGLE_TEMPLATE,)),
                      ("zeroshot:city", "city", (SINGLE_TEMPLATE,)), ("zeroshot:country", "country", (SINGLE_TEMPLATE,)))


def _indexed_digests(index, meta) -> dict[int, set[str]]:
    """{file size: content digests} of the indexed photos: from the keys the build stored, else read from disk."""
    from .images import content_digest

    by_size: dict[int, set[str]] = {}
    keys = [index.store.photo_keys(s) for s in SPLITS]
    if all(k is not None for k in keys):
        for table in keys:
            for size, digest in zip(table["size"], table["digest"]):
                if digest:
                    by_size.setdefault(int(size), set()).add(digest)
        return by_size
    for path in meta["path"]:  # an index built before photos were keyed
        try:
            by_size.setdefault(os.path.getsize(path), set()).add(content_digest(Path(path).read_bytes()))
        except OSError:
            continue
    return by_size


def overlap_with_index(index, records) -> dict[str, np.ndarray]:
    """Which external rows the index already holds: the same file bytes, the same place id of the same
    city, or (for an index split by map cell) the same cell as any indexed photo."""
    import pandas as pd

    from .data import cell_keys
    from .images import content_digest

    meta = pd.concat([index.store.metadata(s) for s in SPLITS])
    digests = _indexed_digests(index, meta)
    same_bytes = np.zeros(len(records), dtype=bool)
    for i, path in enumerate(records["path"]):
        try:
            candidates = digests.get(os.path.getsize(path))
            same_bytes[i] = bool(candidates) and content_digest(Path(path).read_bytes()) in candidates
        except OSError:
            continue
    reasons = {"same file bytes": same_bytes}
    places = set(zip(meta["city"], meta["place_id"]))
    reasons["same place id"] = np.array([(c, p) in places and p >= 0 for c, p in zip(records["city"], records["place_id"])],
                                        dtype=bool)
    split = index.manifest.get("split", {})
    if split.get("by") == "cell" and split.get("cell_km"):
        km = float(split["cell_km"])
        cells = set(cell_keys(meta["lat"], meta["lon"], km)) - {""}
        reasons["same map cell"] = np.array([c in cells for c in cell_keys(records["lat"], records["lon"], km)], dtype=bool)
    return reasons


def external_photos(index, source, log, embed_kwargs) -> tuple[Photos, dict]:
    """A second labelled set (CSV manifest, OSV-5M CSV, GSV tree or <city>/*.jpg): cities the index does not know
    and photos it already holds are left out, each with a count."""
    from .data import scan_dataset
    from .extraction import embed_paths

    dataset = scan_dataset(source)
    records = dataset.records
    report = {"source": str(source), "rows": int(len(records)), "skipped_rows": len(dataset.skipped)}
    known = records["city"].isin(index.classes).to_numpy()
    if (~known).any():
        unknown = sorted(records.loc[~known, "city"].unique())
        log(f"external: leaving out {int((~known).sum())} photos of {len(unknown)} cities the index does not know"
            + (f": {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else "")))
    report["unknown_city"] = int((~known).sum())
    records = records[known].reset_index(drop=True)
    if records.empty:
        raise GeoindexError(f"no photo in {source} belongs to a city of index {index.name!r}")
    overlap = overlap_with_index(index, records)
    dropped = np.zeros(len(records), dtype=bool)
    report["dropped_as_in_index"] = {}
    for reason, mask in overlap.items():
        new = mask & ~dropped
        report["dropped_as_in_index"][reason] = int(new.sum())
        dropped |= mask
    if dropped.any():
        log(f"external: dropping {int(dropped.sum())} photos the index already holds ("
            + ", ".join(f"{r}: {c}" for r, c in report["dropped_as_in_index"].items() if c) + ")")
    records = records[~dropped].reset_index(drop=True)
    if records.empty:
        raise GeoindexError(f"every photo in {source} is already in index {index.name!r}; nothing left to score")
    emb, ok, errors = embed_paths(index.backbone, records["path"].tolist(), desc="external", **embed_kwargs)
    for path, err in zip(records["path"][~ok], np.asarray(errors, dtype=object)[~ok]):
        log(f"external: skipping {path}: {err}")
    report["unreadable"] = int((~ok).sum())
    records = records[ok]
    labels = records["city"].map({c: i for i, c in enumerate(index.classes)}).to_numpy()
    report["scored"] = int(len(records))
    return Photos(emb[ok], records["path"].tolist(), labels, records[["lat", "lon"]].to_numpy(dtype=np.float64),
                  "external"), report


def _ids_sha256(photos: Photos) -> str:
    return hashlib.sha256("\n".join(map(str, photos.sources)).encode()).hexdigest()


class UnsavedProbe:
    """A linear probe trained on the stored embeddings as `train` trains one, but kept in memory: a bench never
    writes into the index it measures. It answers as a saved probe (heads.Classifier) would."""

    mode = "probe"

    def __init__(self, head, meta: dict):
        self.head, self.meta = head, meta
        self.folder = None

    @classmethod
    def fit(cls, index) -> "UnsavedProbe":
        from .heads import DEFAULTS, fit_probe

        store, defaults = index.store, DEFAULTS["probe"]
        head, _, best_epoch, best_acc = fit_probe(store.embeddings("train"), store.labels("train"),
                                                  store.embeddings("val"), y_val=store.labels("val"),
                                                  n_classes=len(index.classes), epochs=defaults["epochs"],
                                                  lr=defaults["lr"], batch_size=defaults["batch_size"])
        return cls(head, {"mode": "probe", "best_epoch": best_epoch, "best_val_accuracy": best_acc,
                          "validated_on": "val", "saved": False})

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits = self.head(torch.as_tensor(np.asarray(features, dtype=np.float32)))
        return logits.softmax(1).numpy().astype(np.float64)


class Bench:
    """Builds the methods once, tunes what is tuned on val, and scores them on any set of photos."""

    def __init__(self, index, methods=METHODS, k=None, *, vote_method=None, temperature=None, clip_weights=None,
                 templates_file=None, device="auto", batch_size: int = 64, num_workers=None, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.index, self.log = index, log
        self.embed_kwargs = dict(batch_size=batch_size, num_workers=num_workers, device=index.device, progress=progress)
        self.templates = read_templates(templates_file) if templates_file else list(ENSEMBLE_TEMPLATES)
        self.clip_weights = clip_weights
        self.val = Photos.of_split(index, "val") if index.store.count("val") else None
        self.skipped: dict[str, str] = {}
        self.tuned: dict[str, dict] = {}
        self.methods: list = []
        overrides = dict(k=k, vote=vote_method, temperature=temperature)
        if "knn" in methods:
            knn = index.knn_method(**overrides)
            if knn.tuned_on is None and not any(v is not None for v in overrides.values()):
                if self.val is not None:
                    self.tuned["knn"] = knn.fit(self.val).best_params_
                    from .tuning import street_summary
                    log(f"knn: k={knn.k_}, {knn.vote_} vote, T={knn.temperature_:g} (tuned on val, accuracy "
                        f"{knn.val_accuracy_:.3f}); {street_summary(knn.street_)}")
                else:
                    log("knn: no validation split to tune k and temperature on; using the defaults")
            elif knn.tuned_on:
                self.tuned["knn"] = knn.params
            self.methods.append(knn)
        if "classifier" in methods or "hybrid" in methods:
            heads = classifier_methods(index, self.embed_kwargs)
            if not heads:
                if self.val is None:
                    self.skipped["classifier"] = "no head trained and no validation split to train a probe with"
                else:
                    log("no classifier head yet: training a linear probe on the stored embeddings for this bench "
                        "only (not saved; `geoindex train` saves one)")
                    heads = [ClassifierMethod(index, UnsavedProbe.fit(index), self.embed_kwargs)]
            self._heads = heads
            if "classifier" in methods:
                self.methods.extend(heads)
        else:
            self._heads = []
        self._zero_shot = []
        if "zeroshot" in methods or "hybrid" in methods:
            self._zero_shot = self._make_zero_shot()
            if "zeroshot" in methods:
                self.methods.extend(self._zero_shot)
        if "hybrid" in methods:
            self._make_hybrid()

    def _make_zero_shot(self) -> list:
        from .backbones import create_backbone

        try:
            if backbone_info(self.index.manifest["backbone"]).zero_shot:
                clip = self.index.backbone
            else:
                clip = create_backbone("clip", weights=self.clip_weights, device=self.index.device)
        except GeoindexError as exc:  # reported once, in the table's footer and results.json
            self.skipped["zeroshot"] = str(exc)
            return []
        note = "" if clip.weights.source != "random" else "; RANDOM CLIP weights (--clip-weights none): meaningless"
        variants = [ZeroShotMethod(self.index, clip, fmt, templates, name, self.embed_kwargs, note)
                    for name, fmt, templates in ZERO_SHOT_VARIANTS]
        variants.append(ZeroShotMethod(self.index, clip, "city_country", self.templates, "zeroshot:ensemble",
                                       self.embed_kwargs, note))
        self.clip_random = clip.weights.source == "random"
        return variants

    def _make_hybrid(self) -> None:
        if self.val is None:
            self.skipped["hybrid"] = ("the index has no validation split, and fusion weights are only ever chosen on "
                                      "val (never on the photos being scored)")
            return
        parts = [m for m in self.methods if m.name == "knn"]
        if not parts:
            parts = [self.index.knn_method()]
        parts += self._heads[:1]
        parts += [z for z in self._zero_shot if z.name == "zeroshot:ensemble"]
        if len(parts) < 2:
            self.skipped["hybrid"] = "needs at least two of knn, classifier, zeroshot"
            return
        hybrid = HybridMethod(self.index, parts)
        self.tuned["hybrid"] = hybrid.fit(self.val).best_params_
        self.log(f"hybrid weights {self.tuned['hybrid']['weights']} (tuned on val, accuracy "
                 f"{self.tuned['hybrid']['val_accuracy']:.3f})")
        self.methods.append(hybrid)

    def score(self, photos: Photos) -> dict:
        scored = {}
        ids = _ids_sha256(photos)
        for method in self.methods:
            answer = method.predict(photos)
            y = answer.true_labels(photos.labels)
            metrics = evaluate(y, answer.probs, answer.classes, answer.coords,
                               photos.coords if answer.coords is not None else None)
            confidence = float(answer.probs.max(axis=1).mean()) if len(photos) else None
            scored[answer.method] = {"level": answer.level, "notes": answer.notes, "ids_sha256": ids,
                                     "mean_top_probability": confidence, **metrics, "classes": answer.classes}
        return scored


def run_bench(index, methods=METHODS, split: str = "test", out=None, external=None, log: Callable[[str], None] = print,
              **bench_kwargs) -> dict:
    """Score the chosen methods on one split (and optionally an external set); merge into `out`/results.json.

    With `out` inside the index (the default <index>/bench/) the index's lock is held from the start
    (geoindex.locks): a bench is a writer there, refused at once while another writer holds the index."""
    index_folder = Path(index.path).resolve()
    target = Path(out).resolve() if out else index_folder / BENCH_DIR
    if index_folder == target or index_folder in target.parents:
        from .locks import writing_to
        with writing_to(index, "bench"):
            return _run_bench(index, methods, split, out, external, log, **bench_kwargs)
    return _run_bench(index, methods, split, out, external, log, **bench_kwargs)


def _run_bench(index, methods, split, out, external, log, **bench_kwargs) -> dict:
    methods = list(methods)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise GeoindexError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    if split == "val" and {"hybrid", "knn"} & set(methods):
        log("NOTE: scoring on val, the split that tunes kNN and the fusion: these figures are optimistic")
    source = index.manifest.get("features_from")
    no_split = bool(source) and not index.store.count(split)
    if no_split and not external:
        raise GeoindexError(f"index {index.name!r} has no {split} split to score: it was built with --features-from "
                            f"{source['name']} (every photo is searchable); score it on other photos with `geoindex "
                            f"bench --index {index.name} --external CSV`, or bench {source['name']!r}")
    bench = Bench(index, methods, log=log, **bench_kwargs)
    out = Path(out) if out else Path(index.path) / BENCH_DIR
    sets = [] if no_split else [Photos.of_split(index, split)]
    external_report = None
    if external:
        photos, external_report = external_photos(index, external, log, bench.embed_kwargs)
        sets.append(photos)
    split_info = index.manifest.get("split", {})
    results = {"index": index.name, "backbone": index.manifest["backbone"], "split": split,
               "split_by": split_info.get("by"), "cell_km": split_info.get("cell_km"),
               "split_warning": split_info.get("warning"), "synthetic": bool(index.manifest.get("synthetic")),
               "tuned": {name: {**params, "tuned_on": params.get("tuned_on", "val")} for name, params in bench.tuned.items()},
               "external": external_report, "sets": {}}
    for photos in sets:
        results["sets"][photos.name] = {"n": len(photos), "ids_sha256": _ids_sha256(photos),
                                        "methods": bench.score(photos), "skipped": dict(bench.skipped)}
    knn = next((m for m in bench.methods if m.name == "knn"), None)
    if knn is not None:
        from .revisit import revisit_report
        results["revisit"] = revisit_report(index, knn, split)
    results = merge_previous(out / RESULTS_JSON, results)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULTS_JSON, results)
    with atomic_path(out / RESULTS_MD) as tmp:
        tmp.write_text(results_markdown(results))
    keep = set()
    for set_name, block in results["sets"].items():
        for method, metrics in block["methods"].items():
            png = out / f"confusion_{set_name}_{method.replace(':', '_')}.png"
            keep.add(png.name)
            plot_confusion(metrics, png, f"{method} on {set_name} ({index.name})")
    for stale in out.glob("confusion_*.png"):
        if stale.name not in keep:
            stale.unlink()
    results["out"] = str(out)
    return results


def merge_previous(path: Path, results: dict) -> dict:
    """Rows of methods not rerun now are kept from the previous results of the same index, split and photos."""
    import json

    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    if previous.get("index") != results["index"] or previous.get("split") != results["split"]:
        return results
    for set_name, block in results["sets"].items():
        old = previous.get("sets", {}).get(set_name)
        if not old or old.get("ids_sha256") != block["ids_sha256"]:
            continue
        for method, metrics in old.get("methods", {}).items():
            block["methods"].setdefault(method, metrics)
        for method, reason in old.get("skipped", {}).items():
            if method not in block["methods"]:
                block["skipped"].setdefault(method, reason)
        for method in block["methods"]:
            block["skipped"].pop(method, None)
    for name, params in previous.get("tuned", {}).items():
        results["tuned"].setdefault(name, params)
    if "revisit" not in results and previous.get("revisit"):
        results["revisit"] = previous["revisit"]
    return results


def _fmt(value, pattern="{:.3f}"):
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else pattern.format(value)


def results_table(results: dict) -> list[list[str]]:
    header = ["set", "method", "level", "n", "accuracy", "top5", "macro-F1", "median km", "<=25 m", "<=100 m",
              "<=25 km", "<=200 km", "mean top p"]
    table = [header]
    for set_name, block in results["sets"].items():
        for method, m in block["methods"].items():
            table.append([set_name, method, m["level"], str(m["n"]), _fmt(m["accuracy"]), _fmt(m.get("top5_accuracy")),
                          _fmt(m["macro_f1"]), _fmt(m.get("median_km"), "{:.1f}"), _fmt(m.get("within_25m")),
                          _fmt(m.get("within_100m")), _fmt(m.get("within_25km")),
                          _fmt(m.get("within_200km")), _fmt(m.get("mean_top_probability"))])
    return table


def skipped_lines(results: dict) -> list[str]:
    lines = []
    for method, reason in next(iter(results["sets"].values()))["skipped"].items():
        lines.append(f"{method} skipped: {reason}")
    return lines


def notes_lines(results: dict) -> list[str]:
    lines = []
    if results.get("split_warning"):
        lines.append(f"WARNING: {results['split_warning']}")
    by = results.get("split_by")
    if by:
        lines.append(f"split by {by}" + (f" ({results['cell_km']:g} km cells)" if results.get("cell_km") else ""))
    for name, params in results.get("tuned", {}).items():
        shown = {k: v for k, v in params.items() if k not in ("tuned_on", "val_accuracy", "gps", "street")}
        lines.append(f"{name} tuned on {params.get('tuned_on', 'val')}: {dumps(shown, indent=None)}")
    ext = results.get("external")
    if ext:
        dropped = ", ".join(f"{k} {v}" for k, v in ext.get("dropped_as_in_index", {}).items())
        lines.append(f"external {ext['source']}: {ext['scored']} scored; left out: unknown city {ext['unknown_city']}, "
                     f"already in the index ({dropped}), unreadable {ext['unreadable']}")
    return lines


def revisit_table(results: dict) -> list[list[str]]:
    """The street-level revisit block as rows: recall within 25 m, then each GPS answer's error."""
    r = results.get("revisit")
    if not r or r.get("skipped"):
        return []
    recall = r["recall"]
    table = [["kNN on revisits", "n", "r@1 25 m", "r@5 25 m", "r@10 25 m", "median m", "<=25 m", "<=100 m", "<=1 km"]]
    names = (("answer", "GPS answer (street where calibrated, else city)"), ("cluster", "best street cluster, always"),
             ("city", "city-level mean (the old answer)"))
    for key, label in names:
        g = r["gps"][key]
        table.append([label, str(r["n_queries"]), _fmt(recall["r@1_25m"]), _fmt(recall["r@5_25m"]),
                      _fmt(recall["r@10_25m"]), _fmt(g["median_m"], "{:,.0f}"), _fmt(g["within_25m"]),
                      _fmt(g["within_100m"]), _fmt(g["within_1000m"])])
    return table


def revisit_lines(results: dict) -> list[str]:
    from .tuning import street_summary

    r = results.get("revisit")
    if not r:
        return []
    if r.get("skipped"):
        return [f"street-level revisit protocol skipped: {r['skipped']}"]
    space = r.get("street_space")
    space = "raw cosine" if not space else f"whitened to {space['dims']} dims (power {space['power']:g})"
    knn_space = r.get("recall_knn_space") or {}
    return [f"revisit protocol on {r['split']}: {r['rule']} ({r['n_queries']} queries, gallery {r['mean_gallery']:,.0f} "
            f"photos on average); street-level answers for {r['street_share']:.1%} of queries"
            + (f", within 25 m {r['street_precision']:.1%} of the time" if r.get("street_precision") is not None else ""),
            f"recall in the street space ({space})"
            + (f"; in kNN's city space r@1/5/10 {_fmt(knn_space.get('r@1_25m'))} / {_fmt(knn_space.get('r@5_25m'))} / "
               f"{_fmt(knn_space.get('r@10_25m'))}" if knn_space else ""),
            street_summary(r.get("street"))]


def results_markdown(results: dict) -> str:
    table = results_table(results)
    lines = [f"# geoindex bench: {results['index']} ({results['backbone']}), split {results['split']}", ""]
    if results["synthetic"]:
        lines += ["**Synthetic data: these figures say nothing about real photos.**", ""]
    if results.get("split_warning"):
        lines += [f"**{results['split_warning']}**", ""]
    lines += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    revisit = revisit_table(results)
    if revisit:
        lines += ["", "## Street level: does kNN find the spot?", ""]
        lines += ["| " + " | ".join(revisit[0]) + " |", "|" + "---|" * len(revisit[0])]
        lines += ["| " + " | ".join(row) + " |" for row in revisit[1:]]
    lines += [""] + [f"- {line}" for line in notes_lines(results) + revisit_lines(results) + skipped_lines(results)]
    lines += ["", "Every row is scored by `geoindex.metrics.evaluate` on the same photo ids (see `ids_sha256` in "
              "results.json). Country-level zero-shot is scored on countries. top5 is shown only with more than 5 "
              "classes; a classifier's or zero-shot's km figures use the centre of its predicted city's train photos."]
    return "\n".join(lines) + "\n"


def format_table(results: dict) -> str:
    lines = []
    for table in (results_table(results), revisit_table(results)):
        if not table:
            continue
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += (["" ] if lines else []) + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                                             for row in table]
    return "\n".join(lines + notes_lines(results) + revisit_lines(results) + skipped_lines(results))


def plot_confusion(metrics: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion"], dtype=np.float64)
    rates = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    names = [full_name(c) for c in metrics["classes"]]
    n = len(names)
    size = max(4.5, 0.45 * n + 2.5)
    # constrained layout makes room for long city names and the axis labels beside them (tight_layout left
    # the "true" label outside the figure once the names were full ones)
    fig, ax = plt.subplots(figsize=(size + 1.2 + 0.06 * max(map(len, names)), size), layout="constrained")
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    tick_size = 11 if n <= 10 else 9 if n <= 25 else 7
    ax.set_xticks(range(n), names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=tick_size)
    ax.set_yticks(range(n), names, fontsize=tick_size)
    if n <= 25:  # counts in the cells while they fit, white on dark cells
        for i in range(n):
            for j in range(n):
                if cm[i, j] or i == j:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=tick_size,
                            color="white" if rates[i, j] > 0.55 else "black")
    accuracy = metrics["accuracy"]
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{title}\naccuracy {accuracy:.3f} on {metrics['n']} photos" if accuracy is not None else title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class (cell text: count)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
