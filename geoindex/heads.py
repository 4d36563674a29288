"""Softmax classifier heads: a linear probe on stored embeddings, or a fine-tuned backbone.

Both are saved under `<index>/heads/<mode>/` with their training curves (CSV and PNG), and
come back as a `Classifier` that gives (N, C) probabilities like every other method.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .backbones import create_backbone
from .config import ExtractionConfig
from .errors import GeoindexError, ImageError
from .extraction import default_num_workers, resolve_device
from .fileio import atomic_path, write_json_atomic
from .images import load_image
# load_weights_file and save_curves are kept importable from here, where they were before the loop was shared.
from .training import (CHECKPOINT, VAL_ACCURACY, VAL_LOSS, Checkpointing, LoopSettings, StopOn,  # noqa: F401
                       TrainingLoop, kept_epoch_summary, load_weights_file, save_curves, save_weights)

from .layout import HEAD_BACKBONE, HEAD_META, HEAD_MODES, HEAD_WEIGHTS, HEADS, head_dir  # noqa: F401 (HEADS: imported from here too)

MODES = HEAD_MODES
DEFAULTS = {"probe": {"epochs": 30, "lr": 1e-3, "batch_size": 256},
            "finetune": {"epochs": 10, "lr": 1e-4, "batch_size": 32}}


class ProbeHead(nn.Module):
    """Standardise with the train split's statistics, then one linear layer."""

    def __init__(self, dim: int, n_classes: int, mean=None, std=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(dim) if std is None else torch.as_tensor(std, dtype=torch.float32))
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, x):
        return self.linear((x - self.mean) / self.std)


@dataclass
class TrainResult:
    mode: str
    folder: Path
    history: pd.DataFrame
    best_epoch: int
    best_val_accuracy: float | None  # None without a validation split: a training figure is never reported as one
    stop_on: StopOn = VAL_LOSS       # what chose best_epoch

    def summary(self) -> str:
        """Which epoch was kept and why, and where the head and its curves are."""
        return kept_epoch_summary(self.history, self.best_epoch, self.stop_on, self.best_val_accuracy is not None,
                                  f"head, history.csv and curves.png in {self.folder}")


def head_folder(index, mode: str) -> Path:
    return Path(index.path) / head_dir(mode)


# ---------------------------------------------------------------------------- probe
def robust_scale(x: torch.Tensor, floor_fraction: float = 0.1) -> torch.Tensor:
    """Per-dimension standard deviation, floored at a fraction of the median dimension's.

    A dimension that is (nearly) constant on a small train split would otherwise be divided by
    ~1e-6, turning any change it shows on new photos into a huge input that swamps the others.
    """
    std = x.std(0) if len(x) > 1 else torch.ones(x.shape[1])
    std = torch.nan_to_num(std, nan=0.0)
    floor = max(float(std.median()) * floor_fraction, 1e-6)
    return std.clamp_min(floor)


def fit_probe(x_train, y_train, x_val, *, y_val, n_classes: int, epochs: int = 30, lr: float = 1e-3,
              weight_decay: float = 1e-5, batch_size: int = 256, patience: int = 3, device="cpu", seed: int = 0,
              log=None, folder: Path | None = None, title: str = "", validated: bool = True,
              ) -> tuple[ProbeHead, pd.DataFrame, int, float]:
    """Train a softmax head on arrays, early-stopped on validation loss (geoindex.training's loop).

    Returns (the head of the lowest-val-loss epoch, history, that epoch, its val accuracy). With `folder`, the
    history and curves are written there; validated=False says x_val, y_val are the training photos.
    """
    device = resolve_device(device)
    x_train, x_val = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_val, dtype=torch.float32)
    y_train, y_val = torch.as_tensor(np.array(y_train)).long(), torch.as_tensor(np.array(y_val)).long()
    torch.manual_seed(seed)
    head = ProbeHead(x_train.shape[1], n_classes, x_train.mean(0), robust_scale(x_train)).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    # One generator through all epochs, not training.epoch_generator: the probe is never checkpointed, and this
    # keeps the kept epochs and figures measured before the loop was shared (benchmarks/accuracy.md).
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield x_train[idx], y_train[idx]

    def validate():
        val_logits = head(x_val.to(device))
        return {"loss": float(loss_fn(val_logits, y_val.to(device))),
                "accuracy": float((val_logits.argmax(1).cpu() == y_val).float().mean())}

    settings = LoopSettings("probe", epochs, patience, stop_on=VAL_LOSS, validated=validated, timed=False,
                            progress=False)
    loop = TrainingLoop(head, optimizer, settings, device=device, folder=folder, title=title, log=log)
    result = loop.run(batches, loss_fn, validate)
    best_acc = result.figure("val_accuracy")
    return head.cpu().eval(), result.history, result.best_epoch, float("nan") if best_acc is None else best_acc


