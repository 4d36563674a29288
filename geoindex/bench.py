"""`geoindex bench`: kNN vs classifier heads vs CLIP zero-shot vs their fusion, on the same images,
all scored by `metrics.evaluate`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backbones import create_backbone
from .cities import display_name
from .data import scan_dataset
from .errors import GeoindexError
from .extraction import embed_paths
from .fileio import atomic_path, write_json_atomic
from .heads import available_heads, load_classifier, train_probe
from .metrics import evaluate
from .zeroshot import ENSEMBLE_TEMPLATES, LABEL_FORMATS, SINGLE_TEMPLATE, ZeroShotClassifier, read_templates

METHODS = ("knn", "classifier", "zeroshot", "hybrid")


@dataclass
class EvalSet:
    """Images to score, with truth, and their embeddings from the index's backbone."""

    name: str
    paths: list[str]
    labels: np.ndarray
    coords: np.ndarray
    embeddings: np.ndarray
    clip_embeddings: np.ndarray | None = None

    @property
    def ids_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.paths).encode()).hexdigest()


def split_set(index, split: str) -> EvalSet:
    meta = index.store.metadata(split)
    if len(meta) == 0:
        raise GeoindexError(f"index {index.name!r} has no {split} images")
    return EvalSet(split, meta["path"].tolist(), meta["label"].to_numpy(), meta[["lat", "lon"]].to_numpy(),
                   index.store.embeddings(split))


def external_set(index, folder, log, **embed_kwargs) -> EvalSet:
    """A second labelled folder (GSV tree or <city>/*.jpg); cities the index does not know are left out."""
    records = scan_dataset(folder).records
    known = records["city"].isin(index.classes)
    if (~known).any():
        log(f"external: leaving out {int((~known).sum())} images of cities the index does not know: "
            f"{', '.join(sorted(records.loc[~known, 'city'].unique()))}")
    records = records[known]
    if records.empty:
        raise GeoindexError(f"no image in {folder} belongs to a city of index {index.name!r}")
    emb, ok, errors = embed_paths(index.backbone, records["path"].tolist(), desc="external", **embed_kwargs)
    for path, err in zip(records["path"][~ok], np.asarray(errors, dtype=object)[~ok]):
        log(f"external: skipping {path}: {err}")
    records = records[ok]
    labels = records["city"].map({c: i for i, c in enumerate(index.classes)}).to_numpy()
    return EvalSet("external", records["path"].tolist(), labels, records[["lat", "lon"]].to_numpy(), emb[ok])


