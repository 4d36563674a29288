"""Adapt an index's backbone to its cities: fine-tune the backbone's last stages, then re-embed the index.

"Revisiting IM2GPS" (Vo et al., 2017) found features trained to tell places apart the better retrieval
features; on street photos of held-out places the EfficientNet-Lite ImageNet features gain more from
this than from any voting or fusion lever (benchmarks/accuracy.md). Fine-tuning a whole backbone costs
13 minutes an epoch on a 2-core CPU; here only the tail (the last two stages and the feature head, about
a third of the compute) is trained. The frozen trunk's outputs are computed once, so an epoch costs a
tail forward and backward: about 30 s for 4,321 photos with EfficientNet-Lite0 on that CPU.

The tail is trained for the space kNN searches: its L2-normalised output feeds a linear softmax over the
cities (label smoothing, AdamW, BatchNorm statistics frozen), and the epoch with the lowest validation
loss is kept. Every photo of the index is then embedded again with the tuned backbone, which is saved
inside the index (`backbone.pt`), so a query is embedded exactly as the index was. Progress is shown,
a checkpoint is written after every epoch and an interrupted run resumes from it; the curves go to
`heads/tail/`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .backbones import TAIL_STAGES, tail_split
from .catalog import backbone_info
from .config import ExtractionConfig
from .errors import GeoindexError
from .extraction import iter_embeddings, resolve_device
from .fileio import atomic_path, write_json_atomic
from .heads import _no_readable_photo, head_folder
from .training import VAL_LOSS, Checkpointing, LoopSettings, TrainingLoop, epoch_generator, save_weights
from .layout import HEAD_META, TAIL_MODE, TRUNK_CACHE

MODE = TAIL_MODE
DEFAULTS = {"epochs": 6, "lr": 1e-4, "head_lr": 1e-3, "weight_decay": 0.05, "batch_size": 64, "patience": 2,
            "label_smoothing": 0.1}
MAX_TRAIN_PHOTOS = 20_000  # the trunk cache is ~44-113 KB a photo; past this a random sample of train adapts
MAX_VAL_PHOTOS = 5_000
# TRUNK_CACHE (layout) lies beside the checkpoint: a resumed run skips recomputing the trunk features (minutes).


@dataclass
class AdaptResult:
    folder: Path
    history: pd.DataFrame
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    weights: Path        # the tuned backbone, inside the index
    train_photos: int
    index: object        # the re-embedded index, opened again (the one passed in reads the replaced files)


class _TailClassifier(nn.Module):
    """The tail's L2-normalised output through a linear softmax over the cities: kNN searches that space.
    Its state is the whole backbone's (trunk included, untrained) and the head's."""

    def __init__(self, backbone_model: nn.Module, tail: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone_model, head
        self._tail = [tail]  # part of the backbone: kept out of the state dict, which holds it once
        self.scale = math.sqrt(head.in_features)  # unit-norm features, coordinates of order 1 for the linear layer

    def forward(self, trunk_features):
        return self.head(nn.functional.normalize(self._tail[0](trunk_features.float()), dim=1) * self.scale)


def supports_tail(index) -> bool:
    """Whether the index's backbone can be cut into a trunk and a tail (the EfficientNet-Lite family)."""
    return backbone_info(index.manifest["backbone"]).tail_adaptable


def is_adapted(index) -> bool:
    return bool(index.manifest.get("adapted"))


def wants_adaptation(index) -> bool:
    """What `geoindex train --mode auto` (and the demo) adapt: a backbone that can be cut, not adapted yet, with a
    validation split to stop on."""
    return supports_tail(index) and not is_adapted(index) and bool(index.store.count("val"))


def _sample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _trunk_outputs(backbone, split, paths, extraction: ExtractionConfig, progress, desc,
                   estimate=None) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) float16 trunk outputs of the photos, and which decoded: computed once, read every epoch."""
    trunk_backbone = dataclasses.replace(backbone, model=split.trunk, embed_dim=split.trunk_dim, _embedders={})
    out = np.zeros((len(paths), split.trunk_dim), dtype=np.float16)
    ok = np.zeros(len(paths), dtype=bool)
    for item in iter_embeddings(trunk_backbone, paths, batch_size=extraction.batch_size,
                                num_workers=extraction.num_workers, device=extraction.device,
                                progress=progress, desc=desc, normalize=False):
        out[item.positions[item.ok]] = item.embeddings.astype(np.float16)
        ok[item.positions] = item.ok
        if estimate is not None:
            estimate.seen(len(item.positions))
    return out, ok


def _read_trunk_cache(path: Path, key: str, counts: dict, dim: int):
    """(features, labels) saved by an interrupted run of the same plan on the same index build, else None.
    Plain arrays only (allow_pickle=False); anything else, or another key or shape, is ignored and recomputed."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            features = {s: z[f"{s}_features"] for s in counts}
            labels = {s: z[f"{s}_labels"].astype(np.int64) for s in counts}
    except (OSError, ValueError, KeyError):
        return None
    for s, n in counts.items():
        if features[s].shape != (n, dim) or features[s].dtype != np.float16 or labels[s].shape != (n,):
            return None
    return features, labels


