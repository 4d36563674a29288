"""Softmax classifier heads: a linear probe on stored embeddings, or a fine-tuned backbone.

Both are saved under `<index>/heads/<mode>/` with their training curves (CSV and PNG), and
come back as a `Classifier` that gives (N, C) probabilities like every other method.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .backbones import create_backbone
from .errors import GeoindexError, ImageError
from .extraction import default_num_workers, resolve_device
from .fileio import atomic_path, fault_point, write_json_atomic
from .images import load_image

from .layout import HEAD_BACKBONE, HEAD_META, HEAD_MODES, HEAD_WEIGHTS, HEADS, head_dir  # noqa: F401 (HEADS: imported from here too)

MODES = HEAD_MODES
DEFAULTS = {"probe": {"epochs": 30, "lr": 1e-3, "batch_size": 256},
            "finetune": {"epochs": 10, "lr": 1e-4, "batch_size": 32}}


def load_weights_file(path, what: str, map_location="cpu"):
    """torch.load that never runs code from the file (weights_only=True); a planted or damaged file is one clear line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, zip errors, truncation: all "not a weights file"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise GeoindexError(f"refusing {what} {path}: not a plain weights file ({first}); it was not loaded and "
                            "nothing in it ran. Delete it (or retrain) to go on") from None


def save_weights(obj, path: Path, what: str, kept: str) -> None:
    """torch.save, atomically; a full disk is one line saying what is kept (torch reports it without an errno,
    as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos` or `basic_ios::clear`)."""
    import shutil

    from .build import _is_disk_full

    folder = Path(path).parent
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except (OSError, RuntimeError) as exc:
            # Judged while the partial file still holds the space it took: after its removal the disk looks fine.
            try:
                full = shutil.disk_usage(folder).free < (4 << 20)
            except OSError:
                full = False
            if not (full or _is_disk_full(exc)):
                raise
            raise GeoindexError(f"disk full: {what} could not be written to {folder}; {kept}; free some space and "
                                "rerun the same command to resume") from None


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


def head_folder(index, mode: str) -> Path:
    return Path(index.path) / head_dir(mode)