@dataclass
class Row:
    method: str
    probs: np.ndarray
    y_true: np.ndarray
    classes: list[str]
    coords: np.ndarray | None = None
    level: str = "city"
    notes: str = ""
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, index, k: int = 20, vote_method: str = "softmax", temperature: float = 0.05,
                 clip_weights=None, templates_file=None, device="auto", batch_size: int = 64, num_workers=None,
                 progress: bool = True, log: Callable[[str], None] = print):
        self.index, self.k, self.vote_method, self.temperature = index, k, vote_method, temperature
        self.clip_weights, self.device, self.progress, self.log = clip_weights, device, progress, log
        self.embed_kwargs = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
        self.templates = read_templates(templates_file) if templates_file else list(ENSEMBLE_TEMPLATES)
        self._clip = None
        self._classifiers = None

    # ------------------------------------------------------------------ methods
    def knn(self, data: EvalSet) -> Row:
        result = self.index.knn_predict(data.embeddings, self.k, self.vote_method, self.temperature)
        return Row("knn", result["probs"], data.labels, self.index.classes, result["coords"],
                   notes=f"k={self.k}, {self.vote_method} vote")

    def classifiers(self):
        if self._classifiers is None:
            if not available_heads(self.index):
                self.log("no classifier head yet: training a linear probe on the stored embeddings")
                train_probe(self.index, progress=False, log=self.log)
            self._classifiers = [load_classifier(self.index, m, device=self.device) for m in available_heads(self.index)]
        return self._classifiers

    def classifier(self, data: EvalSet) -> list[Row]:
        rows = []
        for clf in self.classifiers():
            if clf.mode == "probe":
                probs = clf.predict_features(data.embeddings)
            else:
                probs = clf.predict_paths(data.paths, **{k: v for k, v in self.embed_kwargs.items() if k != "device"})
            rows.append(Row(f"classifier:{clf.mode}", probs, data.labels, self.index.classes,
                            notes=f"best val acc {clf.meta['best_val_accuracy']:.3f} at epoch {clf.meta['best_epoch']}"))
        return rows

    @property
    def clip(self):
        if self._clip is None:
            if self.index.manifest["backbone"] == "clip":
                self._clip = self.index.backbone
            else:
                self._clip = create_backbone("clip", weights=self.clip_weights, device=self.index.device)
        return self._clip

    def clip_embeddings(self, data: EvalSet) -> np.ndarray:
        if data.clip_embeddings is None:
            if self.index.manifest["backbone"] == "clip":
                data.clip_embeddings = data.embeddings
            else:
                emb, ok, _ = embed_paths(self.clip, data.paths, desc=f"CLIP ({data.name})", **self.embed_kwargs)
                data.clip_embeddings = np.where(ok[:, None], emb, 0.0)
        return data.clip_embeddings

    def zeroshot(self, data: EvalSet) -> list[Row]:
        emb = self.clip_embeddings(data)
        rows = []
        variants = [(f, [SINGLE_TEMPLATE], f"zeroshot:{f}") for f in LABEL_FORMATS]
        variants.append(("city_country", self.templates, "zeroshot:ensemble"))
        for label_format, templates, name in variants:
            zs = ZeroShotClassifier(self.clip, self.index.classes, label_format, templates)
            level = "country" if label_format == "country" else "city"
            rows.append(Row(name, zs.predict(emb), zs.map_labels(data.labels), zs.labels, level=level,
                            notes=f"{len(templates)} template(s), labels '{label_format}'"))
        return rows

    # ------------------------------------------------------------------ fusion
    @staticmethod
    def fuse(parts: list[np.ndarray], weights) -> np.ndarray:
        logp = sum(w * np.log(np.clip(p, 1e-9, 1)) for w, p in zip(weights, parts))
        logp = logp - logp.max(axis=1, keepdims=True)
        probs = np.exp(logp)
        return probs / probs.sum(axis=1, keepdims=True)

    def choose_hybrid_weights(self, parts_val: list[np.ndarray], y_val: np.ndarray, step: float = 0.1):
        """Grid over the simplex: best validation accuracy, ties broken by lower validation log-loss."""
        n, ticks = len(parts_val), int(round(1 / step))
        best, best_key = None, (-1.0, -np.inf)
        for combo in itertools.product(range(ticks + 1), repeat=n):
            if sum(combo) != ticks:
                continue
            weights = [c / ticks for c in combo]
            fused = self.fuse(parts_val, weights)
            nll = float(-np.log(np.clip(fused[np.arange(len(y_val)), y_val], 1e-12, 1)).mean())
            key = (float((fused.argmax(1) == y_val).mean()), -nll)
            if key > best_key:
                best, best_key = weights, key
        return best, best_key[0]