def _write_trunk_cache(path: Path, key: str, features: dict, labels: dict, log) -> None:
    """Best effort: a resumed run is only slower without it, so a disk too small for it skips it with a note."""
    import shutil

    needed = sum(a.nbytes for a in features.values()) + sum(a.nbytes for a in labels.values()) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if free < 2 * needed:  # leave room for the checkpoints and the re-embedding
        log(f"not keeping the trunk features for a resumed run ({needed / 1e6:.0f} MB; {free / 1e6:.0f} MB free)")
        return
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, key=np.array(key), **{f"{s}_features": a for s, a in features.items()},
                         **{f"{s}_labels": a for s, a in labels.items()})
    except OSError as exc:
        log(f"not keeping the trunk features for a resumed run ({exc.strerror or exc})")


def adapt_index(index, *, epochs: int | None = None, lr: float | None = None, weight_decay: float | None = None,
                batch_size: int | None = None, patience: int | None = None, tail_stages: int = TAIL_STAGES,
                device="auto", num_workers=None, seed: int = 0, progress: bool = True, log=print) -> AdaptResult:
    """Fine-tune the tail of the index's backbone on its train photos (early stop on val loss), re-embed every
    photo of the index with it and swap the index for the re-embedded one. `index` is closed; the result holds
    the re-embedded index, opened, and where the curves are. Holds the index's lock throughout (geoindex.locks)."""
    from .locks import writing_to

    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                                       "batch_size": batch_size, "patience": patience}.items() if v is not None})
    settings["head_lr"] = settings["lr"] * DEFAULTS["head_lr"] / DEFAULTS["lr"]
    with writing_to(index, "train"):
        return _adapt_locked(index, settings, tail_stages, device, num_workers, seed, progress, log)