def train_probe(index, *, epochs=None, lr=None, weight_decay=1e-5, batch_size=None, patience=3, device="cpu", seed=0,
                progress=True, log=print) -> TrainResult:
    """Train a softmax head on the index's stored train embeddings, early-stopped on validation loss.
    Holds the index's lock (geoindex.locks): the head is saved into the index it was trained for, or not at all."""
    from .features_from import refuse_training
    from .locks import writing_to

    refuse_training(index)
    defaults = DEFAULTS["probe"]
    settings = dict(epochs=epochs or defaults["epochs"], lr=lr or defaults["lr"], weight_decay=weight_decay,
                    batch_size=batch_size or defaults["batch_size"], patience=patience, device=device, seed=seed)
    with writing_to(index, "train"):
        return _train_probe_locked(index, settings, progress, log)


def _train_probe_locked(index, settings: dict, progress, log) -> TrainResult:
    store = index.store
    x_train, y_train = store.embeddings("train"), store.labels("train")
    has_val = bool(store.count("val"))
    split = "val" if has_val else "train"
    if not has_val:
        log(no_validation_split_message(index, "probe"))
    folder = head_folder(index, "probe")
    folder.mkdir(parents=True, exist_ok=True)
    head, history, best_epoch, best_acc = fit_probe(
        x_train, y_train, store.embeddings(split), y_val=store.labels(split), n_classes=len(index.classes), **settings,
        log=log if progress and has_val else None, folder=folder, validated=has_val,
        title=f"linear probe on {index.manifest['backbone']} embeddings ({index.name})")
    best_acc = best_acc if has_val else None
    with atomic_path(folder / HEAD_WEIGHTS) as tmp:
        torch.save(head.state_dict(), tmp)
    write_json_atomic(folder / HEAD_META, {"mode": "probe", "build_id": index.manifest.get("build_id"),
                                             "classes": index.classes, "embed_dim": x_train.shape[1],
                                             "best_epoch": best_epoch, "best_val_accuracy": best_acc,
                                             "validated_on": "val" if has_val else None,
                                             **{k: settings[k] for k in ("lr", "weight_decay", "batch_size")}})
    return TrainResult("probe", folder, history, best_epoch, best_acc, VAL_LOSS)


def no_validation_split_message(index, mode: str) -> str:
    """What training without a validation split means, said before it starts."""
    stop = "its epoch is chosen by the training loss, which keeps falling, so early stopping" if mode == "probe" \
        else "its epoch is chosen on the training photos, so early stopping"
    return (f"NOTE: index {index.name!r} has no validation split (too few photos or places per city): the {mode} head "
            f"is trained and checked on the same photos; {stop} barely stops anything; the backbone is not adapted "
            "(adapting stops on validation loss); kNN keeps its default "
            "k, vote and temperature, no 'unlike anything indexed' threshold is set, no fusion is fitted, and no "
            "validation accuracy exists to report. Build over more photos per city for one.")


# ---------------------------------------------------------------------------- fine-tuning
class _LabelledImages(Dataset):
    def __init__(self, paths, labels, transform, augment: bool):
        from torchvision import transforms

        self.paths, self.labels, self.transform = list(paths), np.asarray(labels), transform
        # The seed study's augmentations: colour jitter and horizontal flips on top of the resize.
        self.augment = transforms.Compose([transforms.RandomHorizontalFlip(),
                                           transforms.ColorJitter(0.2, 0.2, 0.2, 0.02)]) if augment else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = load_image(self.paths[i], draft_size=self.transform.resize_size)
        except ImageError:
            img = None
        if img is None:  # the build already dropped unreadable files; one that went bad since is masked out
            return torch.zeros(3, self.transform.image_size, self.transform.image_size, dtype=torch.uint8), -1
        if self.augment is not None:
            img = self.augment(img)
        return self.transform(img), int(self.labels[i])