def run_bench(index, methods=METHODS, split: str = "test", out=None, external=None, log: Callable[[str], None] = print,
              **bench_kwargs) -> dict:
    """Score the chosen methods on one split (and optionally an external folder); write results to `out`."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise GeoindexError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    bench = Bench(index, log=log, **bench_kwargs)
    out = Path(out) if out else Path(index.path) / "bench"
    sets = [split_set(index, split)]
    if external:
        sets.append(external_set(index, external, log, **bench.embed_kwargs))
    need_val = "hybrid" in methods
    val = split_set(index, "val") if need_val and index.store.count("val") else None
    results = {"index": index.name, "backbone": index.manifest["backbone"], "split": split,
               "synthetic": bool(index.manifest.get("synthetic")), "sets": {}}
    hybrid_weights = None
    for data in sets:
        rows, skipped = _method_rows(bench, data, methods, skipped_log=log)
        if "hybrid" in methods:
            city_rows = {r.method: r for r in rows if r.level == "city"}
            parts = [m for m in ("knn", _best_classifier(city_rows), "zeroshot:ensemble") if m in city_rows]
            if len(parts) >= 2:
                if hybrid_weights is None:
                    source = val or data
                    val_rows, _ = _method_rows(bench, source, {p.split(":")[0] for p in parts}, skipped_log=lambda m: None)
                    val_rows = {r.method: r for r in val_rows}
                    hybrid_weights, val_acc = bench.choose_hybrid_weights([val_rows[p].probs for p in parts], source.labels)
                    log(f"hybrid weights {dict(zip(parts, hybrid_weights))} (val accuracy {val_acc:.3f})")
                fused = bench.fuse([city_rows[p].probs for p in parts], hybrid_weights)
                rows.append(Row("hybrid", fused, data.labels, index.classes,
                                notes="log-prob fusion " + ", ".join(f"{p}={w:.1f}" for p, w in zip(parts, hybrid_weights))))
            else:
                skipped["hybrid"] = "needs at least two of knn, classifier, zeroshot"
        scored = {}
        for row in rows:
            metrics = evaluate(row.y_true, row.probs, row.classes, row.coords,
                               data.coords if row.coords is not None else None)
            scored[row.method] = {"level": row.level, "notes": row.notes, "ids_sha256": data.ids_sha256, **metrics,
                                  "classes": row.classes}
        results["sets"][data.name] = {"n": len(data.paths), "ids_sha256": data.ids_sha256, "methods": scored,
                                      "skipped": skipped}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results))
    for set_name, block in results["sets"].items():
        for method, metrics in block["methods"].items():
            plot_confusion(metrics, out / f"confusion_{set_name}_{method.replace(':', '_')}.png",
                           f"{method} on {set_name} ({index.name})")
    results["out"] = str(out)
    return results


def _best_classifier(rows: dict) -> str:
    for name in ("classifier:finetune", "classifier:probe"):
        if name in rows:
            return name
    return "classifier"


def _method_rows(bench: Bench, data: EvalSet, methods, skipped_log) -> tuple[list[Row], dict]:
    rows, skipped = [], {}
    for method in ("knn", "classifier", "zeroshot"):
        if method not in methods:
            continue
        try:
            produced = getattr(bench, method)(data)
        except GeoindexError as exc:  # e.g. no CLIP weights offline: report it, keep the other methods
            skipped[method] = str(exc)
            skipped_log(f"{method}: skipped ({exc})")
            continue
        rows.extend(produced if isinstance(produced, list) else [produced])
    return rows, skipped


def _fmt(value, pattern="{:.3f}"):
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else pattern.format(value)


def results_table(results: dict) -> list[list[str]]:
    header = ["set", "method", "level", "n", "accuracy", "top5", "macro-F1", "weighted-F1", "median km", "<=25 km"]
    table = [header]
    for set_name, block in results["sets"].items():
        for method, m in block["methods"].items():
            table.append([set_name, method, m["level"], str(m["n"]), _fmt(m["accuracy"]), _fmt(m.get("top5_accuracy")),
                          _fmt(m["macro_f1"]), _fmt(m["weighted_f1"]), _fmt(m.get("median_km"), "{:.1f}"),
                          _fmt(m.get("within_25km"))])
    return table


def skipped_lines(results: dict) -> list[str]:
    return [f"{set_name}: {method} skipped: {reason}" for set_name, block in results["sets"].items()
            for method, reason in block["skipped"].items()]


def results_markdown(results: dict) -> str:
    table = results_table(results)
    lines = [f"# geoindex bench: {results['index']} ({results['backbone']}), split {results['split']}", ""]
    if results["synthetic"]:
        lines += ["**Synthetic data: these figures say nothing about real photos.**", ""]
    lines += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += [""] + [f"- {line}" for line in skipped_lines(results)]
    lines += ["", "Every row is scored by `geoindex.metrics.evaluate` on the same image ids "
              "(see `ids_sha256` in results.json). Country-level zero-shot is scored on countries."]
    return "\n".join(lines) + "\n"


def format_table(results: dict) -> str:
    table = results_table(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + skipped_lines(results))


def plot_confusion(metrics: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion"], dtype=np.float64)
    rates = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    names = [display_name(c) for c in metrics["classes"]]
    size = max(5, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}\naccuracy {metrics['accuracy']:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