def _adapt_locked(index, settings: dict, tail_stages, device, num_workers, seed, progress, log) -> AdaptResult:
    from .backbones import create_backbone
    from .build import TUNED_WEIGHTS, StageEstimate, reembed_index
    from .geo_index import load_index

    if is_adapted(index):
        raise GeoindexError(f"index {index.name!r} is already adapted to its cities (its backbone's tail was fine-tuned "
                            f"on {index.manifest['adapted'].get('train_photos')} train photos); rebuild it with "
                            "`geoindex build ... --overwrite` to start again from the pretrained weights")
    if not index.store.count("val"):
        raise GeoindexError(f"index {index.name!r} has no validation split: fine-tuning needs one to know when to stop")
    device = resolve_device(device)
    backbone = create_backbone(index.manifest["backbone"], weights=index._weights_argument(),
                               image_size=index.manifest["image_size"], device=device)
    # The trunk's Embedder turns the whole net channels-last, which changes the tail's float rounding: done here
    # up front, a run that reads cached trunk features trains bit for bit as one that computed them.
    backbone.model.to(memory_format=torch.channels_last)
    split = tail_split(backbone, tail_stages)
    folder = head_folder(index, MODE)
    folder.mkdir(parents=True, exist_ok=True)
    # "shuffle" names how epochs draw their order: a checkpoint of another scheme cannot resume bit for bit.
    plan = {"backbone": index.manifest["backbone"], "weights_sha256": index.manifest["weights"]["sha256"],
            "build_id": index.manifest.get("build_id"), "tail_stages": tail_stages, "seed": seed,
            "shuffle": "generator(seed, epoch)", **settings}

    torch.manual_seed(seed)
    n_classes, dim = len(index.classes), backbone.embed_dim
    head = nn.Linear(dim, n_classes).to(device)
    model = _TailClassifier(backbone.model, split.tail, head)
    optimizer = torch.optim.AdamW([{"params": split.parameters, "lr": settings["lr"]},
                                   {"params": head.parameters(), "lr": settings["head_lr"]}],
                                  weight_decay=settings["weight_decay"])
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=settings["label_smoothing"])
    # BatchNorm keeps its ImageNet statistics (a few thousand photos would only make them noisy); the
    # EfficientNet-Lite tails have no dropout, so eval mode throughout changes nothing else.
    loop_settings = LoopSettings(MODE, settings["epochs"], settings["patience"], stop_on=VAL_LOSS, train_mode=False,
                                 progress=progress)
    loop = TrainingLoop(model, optimizer, loop_settings, device=device, folder=folder, log=log,
                        title=f"{index.manifest['backbone']} tail fine-tuned ({index.name})",
                        checkpoint=Checkpointing("tail fine-tuning", "tail-epoch", plan=plan))
    done = loop.finished

    meta = {s: index.store.metadata(s) for s in ("train", "val")}
    rows = {"train": _sample(len(meta["train"]), MAX_TRAIN_PHOTOS, seed),
            "val": _sample(len(meta["val"]), MAX_VAL_PHOTOS, seed)}
    if len(rows["train"]) < len(meta["train"]):
        log(f"adapting on a random {len(rows['train']):,} of the {len(meta['train']):,} train photos")
    features, labels = {}, {}
    cache_path = folder / TRUNK_CACHE
    cache_key = json.dumps({"plan": plan, "trunk_weights_sha256": backbone.weights.sha256,
                            "rows": {s: len(rows[s]) for s in rows}}, sort_keys=True)
    if not done:
        started = time.perf_counter()
        cached = _read_trunk_cache(cache_path, cache_key, {s: len(rows[s]) for s in rows}, split.trunk_dim)
        if cached is not None:
            features, labels = cached
            log(f"trunk features of {len(rows['train']) + len(rows['val']):,} photos read from {cache_path.name} "
                f"(kept from the interrupted run) in {time.perf_counter() - started:.0f} s")
        else:
            estimate = StageEstimate(log, "trunk features", len(rows["train"]) + len(rows["val"]))
            extraction = ExtractionConfig(batch_size=max(32, settings["batch_size"]), num_workers=num_workers,
                                          device=device)
            for s in ("train", "val"):
                paths = meta[s]["path"].to_numpy()[rows[s]].tolist()
                features[s], ok = _trunk_outputs(backbone, split, paths, extraction, progress, f"trunk features ({s})",
                                                 estimate)
                labels[s] = np.where(ok, meta[s]["label"].to_numpy()[rows[s]], -1).astype(np.int64)
                if s == "train" and not ok.any():
                    raise GeoindexError(_no_readable_photo(paths))
            log(f"trunk features of {len(rows['train']) + len(rows['val']):,} photos in "
                f"{time.perf_counter() - started:.0f} s")
            _write_trunk_cache(cache_path, cache_key, features, labels, log)
        log(f"training the last {tail_stages} stages of {index.manifest['backbone']}")

    def batches(epoch):
        # Each epoch's order comes from its own generator, never the global one that DataLoaders draw from:
        # a resumed run then shuffles exactly as an uninterrupted one, whatever it computed before.
        order = torch.randperm(len(labels["train"]), generator=epoch_generator(seed, epoch)).numpy()
        for start in range(0, len(order), settings["batch_size"]):
            batch = np.sort(order[start:start + settings["batch_size"]])
            yield torch.from_numpy(features["train"][batch]), torch.as_tensor(labels["train"][batch])

    def validate() -> dict:
        # Unsmoothed, summed over chunks: the loss the kept epoch is chosen on (and its recorded figures).
        total, correct, count = 0.0, 0, 0
        for start in range(0, len(labels["val"]), 256):
            y = torch.as_tensor(labels["val"][start:start + 256], device=device)
            logits = model(torch.from_numpy(features["val"][start:start + 256]).to(device))
            valid = y >= 0
            if valid.any():
                total += nn.functional.cross_entropy(logits[valid], y[valid], reduction="sum").item()
                correct += int((logits.argmax(1) == y)[valid].sum())
                count += int(valid.sum())
        return {"loss": total / max(1, count), "accuracy": correct / max(1, count)}

    epochs_estimate = None if done else StageEstimate(
        log, f"tail fine-tuning (at most {settings['epochs'] - loop.start_epoch + 1} epochs)",
        len(labels["train"]) * (settings["epochs"] - loop.start_epoch + 1))
    result = loop.run(batches, loss_fn, validate, on_batch=epochs_estimate.seen if epochs_estimate else None)
    history, best_epoch = result.history, result.best_epoch
    best_val_accuracy, best_val_loss = result.figure("val_accuracy"), result.best_value
    cache_path.unlink(missing_ok=True)  # only a resumed fine-tuning reads it; the re-embedding does not
    weights = folder / "backbone.pt"
    save_weights(backbone.model.state_dict(), weights, "the tuned backbone",
                 f"the checkpoint of epoch {int(history['epoch'].iloc[-1])} is kept")
    info = {"mode": MODE, "tail_stages": tail_stages, "best_epoch": best_epoch, "epochs_run": len(history),
            "best_val_accuracy": best_val_accuracy, "best_val_loss": best_val_loss,
            "train_photos": int(len(rows["train"])),
            "val_photos": int(len(rows["val"])), "tuned_on": "val", "pretrained_weights": index.manifest["weights"],
            **{k: settings[k] for k in ("lr", "head_lr", "weight_decay", "batch_size", "label_smoothing")}}
    write_json_atomic(folder / HEAD_META, info)
    log(f"{result.summary()}; re-embedding every photo of the index with the tuned backbone")
    tuned = create_backbone(index.manifest["backbone"], weights=weights, image_size=index.manifest["image_size"],
                            device=device)
    reembed_index(index, tuned, adapted=info, batch_size=max(32, settings["batch_size"]), num_workers=num_workers,
                  device=device, progress=progress, log=log)
    index.close()
    return AdaptResult(folder, history, best_epoch, best_val_accuracy, best_val_loss,
                       Path(index.path) / TUNED_WEIGHTS, int(len(rows["train"])), load_index(index.path, device=device))
