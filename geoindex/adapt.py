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

import copy
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
from .errors import GeoindexError
from .extraction import iter_embeddings, resolve_device
from .fileio import atomic_path, fault_point, write_json_atomic
from .heads import _LossStopping, head_folder, load_weights_file, save_curves, save_weights
from .layout import TAIL_MODE, TRUNK_CACHE

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


def _trunk_outputs(backbone, split, paths, batch_size, num_workers, device, progress, desc,
                   estimate=None) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) float16 trunk outputs of the photos, and which decoded: computed once, read every epoch."""
    trunk_backbone = dataclasses.replace(backbone, model=split.trunk, embed_dim=split.trunk_dim, _embedders={})
    out = np.zeros((len(paths), split.trunk_dim), dtype=np.float16)
    ok = np.zeros(len(paths), dtype=bool)
    for item in iter_embeddings(trunk_backbone, paths, batch_size=batch_size, num_workers=num_workers, device=device,
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


def adapt_index(index, epochs: int | None = None, lr: float | None = None, weight_decay: float | None = None,
                batch_size: int | None = None, patience: int | None = None, tail_stages: int = TAIL_STAGES,
                device="auto", num_workers=None, seed: int = 0, progress: bool = True, log=print) -> AdaptResult:
    """Fine-tune the tail of the index's backbone on its train photos (early stop on val loss), re-embed every
    photo of the index with it and swap the index for the re-embedded one. `index` is closed; the result holds
    the re-embedded index, opened, and where the curves are. Holds the index's lock throughout (geoindex.locks)."""
    from .locks import writing_to

    with writing_to(index, "train"):
        return _adapt_locked(index, epochs, lr, weight_decay, batch_size, patience, tail_stages, device, num_workers,
                             seed, progress, log)


