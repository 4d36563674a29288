"""The one training loop: epochs, early stopping, checkpoint and exact resume, history, curves and progress.

The linear probe, the whole-backbone fine-tuning and the tail adaptation each supply only their model, their
batches, their loss and their validation; what an epoch does around them is written here once:

* early stopping on a pluggable criterion (`StopOn`: a history column or a function of the epoch's row, and
  whether higher is better), keeping the best epoch's weights and loading them back at the end;
* after every epoch, optionally, a checkpoint (model, optimizer, AMP scaler, history, stopping state, the best
  weights and the global RNG, which augmentations draw from) written atomically, with a full disk said in one
  line; a rerun resumes from it bit for bit (`Checkpointing`);
* `history.csv` and `curves.png` in the training's folder, and one log line an epoch;
* without a validation split (`LoopSettings.validated=False`) the epoch is still chosen on what `validate`
  measured (the training photos), but nothing measured there is stored or reported as a validation figure.

Randomness a resumed run must repeat comes from `epoch_generator(seed, epoch)`, never from a generator carried
from epoch to epoch.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .layout import CHECKPOINT, CURVES, HISTORY
from .build import _is_disk_full
from .errors import GeoindexError
from .fileio import atomic_path, fault_point

CHECKPOINT = CHECKPOINT
CHECKPOINT_FORMAT = "geoindex-training-loop-1"  # a checkpoint of another layout is never resumed


# ---------------------------------------------------------------------------- files
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


def save_curves(history: pd.DataFrame, folder: Path, title: str, kept_epoch: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with atomic_path(folder / HISTORY) as tmp:
        history.to_csv(tmp, index=False)
    # One panel per figure measured on both splits: loss and accuracy for a classifier, whatever else a
    # criterion adds (a recall) beside them.
    figures = [c[len("train_"):] for c in history.columns if c.startswith("train_") and f"val_{c[6:]}" in history]
    figures = figures or ["loss"]
    # Figures only validation measures (a revisit recall) share one panel
    val_only = [c for c in history.columns if c.startswith("val_") and f"train_{c[4:]}" not in history]
    if val_only and history[val_only].notna().any().any():
        figures.append(None)
    fig, axes = plt.subplots(1, len(figures), figsize=(5 * len(figures), 4), squeeze=False)
    epochs = history["epoch"].tolist()
    for ax, figure in zip(axes[0], figures):
        if figure is None:
            for column in val_only:
                ax.plot(history["epoch"], history[column], marker="o", label=_figure_name(column[len("val_"):]))
            ax.set(xlabel="epoch", ylabel="share of val queries", title="val revisits", ylim=(0, 1))
        for split in ("train", "val") if figure is not None else ():
            if f"{split}_{figure}" in history:
                ax.plot(history["epoch"], history[f"{split}_{figure}"], marker="o", label=split)
        if figure == "loss":
            ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        elif figure == "accuracy":
            ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
        elif figure is not None:
            ax.set(xlabel="epoch", ylabel=figure, title=figure)
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
    with atomic_path(folder / CURVES) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _figure_name(column: str) -> str:
    """"r5_25m" -> "recall@5 within 25 m"; other names as they are."""
    import re

    found = re.fullmatch(r"r(\d+)_(\d+)m", column)
    return f"recall@{found[1]} within {found[2]} m" if found else column.replace("_", " ")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random source of one epoch (its order, a DataLoader's workers): a resumed run draws exactly what an
    uninterrupted one would, whatever ran before it."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class StopOn:
    """What early stopping watches: a history column (`"val_loss"`) or a function of the epoch's row, and whether
    higher is better. An epoch counts as better only past `min_delta`."""
    metric: str | Callable[[dict], float] = "val_loss"
    higher_is_better: bool = False
    min_delta: float = 0.0
    label: str = "validation loss"   # how messages name it
    note: str = ""                   # why it, when another epoch was more accurate

    def value(self, row: dict) -> float:
        return float(self.metric(row) if callable(self.metric) else row[self.metric])

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return value == value  # not NaN
        return value > best + self.min_delta if self.higher_is_better else value < best - self.min_delta


# Accuracy on a small val split saturates in a few epochs while the probabilities (and so ranking, fusion and
# calibration) keep improving: the probe and the tail stop on the loss.
VAL_LOSS = StopOn("val_loss", higher_is_better=False, min_delta=1e-4, label="validation loss",
                  note="loss also weighs how sure each answer is, which ranking, fusion and the unlike-anything "
                       "threshold use")
VAL_ACCURACY = StopOn("val_accuracy", higher_is_better=True, min_delta=0.0, label="validation accuracy")


@dataclass(frozen=True)
class LoopSettings:
    """How one training runs; the training modes' own settings (learning rates, batch sizes) stay theirs."""
    name: str                  # "probe", "fine-tune", "tail": names its log lines, bars and checkpoint
    epochs: int
    patience: int              # epochs without a better criterion before stopping
    stop_on: StopOn = VAL_LOSS
    validated: bool = True     # False: `validate` measures training photos; no figure of it is kept as validation
    amp: bool = False          # float16 autocast with a gradient scaler (a GPU)
    train_mode: bool = True    # False: modules stay in eval mode throughout (BatchNorm statistics frozen)
    timed: bool = True         # a `seconds` column and figure an epoch
    progress: bool = True      # a progress bar an epoch
    track_accuracy: bool = True  # outputs are class logits: count correct answers