def save_curves(history: pd.DataFrame, folder: Path, title: str, kept_epoch: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(folder / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        ax_loss.plot(history["epoch"], history[f"{split}_loss"], marker="o", label=split)
        ax_acc.plot(history["epoch"], history[f"{split}_accuracy"], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    from matplotlib.ticker import MaxNLocator
    epochs = history["epoch"].tolist()
    for ax in (ax_loss, ax_acc):
        # Epochs are whole numbers: a tick at each when they are few (MaxNLocator(integer=True) still draws 0.96,
        # 0.98, ... around a single epoch), whole-number ticks when they are many.
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if kept_epoch:
            ax.axvline(kept_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept: epoch {kept_epoch}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(folder / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


class _EarlyStopping:
    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.bad = patience, -1.0, 0, 0

    def update(self, epoch: int, val_accuracy: float) -> tuple[bool, bool]:
        """(improved, stop)"""
        if val_accuracy > self.best:
            self.best, self.best_epoch, self.bad = val_accuracy, epoch, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience


class _LossStopping:
    """Early stopping on validation loss: accuracy on a small val split saturates in a few epochs
    while the probabilities (and so ranking, fusion and calibration) keep improving."""

    def __init__(self, patience: int, min_delta: float = 1e-4):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.bad = float("inf"), 0, 0

    def update(self, epoch: int, val_loss: float) -> tuple[bool, bool]:
        """(improved, stop)"""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad = val_loss, epoch, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience


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


def fit_probe(x_train, y_train, x_val, y_val, n_classes: int, epochs: int = 30, lr: float = 1e-3,
              weight_decay: float = 1e-5, batch_size: int = 256, patience: int = 3, device="cpu", seed: int = 0,
              log=None) -> tuple[ProbeHead, pd.DataFrame, int, float]:
    """Train a softmax head on arrays, early-stopped on validation loss.

    Returns (the head of the lowest-val-loss epoch, history, that epoch, its val accuracy).
    """
    device = resolve_device(device)
    x_train, x_val = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_val, dtype=torch.float32)
    y_train, y_val = torch.as_tensor(np.array(y_train)).long(), torch.as_tensor(np.array(y_val)).long()
    torch.manual_seed(seed)
    head = ProbeHead(x_train.shape[1], n_classes, x_train.mean(0), robust_scale(x_train)).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    stopper, rows, best_state, best_acc = _LossStopping(patience), [], None, float("nan")
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        head.train()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            logits = head(xb)
            loss = loss_fn(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        head.eval()
        with torch.no_grad():
            val_logits = head(x_val.to(device))
            val_loss = float(loss_fn(val_logits, y_val.to(device)))
            val_acc = float((val_logits.argmax(1).cpu() == y_val).float().mean())
        rows.append({"epoch": epoch, "train_loss": total_loss / len(order), "train_accuracy": correct / len(order),
                     "val_loss": val_loss, "val_accuracy": val_acc})
        improved, stop = stopper.update(epoch, val_loss)
        if improved:
            best_state, best_acc = {k: v.detach().clone() for k, v in head.state_dict().items()}, val_acc
        if log:
            log(f"probe epoch {epoch:3d}: train loss {rows[-1]['train_loss']:.4f} acc {rows[-1]['train_accuracy']:.3f}"
                f"  val loss {val_loss:.4f} acc {val_acc:.3f}")
        if stop:
            break
    if best_state is not None:  # None only when val loss was never finite
        head.load_state_dict(best_state)
    return head.cpu().eval(), pd.DataFrame(rows), stopper.best_epoch, best_acc


def train_probe(index, epochs=None, lr=None, weight_decay=1e-5, batch_size=None, patience=3, device="cpu", seed=0,
                progress=True, log=print) -> TrainResult:
    """Train a softmax head on the index's stored train embeddings, early-stopped on validation loss.
    Holds the index's lock (geoindex.locks): the head is saved into the index it was trained for, or not at all."""
    from .locks import writing_to

    with writing_to(index, "train"):
        return _train_probe_locked(index, epochs, lr, weight_decay, batch_size, patience, device, seed, progress, log)


def _train_probe_locked(index, epochs, lr, weight_decay, batch_size, patience, device, seed, progress,
                        log) -> TrainResult:
    defaults = DEFAULTS["probe"]
    epochs, lr, batch_size = epochs or defaults["epochs"], lr or defaults["lr"], batch_size or defaults["batch_size"]
    store = index.store
    x_train, y_train = store.embeddings("train"), store.labels("train")
    has_val = bool(store.count("val"))
    split = "val" if has_val else "train"
    if not has_val:
        log(no_validation_split_message(index, "probe"))
    head, history, best_epoch, best_acc = fit_probe(x_train, y_train, store.embeddings(split), store.labels(split),
                                                    len(index.classes), epochs, lr, weight_decay, batch_size, patience,
                                                    device, seed, log if progress and has_val else None)
    if not has_val:  # what was measured on the training photos is not a validation figure: none is kept as one
        history["val_loss"], history["val_accuracy"], best_acc = float("nan"), float("nan"), None
    folder = head_folder(index, "probe")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "head.pt") as tmp:
        torch.save(head.state_dict(), tmp)
    save_curves(history, folder, f"linear probe on {index.manifest['backbone']} embeddings ({index.name})", best_epoch)
    write_json_atomic(folder / "meta.json", {"mode": "probe", "build_id": index.manifest.get("build_id"),
                                             "classes": index.classes, "embed_dim": x_train.shape[1],
                                             "best_epoch": best_epoch, "best_val_accuracy": best_acc,
                                             "validated_on": "val" if has_val else None,
                                             "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size})
    return TrainResult("probe", folder, history, best_epoch, best_acc)


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


def make_loader(paths, labels, transform, augment: bool, batch_size: int, num_workers: int, seed: int, epoch: int,
                pin_memory: bool = False) -> DataLoader:
    """Seeded by epoch: reproducible, yet each epoch sees other flips and jitter (and another order); workers
    draw their random state from this generator, so one fixed seed would repeat the same augmentations."""
    ds = _LabelledImages(paths, labels, transform, augment)
    return DataLoader(ds, batch_size=batch_size, shuffle=augment, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class FineTuneModel(nn.Module):
    def __init__(self, trunk: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        return self.head(self.trunk(x))


def train_finetune(index, epochs=None, lr=None, weight_decay=1e-5, batch_size=None, patience=3, device="auto",
                   resume=False, num_workers=None, seed=0, progress=True, log=print) -> TrainResult:
    """Fine-tune the whole backbone with a new linear head (Adam, AMP and channels-last on a GPU).

    A checkpoint is written after every epoch; resume=True continues from it. Holds the index's lock.
    """
    from .locks import writing_to

    with writing_to(index, "train"):
        return _train_finetune_locked(index, epochs, lr, weight_decay, batch_size, patience, device, resume,
                                      num_workers, seed, progress, log)


def _train_finetune_locked(index, epochs, lr, weight_decay, batch_size, patience, device, resume, num_workers, seed,
                           progress, log) -> TrainResult:
    from tqdm.auto import tqdm

    defaults = DEFAULTS["finetune"]
    epochs, lr, batch_size = epochs or defaults["epochs"], lr or defaults["lr"], batch_size or defaults["batch_size"]
    device = resolve_device(device)
    folder = head_folder(index, "finetune")
    checkpoint_path = folder / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise GeoindexError(f"a fine-tuning checkpoint exists in {folder}; pass --resume to continue it, "
                            "or delete that folder to start over")
    backbone = create_backbone(index.manifest["backbone"], weights=index._weights_argument(),
                               image_size=index.manifest["image_size"])
    torch.manual_seed(seed)
    model = FineTuneModel(backbone.model, backbone.embed_dim, len(index.classes)).to(device)
    use_amp = device.type == "cuda"
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(enabled=use_amp)
    stopper, rows, start_epoch = _EarlyStopping(patience), [], 1
    if resume and checkpoint_path.exists():
        state = load_weights_file(checkpoint_path, "fine-tuning checkpoint", map_location=device)
        if not isinstance(state, dict) or not {"model", "optimizer", "scaler", "epoch", "history"} <= set(state):
            raise GeoindexError(f"refusing fine-tuning checkpoint {checkpoint_path}: not one geoindex wrote; delete it "
                                "to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rows, start_epoch = state["history"], state["epoch"] + 1
        stopper.best, stopper.best_epoch, stopper.bad = state["best"], state["best_epoch"], state["bad"]
        if "rng" in state:  # augmentations continue exactly as an uninterrupted run would draw them
            torch.set_rng_state(state["rng"])
        log(f"resuming fine-tuning after epoch {state['epoch']}")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {s: index.store.metadata(s) for s in ("train", "val")}
    has_val = len(meta["val"]) > 0
    if not has_val:
        log(no_validation_split_message(index, "finetune"))
        meta["val"] = meta["train"]
    checked_on = "val" if has_val else "train (no val split)"
    if not any(os.path.isfile(p) for p in meta["train"]["path"]):
        raise GeoindexError(_no_readable_photo(meta["train"]["path"]))
    num_workers = default_num_workers() if num_workers is None else num_workers

    def loader(split, augment, epoch):
        return make_loader(meta[split]["path"], meta[split]["label"], backbone.transform, augment, batch_size,
                           num_workers, seed, epoch, pin_memory=use_amp)

    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)

    def run_epoch(data, train: bool, desc: str):
        model.train(train)
        total_loss, correct, count = 0.0, 0, 0
        with torch.set_grad_enabled(train), tqdm(data, desc=desc, disable=not progress, leave=False) as bar:
            for images, labels in bar:
                x = backbone.normalize(images.to(device, non_blocking=True))
                if use_amp:
                    x = x.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    logits = model(x)
                    loss = loss_fn(logits.float(), labels)
                if train:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                valid = labels >= 0
                total_loss += loss.item() * int(valid.sum())
                correct += int((logits.argmax(1) == labels)[valid].sum())
                count += int(valid.sum())
        return total_loss / max(1, count), correct / max(1, count), count

    for epoch in range(start_epoch, epochs + 1):
        started = time.perf_counter()
        train_loss, train_acc, seen = run_epoch(loader("train", True, epoch), True, f"fine-tune epoch {epoch}")
        if seen == 0:
            raise GeoindexError(_no_readable_photo(meta["train"]["path"]))
        val_loss, val_acc, _ = run_epoch(loader("val", False, 0), False, "validation")
        rows.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
                     "val_accuracy": val_acc, "seconds": time.perf_counter() - started})
        improved, stop = stopper.update(epoch, val_acc)
        if improved:
            with atomic_path(folder / "backbone.pt") as tmp:
                torch.save(model.trunk.state_dict(), tmp)
            with atomic_path(folder / "head.pt") as tmp:
                torch.save(model.head.state_dict(), tmp)
        with atomic_path(checkpoint_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "epoch": epoch, "history": rows, "best": stopper.best, "best_epoch": stopper.best_epoch,
                        "bad": stopper.bad, "rng": torch.get_rng_state()}, tmp)
        fault_point("train-epoch")
        save_curves(pd.DataFrame(rows), folder, f"fine-tuned {index.manifest['backbone']} ({index.name})",
                    stopper.best_epoch)
        log(f"fine-tune epoch {epoch:3d}: train loss {train_loss:.4f} acc {train_acc:.3f}  "
            f"{checked_on} loss {val_loss:.4f} acc {val_acc:.3f}  ({rows[-1]['seconds']:.0f} s)")
        if stop:
            log(f"early stop: no val improvement for {patience} epochs")
            break
    write_json_atomic(folder / "meta.json", {"mode": "finetune", "build_id": index.manifest.get("build_id"),
                                             "classes": index.classes, "backbone": index.manifest["backbone"],
                                             "embed_dim": backbone.embed_dim, "best_epoch": stopper.best_epoch,
                                             "best_val_accuracy": stopper.best if has_val else None,
                                             "validated_on": "val" if has_val else None,
                                             "lr": lr, "weight_decay": weight_decay,
                                             "batch_size": batch_size, "amp": use_amp})
    return TrainResult("finetune", folder, pd.DataFrame(rows), stopper.best_epoch, stopper.best if has_val else None)


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
            raise GeoindexError(f"the {mode} head {self.folder / 'head.pt'} does not fit this index "
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