def _adapt_locked(index, epochs, lr, weight_decay, batch_size, patience, tail_stages, device, num_workers, seed,
                  progress, log) -> AdaptResult:
    from tqdm.auto import tqdm

    from .backbones import create_backbone
    from .build import TUNED_WEIGHTS, StageEstimate, reembed_index
    from .geo_index import load_index

    if is_adapted(index):
        raise GeoindexError(f"index {index.name!r} is already adapted to its cities (its backbone's tail was fine-tuned "
                            f"on {index.manifest['adapted'].get('train_photos')} train photos); rebuild it with "
                            "`geoindex build ... --overwrite` to start again from the pretrained weights")
    if not index.store.count("val"):
        raise GeoindexError(f"index {index.name!r} has no validation split: fine-tuning needs one to know when to stop")
    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                                       "batch_size": batch_size, "patience": patience}.items() if v is not None})
    settings["head_lr"] = settings["lr"] * DEFAULTS["head_lr"] / DEFAULTS["lr"]
    device = resolve_device(device)
    backbone = create_backbone(index.manifest["backbone"], weights=index._weights_argument(),
                               image_size=index.manifest["image_size"], device=device)
    # The trunk's Embedder turns the whole net channels-last, which changes the tail's float rounding: done here
    # up front, a run that reads cached trunk features trains bit for bit as one that computed them.
    backbone.model.to(memory_format=torch.channels_last)
    split = tail_split(backbone, tail_stages)
    folder = head_folder(index, MODE)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint_path = folder / "checkpoint.pt"
    # "shuffle" names how epochs draw their order: a checkpoint of another scheme cannot resume bit for bit.
    plan = {"backbone": index.manifest["backbone"], "weights_sha256": index.manifest["weights"]["sha256"],
            "build_id": index.manifest.get("build_id"), "tail_stages": tail_stages, "seed": seed,
            "shuffle": "generator(seed, epoch)", **settings}

    torch.manual_seed(seed)
    n_classes, dim = len(index.classes), backbone.embed_dim
    head = nn.Linear(dim, n_classes).to(device)
    scale = math.sqrt(dim)  # unit-norm features, coordinates of order 1 for the linear layer
    tail = split.tail
    optimizer = torch.optim.AdamW([{"params": split.parameters, "lr": settings["lr"]},
                                   {"params": head.parameters(), "lr": settings["head_lr"]}],
                                  weight_decay=settings["weight_decay"])
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=settings["label_smoothing"])
    stopper, history, start_epoch, best_state = _LossStopping(settings["patience"]), [], 1, None
    if checkpoint_path.exists():
        state = load_weights_file(checkpoint_path, "tail fine-tuning checkpoint", map_location=device)
        if isinstance(state, dict) and state.get("plan") == json.loads(json.dumps(plan)):
            backbone.model.load_state_dict(state["model"])
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            history, start_epoch = state["history"], state["epoch"] + 1
            stopper.best_loss, stopper.best_epoch, stopper.bad = state["best"], state["best_epoch"], state["bad"]
            best_state = state["best_model"]
            log(f"resuming the tail fine-tuning after epoch {state['epoch']}")
        else:
            log("a tail fine-tuning checkpoint of other settings was found; starting over")
    done = start_epoch > settings["epochs"] or stopper.bad >= settings["patience"]

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
            for s in ("train", "val"):
                paths = meta[s]["path"].to_numpy()[rows[s]].tolist()
                features[s], ok = _trunk_outputs(backbone, split, paths, max(32, settings["batch_size"]), num_workers,
                                                 device, progress, f"trunk features ({s})", estimate)
                labels[s] = np.where(ok, meta[s]["label"].to_numpy()[rows[s]], -1).astype(np.int64)
                if s == "train" and not ok.any():
                    from .heads import _no_readable_photo
                    raise GeoindexError(_no_readable_photo(paths))
            log(f"trunk features of {len(rows['train']) + len(rows['val']):,} photos in "
                f"{time.perf_counter() - started:.0f} s")
            _write_trunk_cache(cache_path, cache_key, features, labels, log)
        log(f"training the last {tail_stages} stages of {index.manifest['backbone']}")
    # BatchNorm keeps its ImageNet statistics (a few thousand photos would only make them noisy); the
    # EfficientNet-Lite tails have no dropout, so eval mode throughout changes nothing else.
    tail.eval()

    def forward(x):
        return head(nn.functional.normalize(tail(x.to(device).float()), dim=1) * scale)

    def evaluate(s) -> tuple[float, float]:
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for start in range(0, len(labels[s]), 256):
                y = torch.as_tensor(labels[s][start:start + 256], device=device)
                logits = forward(torch.from_numpy(features[s][start:start + 256]))
                valid = y >= 0
                if valid.any():
                    total += nn.functional.cross_entropy(logits[valid], y[valid], reduction="sum").item()
                    correct += int((logits.argmax(1) == y)[valid].sum())
                    count += int(valid.sum())
        return total / max(1, count), correct / max(1, count)

    epochs_estimate = None if done else StageEstimate(
        log, f"tail fine-tuning (at most {settings['epochs'] - start_epoch + 1} epochs)",
        len(labels["train"]) * (settings["epochs"] - start_epoch + 1))
    for epoch in range(start_epoch, settings["epochs"] + 1):
        if done:
            break
        t0 = time.perf_counter()
        # Each epoch's order comes from its own generator, never the global one that DataLoaders draw from:
        # a resumed run then shuffles exactly as an uninterrupted one, whatever it computed before.
        order = torch.randperm(len(labels["train"]), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
        total, correct, count = 0.0, 0, 0
        with tqdm(range(0, len(order), settings["batch_size"]), desc=f"tail epoch {epoch}", disable=not progress,
                  leave=False, unit="batch") as bar:
            for start in bar:
                batch = np.sort(order[start:start + settings["batch_size"]])
                y = torch.as_tensor(labels["train"][batch], device=device)
                valid = y >= 0
                if not valid.any():
                    continue
                logits = forward(torch.from_numpy(features["train"][batch]))
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * int(valid.sum())
                correct += int((logits.argmax(1) == y)[valid].sum())
                count += int(valid.sum())
                epochs_estimate.seen(len(batch))
        val_loss, val_acc = evaluate("val")
        history.append({"epoch": epoch, "train_loss": total / max(1, count), "train_accuracy": correct / max(1, count),
                        "val_loss": val_loss, "val_accuracy": val_acc, "seconds": time.perf_counter() - t0})
        improved, done = stopper.update(epoch, val_loss)
        if improved:
            best_state = copy.deepcopy(backbone.model.state_dict())
        save_weights({"plan": plan, "model": backbone.model.state_dict(), "head": head.state_dict(),
                      "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                      "best": stopper.best_loss, "best_epoch": stopper.best_epoch, "bad": stopper.bad,
                      "best_model": best_state}, checkpoint_path,
                     f"the tail checkpoint of epoch {epoch}",
                     f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no epoch is kept")
        fault_point("tail-epoch")
        save_curves(pd.DataFrame(history), folder, f"{index.manifest['backbone']} tail fine-tuned ({index.name})",
                    stopper.best_epoch)
        log(f"tail epoch {epoch:2d}: train loss {history[-1]['train_loss']:.4f} acc {history[-1]['train_accuracy']:.3f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.3f}  ({history[-1]['seconds']:.0f} s)")
        if done:
            log(f"early stop: no lower val loss for {settings['patience']} epochs")
    best_epoch = stopper.best_epoch
    best_val_accuracy = next(h["val_accuracy"] for h in history if h["epoch"] == best_epoch)
    backbone.model.load_state_dict(best_state)
    cache_path.unlink(missing_ok=True)  # only a resumed fine-tuning reads it; the re-embedding does not
    weights = folder / "backbone.pt"
    save_weights(backbone.model.state_dict(), weights, "the tuned backbone",
                 f"the checkpoint of epoch {history[-1]['epoch']} is kept")
    info = {"mode": MODE, "tail_stages": tail_stages, "best_epoch": best_epoch, "epochs_run": len(history),
            "best_val_accuracy": best_val_accuracy, "best_val_loss": stopper.best_loss, "train_photos": int(len(rows["train"])),
            "val_photos": int(len(rows["val"])), "tuned_on": "val", "pretrained_weights": index.manifest["weights"],
            **{k: settings[k] for k in ("lr", "head_lr", "weight_decay", "batch_size", "label_smoothing")}}
    write_json_atomic(folder / "meta.json", info)
    log(f"kept epoch {best_epoch} (val loss {stopper.best_loss:.4f}, val accuracy {best_val_accuracy:.3f}); "
        "re-embedding every photo of the index with the tuned backbone")
    tuned = create_backbone(index.manifest["backbone"], weights=weights, image_size=index.manifest["image_size"],
                            device=device)
    reembed_index(index, tuned, adapted=info, batch_size=max(32, settings["batch_size"]), num_workers=num_workers,
                  device=device, progress=progress, log=log)
    index.close()
    return AdaptResult(folder, pd.DataFrame(history), best_epoch, best_val_accuracy, stopper.best_loss,
                       Path(index.path) / TUNED_WEIGHTS, int(len(rows["train"])), load_index(index.path, device=device))