@dataclass(frozen=True)
class Checkpointing:
    """A checkpoint after every epoch in the training's folder, and how a rerun treats one it finds there."""
    what: str                  # "tail fine-tuning": names it in the resume and refusal lines
    fault_point: str           # the test suite's kill hook, reached right after each checkpoint is written
    plan: dict | None = None   # what a checkpoint must have been written for to be resumed (None: any)
    # None: resume one of the same plan, start over otherwise; False: refuse to overwrite one; True: resume it.
    resume: bool | None = None


@dataclass
class LoopResult:
    history: pd.DataFrame      # what may be reported: validation columns are NaN without a validation split
    best_epoch: int            # 0 when no epoch ever gave a usable criterion (the last weights are kept)
    best_value: float | None   # the criterion at that epoch; None without a validation split
    stop_on: StopOn
    validated: bool
    stopped_early: bool = False
    best_row: dict = field(default_factory=dict)

    def figure(self, column: str) -> float | None:
        """A figure of the kept epoch (`val_accuracy`), None when it is not a validation figure or absent."""
        value = self.best_row.get(column)
        return None if value is None or value != value else float(value)

    def summary(self, where: str = "") -> str:
        return kept_epoch_summary(self.history, self.best_epoch, self.stop_on, self.validated, where)


def kept_epoch_summary(history: pd.DataFrame, best_epoch: int, stop_on: StopOn = VAL_LOSS, validated: bool = True,
                       where: str = "") -> str:
    """Which epoch was kept and why, with its validation figures; never a training figure as a validation one."""
    tail = f"; {where}" if where else ""
    if not validated:
        return (f"no validation split: kept epoch {best_epoch} of {len(history)}, chosen on the training photos; no "
                f"validation accuracy exists{tail}")
    rows = history[history["epoch"] == best_epoch]
    if rows.empty:
        return f"no epoch gave a usable {stop_on.label}: the last epoch's weights are kept{tail}"
    row = rows.iloc[0]
    value = stop_on.value(row.to_dict())
    direction = "highest" if stop_on.higher_is_better else "lowest"
    if stop_on.metric == "val_accuracy":
        why = f"the highest validation accuracy ({value:.3f})"
    else:
        why = f"the {direction} {stop_on.label} ({value:.4f})"
        if "val_accuracy" in history:
            accuracy = float(row["val_accuracy"])
            why += f"; its validation accuracy {accuracy:.3f}"
            best = history.loc[history["val_accuracy"].idxmax()]
            if best["val_accuracy"] > accuracy:  # another epoch was more accurate: say which, and why not it
                why += f" (epoch {int(best['epoch'])} reached {best['val_accuracy']:.3f}" + (
                    f", but {stop_on.note})" if stop_on.note else ")")
    return f"kept epoch {best_epoch} of {len(history)}, the one with {why}{tail}"


# ---------------------------------------------------------------------------- the loop
def _describe(row: dict, prefix: str) -> str:
    short = {"loss": "loss", "accuracy": "acc"}
    parts = []
    for key, value in row.items():
        if key.startswith(prefix + "_"):
            name = key[len(prefix) + 1:]
            parts.append(f"{short.get(name, name)} {value:.4f}" if name == "loss"
                         else f"{short.get(name, name)} {value:.3f}")
    return " ".join(parts)