def make_loader(paths, labels, transform, augment: bool, decoding: ExtractionConfig, seed: int, epoch: int,
                pin_memory: bool = False) -> DataLoader:
    """Seeded by epoch: reproducible, yet each epoch sees other flips and jitter (and another order); workers
    draw their random state from this generator, so one fixed seed would repeat the same augmentations."""
    ds = _LabelledImages(paths, labels, transform, augment)
    num_workers = default_num_workers() if decoding.num_workers is None else decoding.num_workers
    return DataLoader(ds, batch_size=decoding.batch_size, shuffle=augment, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class FineTuneModel(nn.Module):
    def __init__(self, trunk: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        return self.head(self.trunk(x))


def train_finetune(index, *, epochs=None, lr=None, weight_decay=1e-5, batch_size=None, patience=3, device="auto",
                   resume=False, num_workers=None, seed=0, progress=True, log=print) -> TrainResult:
    """Fine-tune the whole backbone with a new linear head (Adam, AMP and channels-last on a GPU), early-stopped
    on validation accuracy.

    A checkpoint is written after every epoch; resume=True continues from it. Holds the index's lock.
    """
    from .features_from import refuse_training
    from .locks import writing_to

    refuse_training(index)
    defaults = DEFAULTS["finetune"]
    settings = dict(epochs=epochs or defaults["epochs"], lr=lr or defaults["lr"], weight_decay=weight_decay,
                    batch_size=batch_size or defaults["batch_size"], patience=patience, seed=seed,
                    num_workers=default_num_workers() if num_workers is None else num_workers)
    with writing_to(index, "train"):
        return _train_finetune_locked(index, settings, resolve_device(device), resume, progress, log)


def _train_finetune_locked(index, settings: dict, device, resume, progress, log) -> TrainResult:
    folder = head_folder(index, "finetune")
    if (folder / CHECKPOINT).exists() and not resume:  # said before the backbone is loaded (seconds to minutes)
        raise GeoindexError(f"a fine-tuning checkpoint exists in {folder}; pass --resume to continue it, "
                            "or delete that folder to start over")
    backbone = create_backbone(index.manifest["backbone"], weights=index._weights_argument(),
                               image_size=index.manifest["image_size"])
    torch.manual_seed(settings["seed"])
    model = FineTuneModel(backbone.model, backbone.embed_dim, len(index.classes)).to(device)
    use_amp = device.type == "cuda"
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    meta = {s: index.store.metadata(s) for s in ("train", "val")}
    has_val = len(meta["val"]) > 0
    loop_settings = LoopSettings("fine-tune", settings["epochs"], settings["patience"], stop_on=VAL_ACCURACY,
                                 validated=has_val, amp=use_amp, progress=progress)
    loop = TrainingLoop(model, optimizer, loop_settings, device=device, folder=folder, log=log,
                        title=f"fine-tuned {index.manifest['backbone']} ({index.name})",
                        checkpoint=Checkpointing("fine-tuning", "train-epoch", resume=bool(resume)))
    folder.mkdir(parents=True, exist_ok=True)
    if not has_val:
        log(no_validation_split_message(index, "finetune"))
        meta["val"] = meta["train"]
    if not any(os.path.isfile(p) for p in meta["train"]["path"]):
        raise GeoindexError(_no_readable_photo(meta["train"]["path"]))

    decoding = ExtractionConfig(batch_size=settings["batch_size"], num_workers=settings["num_workers"], device=device)

    def loader(split, augment, epoch):
        return make_loader(meta[split]["path"], meta[split]["label"], backbone.transform, augment, decoding,
                           settings["seed"], epoch, pin_memory=use_amp)

    def forward(images):
        x = backbone.normalize(images)
        return model(x.contiguous(memory_format=torch.channels_last) if use_amp else x)

    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    result = loop.run(lambda epoch: loader("train", True, epoch), loss_fn,
                      lambda: loop.evaluate(loader("val", False, 0), loss_fn, forward), forward=forward,
                      nothing_learned=lambda: _no_readable_photo(meta["train"]["path"]))
    last = f"the checkpoint of epoch {int(result.history['epoch'].iloc[-1])} is kept"
    save_weights(model.trunk.state_dict(), folder / "backbone.pt", "the fine-tuned backbone", last)
    save_weights(model.head.state_dict(), folder / HEAD_WEIGHTS, "the fine-tuned head", last)
    best_acc = result.figure("val_accuracy")
    write_json_atomic(folder / HEAD_META, {"mode": "finetune", "build_id": index.manifest.get("build_id"),
                                             "classes": index.classes, "backbone": index.manifest["backbone"],
                                             "embed_dim": backbone.embed_dim, "best_epoch": result.best_epoch,
                                             "best_val_accuracy": best_acc,
                                             "validated_on": "val" if has_val else None,
                                             **{k: settings[k] for k in ("lr", "weight_decay", "batch_size")},
                                             "amp": use_amp})
    return TrainResult("finetune", folder, result.history, result.best_epoch, best_acc, VAL_ACCURACY)


def _no_readable_photo(paths) -> str:
    paths = list(paths)
    example = ""
    for path in paths[:1]:
        try:
            load_image(path)
        except ImageError as exc:
            example = f" (e.g. {path}: {exc})"
    return (f"none of the {len(paths)} training photos could be read{example}; nothing was trained or saved. "
            "The index stores absolute paths: run where its photos are, or rebuild it")


# ---------------------------------------------------------------------------- inference
class Classifier:
    """A trained head of an index, giving (N, C) probabilities for embeddings, images, or a stored split."""

    def __init__(self, index, mode: str, device="cpu"):
        self.index, self.mode = index, mode
        self.folder = head_folder(index, mode)
        try:
            self.meta = json.loads((self.folder / HEAD_META).read_text())
            self.meta["classes"], self.meta["embed_dim"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GeoindexError(f"the {mode} head in {self.folder} is damaged ({type(exc).__name__} in meta.json); "
                                "retrain it or delete that folder") from None
        if self.meta.get("build_id") not in (None, index.manifest.get("build_id")):
            # Heads are saved with the build they read: one beside another build's embeddings came from a race
            # or a copy, and would answer with confidence about features it never saw.
            raise GeoindexError(f"the {mode} head in {self.folder} was trained for another build of index "
                                f"{index.name!r}; retrain it (`geoindex train --index {index.name}`) or delete that "
                                "folder")
        if self.meta["classes"] != index.classes:
            raise GeoindexError(f"the {mode} head in {self.folder} was trained for other classes; retrain it")
        self.device = resolve_device(device)
        dim, n = self.meta["embed_dim"], len(index.classes)
        state = load_weights_file(self.folder / HEAD_WEIGHTS, f"{mode} head")
        self.head = (ProbeHead(dim, n) if mode == "probe" else nn.Linear(dim, n))
        try:
            self.head.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise GeoindexError(f"the {mode} head {self.folder / HEAD_WEIGHTS} does not fit this index "
                                f"({str(exc).splitlines()[0][:120]}); retrain it") from None
        self.head.to(self.device).eval()
        self._backbone = None

    @property
    def backbone(self):
        """The backbone whose features the head reads: the index's own (probe) or the fine-tuned one."""
        if self._backbone is None:
            if self.mode == "probe":
                self._backbone = self.index.backbone
            else:
                self._backbone = create_backbone(self.index.manifest["backbone"], weights=self.folder / HEAD_BACKBONE,
                                                 image_size=self.index.manifest["image_size"], device=self.device)
        return self._backbone

    @torch.no_grad()
    def predict_features(self, features: np.ndarray) -> np.ndarray:
        logits = self.head(torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device))
        return logits.softmax(1).cpu().numpy().astype(np.float64)


def available_heads(index) -> list[str]:
    return [m for m in MODES if (head_folder(index, m) / HEAD_META).is_file()]


def load_best_classifier(index, device="cpu") -> Classifier | None:
    """The trained head with the best validation accuracy (a fine-tuned head that lost to the probe on val is
    not used); None when none is trained."""
    heads = [Classifier(index, m, device) for m in available_heads(index)]
    return max(heads, key=lambda c: float(c.meta.get("best_val_accuracy") or 0.0), default=None)


def load_classifier(index, mode: str | None = None, device="cpu") -> Classifier | None:
    """The requested head, else the fine-tuned one, else the probe; None when none is trained."""
    modes = [mode] if mode else ["finetune", "probe"]
    for m in modes:
        if (head_folder(index, m) / HEAD_META).is_file():
            return Classifier(index, m, device)
    return None