class TrainingLoop:
    """Trains `model` with `optimizer` epoch by epoch (see the module's docstring).

    With `checkpoint`, the checkpoint in `folder` is read at construction (see `Checkpointing.resume`); `finished`
    then says whether a resumed run has nothing left to train, so a caller can skip preparing its batches.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: LoopSettings, *, device="cpu",
                 folder: Path | None = None, title: str = "", checkpoint: Checkpointing | None = None,
                 log: Callable[[str], None] | None = None):
        self.model, self.optimizer, self.settings = model, optimizer, settings
        self.device = torch.device(device)
        self.folder, self.title, self.checkpointing = (Path(folder) if folder else None), title, checkpoint
        self.log = log or (lambda message: None)
        self.scaler = torch.amp.GradScaler(enabled=settings.amp)
        self.rows: list[dict] = []          # as measured (a no-val run's checks included), for the checkpoint
        self.best: float | None = None
        self.best_epoch, self.bad, self.start_epoch = 0, 0, 1
        self.best_state: dict | None = None
        if checkpoint is not None:
            if self.folder is None:
                raise ValueError("checkpointing needs a folder")
            self._restore()

    # -------------------------------------------------------------- checkpoint
    @property
    def checkpoint_path(self) -> Path:
        return self.folder / CHECKPOINT

    @property
    def finished(self) -> bool:
        return self.start_epoch > self.settings.epochs or self.bad >= self.settings.patience

    def _plan(self):
        plan = self.checkpointing.plan
        return None if plan is None else json.loads(json.dumps(plan))

    def _restore(self) -> None:
        spec, path = self.checkpointing, self.checkpoint_path
        if not path.exists():
            return
        if spec.resume is False:
            raise GeoindexError(f"a {spec.what} checkpoint exists in {self.folder}; pass --resume to continue it, "
                                "or delete that folder to start over")
        state = load_weights_file(path, f"{spec.what} checkpoint", map_location=self.device)
        ours = isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT
        if spec.resume is None and not (ours and state.get("plan") == self._plan()):
            self.log(f"a {spec.what} checkpoint of other settings was found; starting over")
            return
        if not ours:
            raise GeoindexError(f"refusing {spec.what} checkpoint {path}: not one this version of geoindex wrote; "
                                "delete it to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when written without AMP
            self.scaler.load_state_dict(state["scaler"])
        self.rows, self.start_epoch = list(state["history"]), state["epoch"] + 1
        self.best, self.best_epoch, self.bad = state["best"], state["best_epoch"], state["bad"]
        # None: the best epoch was the checkpoint's own, whose weights are "model".
        self.best_state = state["best_model"] if state["best_model"] is not None else (
            copy.deepcopy(self.model.state_dict()) if self.best_epoch == state["epoch"] else None)
        # augmentations (CPU) and dropout (the device's generator) continue exactly as an uninterrupted run draws
        # them; map_location moved the saved states to the device, and set_rng_state takes CPU bytes only
        torch.set_rng_state(state["rng"].cpu())
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.log(f"resuming the {spec.what} after epoch {state['epoch']}")

    def _save_checkpoint(self, epoch: int) -> None:
        spec = self.checkpointing
        save_weights({"format": CHECKPOINT_FORMAT, "plan": self._plan(), "epoch": epoch, "history": self.rows,
                      "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scaler": self.scaler.state_dict(), "best": self.best, "best_epoch": self.best_epoch,
                      "bad": self.bad, "best_model": None if self.best_epoch == epoch else self.best_state,
                      "rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                     self.checkpoint_path,
                     f"the {self.settings.name} checkpoint of epoch {epoch}",
                     f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no epoch is kept")
        fault_point(spec.fault_point)

    # -------------------------------------------------------------- epochs
    def _batches(self, batches: Iterable, loss_fn, forward, train: bool, desc: str, on_batch=None) -> dict:
        """One pass; returns {"loss", "accuracy"} averaged over the examples whose label is not -1, and "count".

        Targets are a label per example, or a (B, C) table whose column 0 is the label and whose other columns are
        what the loss needs besides (a photo's row, for a loss over pairs); outputs are logits, or a tuple whose
        first item is the logits (and the rest what the loss reads, such as the embeddings)."""
        from tqdm.auto import tqdm

        forward = forward or self.model
        amp = self.settings.amp
        total, correct, count = 0.0, 0, 0
        with torch.set_grad_enabled(train), tqdm(batches, desc=desc, disable=not self.settings.progress,
                                                 leave=False, unit="batch") as bar:
            for x, y in bar:
                y = y.to(self.device, non_blocking=True)
                labels = y if y.dim() == 1 else y[:, 0]
                valid = labels >= 0
                if not bool(valid.any()):  # every photo of the batch unreadable: nothing to learn, no NaN loss
                    continue
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=amp):
                    out = forward(x.to(self.device, non_blocking=True))
                    out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
                    loss = loss_fn(out, y)
                logits = out[0] if isinstance(out, tuple) else out
                if train:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                n = int(valid.sum())
                total += loss.item() * n
                if self.settings.track_accuracy:
                    correct += int((logits.argmax(1) == labels)[valid].sum())
                count += n
                if on_batch is not None:
                    on_batch(len(y))
        figures = {"loss": total / max(1, count)}
        if self.settings.track_accuracy:
            figures["accuracy"] = correct / max(1, count)
        return {**figures, "count": count}

    def evaluate(self, batches: Iterable, loss_fn, forward=None, desc: str = "validation") -> dict:
        """A validation pass averaged as training is (for a `validate` that has batches)."""
        figures = self._batches(batches, loss_fn, forward, False, desc)
        figures.pop("count")
        return figures

    def run(self, train_batches: Callable[[int], Iterable], loss_fn, validate: Callable[[], dict], *, forward=None,
            on_batch: Callable[[int], None] | None = None,
            nothing_learned: Callable[[], str] | None = None) -> LoopResult:
        """Train from the next epoch until `epochs` or early stopping, then load the best epoch's weights.

        train_batches(epoch) gives (inputs, labels) pairs (label -1: an example to skip); loss_fn(outputs, labels)
        the loss; validate() the validation figures ({"loss": ..., "accuracy": ...}), called under no_grad with the
        model in eval mode. `nothing_learned()` is the error when an epoch had no usable example.
        """
        s = self.settings
        written_epoch = None
        for epoch in range(self.start_epoch, s.epochs + 1):
            if self.finished:
                break
            started = time.perf_counter()
            self.model.train(s.train_mode)
            trained = self._batches(train_batches(epoch), loss_fn, forward, True, f"{s.name} epoch {epoch}", on_batch)
            if trained.pop("count") == 0 and nothing_learned is not None:
                raise GeoindexError(nothing_learned())
            self.model.eval()
            with torch.no_grad():
                checked = validate()
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in trained.items()},
                   **{f"val_{k}": v for k, v in checked.items()}}
            if s.timed:
                row["seconds"] = time.perf_counter() - started
            self.rows.append(row)
            value = s.stop_on.value(row)
            if s.stop_on.better(value, self.best):
                self.best, self.best_epoch, self.bad = value, epoch, 0
                self.best_state = copy.deepcopy(self.model.state_dict())
            else:
                self.bad += 1
            if self.checkpointing is not None:
                self._save_checkpoint(epoch)
            if self.folder is not None and self.checkpointing is not None:
                save_curves(self.history(), self.folder, self.title, self.best_epoch)
                written_epoch = epoch
            self.log(f"{s.name} epoch {epoch:2d}: train {_describe(row, 'train')}  "
                     f"{'val' if s.validated else 'train (no val split)'} {_describe(row, 'val')}"
                     + (f"  ({row['seconds']:.0f} s)" if s.timed else ""))
            if self.bad >= s.patience:
                better = "higher" if s.stop_on.higher_is_better else "lower"
                self.log(f"early stop: no {better} {s.stop_on.label} for {s.patience} epochs")
        if self.folder is not None and self.rows and written_epoch != self.rows[-1]["epoch"]:
            save_curves(self.history(), self.folder, self.title, self.best_epoch)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.result()

    def history(self) -> pd.DataFrame:
        history = pd.DataFrame(self.rows)
        if not self.settings.validated:  # figures measured on training photos are not stored as validation ones
            for column in [c for c in history.columns if c.startswith("val_")]:
                history[column] = np.nan
        return history

    def result(self) -> LoopResult:
        history = self.history()
        rows = history[history["epoch"] == self.best_epoch] if len(history) else history
        best_row = rows.iloc[0].to_dict() if len(rows) else {}
        return LoopResult(history, self.best_epoch, self.best if self.settings.validated else None,
                          self.settings.stop_on, self.settings.validated, self.bad >= self.settings.patience, best_row)
