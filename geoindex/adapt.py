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

With `places` (`geoindex train --places`), the tail also learns the train photos' places (geoindex.places: P
places x K photos a batch, the multi-similarity loss beside the cities' cross-entropy), and the epoch kept is the
one with the best revisit recall on val's own revisits. It is opt-in: on the London photos it did not raise
revisit recall on test places and cost city accuracy (benchmarks/place.md).
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
from .config import MODE_DEFAULTS, PLACE_DEFAULTS, ExtractionConfig, TrainConfig
from .errors import GeoindexError
from .extraction import iter_embeddings, resolve_device
from .fileio import atomic_path, write_json_atomic
from .heads import _no_readable_photo, head_folder
from .training import VAL_LOSS, Checkpointing, StopOn, LoopSettings, TrainingLoop, epoch_generator, save_weights
from .layout import HEAD_META, TAIL_MODE, TRUNK_CACHE

MODE = TAIL_MODE
# The tail's epochs, lr, weight decay, batch size and patience are config.MODE_DEFAULTS["tail"], the place
# objective's config.PLACE_DEFAULTS; its new head learns 10x faster than the backbone.
DEFAULTS = {**MODE_DEFAULTS[TAIL_MODE], "head_lr": 10 * MODE_DEFAULTS[TAIL_MODE]["lr"], "label_smoothing": 0.1,
            **PLACE_DEFAULTS}
MIN_PLACES = 8            # fewer places of two or more train photos than this: --places is refused
MIN_REVISIT_QUERIES = 10  # fewer val revisit queries than this: stop on the val loss, not on recall
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
    Its state is the whole backbone's (trunk included, untrained) and the head's. With `with_embeddings`, the
    forward pass gives (logits, embeddings), for a loss over pairs of photos besides the city's."""

    def __init__(self, backbone_model: nn.Module, tail: nn.Module, head: nn.Linear, with_embeddings: bool = False):
        super().__init__()
        self.backbone, self.head, self.with_embeddings = backbone_model, head, with_embeddings
        self._tail = [tail]  # part of the backbone: kept out of the state dict, which holds it once
        self.scale = math.sqrt(head.in_features)  # unit-norm features, coordinates of order 1 for the linear layer

    def embed(self, trunk_features):
        return nn.functional.normalize(self._tail[0](trunk_features.float()), dim=1)

    def forward(self, trunk_features):
        embeddings = self.embed(trunk_features)
        logits = self.head(embeddings * self.scale)
        return (logits, embeddings) if self.with_embeddings else logits


class TrainPlaces:
    """What the place objective reads: the train photos' places and coordinates (as tensors, indexed by a batch's
    photo numbers), and val's revisit queries, asked against the val photos: a split by place or map cell keeps a
    val spot's older captures in val, and leaving out the train photos makes the check a forward pass over val
    alone, a few seconds an epoch."""

    def __init__(self, meta: dict, rows: dict, device):
        from .places import group_places

        def column(split, name, fill, dtype):
            table = meta[split]
            values = table[name].to_numpy()[rows[split]] if name in table else np.full(len(rows[split]), fill)
            return values.astype(dtype)

        self.n_train, self.device = len(rows["train"]), device
        self.lat, self.lon, self.dates = (np.concatenate([column(s, name, fill, dtype) for s in ("train", "val")])
                                          for name, fill, dtype in (("lat", np.nan, np.float64),
                                                                    ("lon", np.nan, np.float64),
                                                                    ("yyyymm", -1, np.int64)))
        # GSV-Cities numbers places within each city: a place is (city, place id)
        ids, cities = column("train", "place_id", -1, np.int64), column("train", "label", -1, np.int64)
        known = ids >= 0
        if known.any():
            ids[known] = np.unique(np.column_stack([cities[known], ids[known]]), axis=0, return_inverse=True)[1]
        self.places = group_places(self.lat[:self.n_train], self.lon[:self.n_train], ids)
        self.count = int(self.places.max() + 1) if len(self.places) else 0
        self._index()

    def _index(self):
        from .revisit import revisit_queries

        n = self.n_train
        self.tensors = tuple(torch.as_tensor(a, device=self.device)
                             for a in (self.places, self.lat[:n], self.lon[:n]))
        self.query_rows = np.flatnonzero(revisit_queries(self.lat[n:], self.lon[n:], self.dates[n:]))

    def drop_unreadable(self, labels: dict) -> None:
        """A train photo that did not decode (label -1) is nobody's place. Val's revisit queries stay as the
        metadata made them (the stopping criterion was chosen on their number): one that did not decode counts as
        a miss."""
        unreadable = labels["train"] < 0
        if unreadable.any():
            self.lat[:self.n_train][unreadable] = np.nan
            self.places[unreadable] = -1
            self._index()

    @property
    def stops_on_recall(self) -> bool:
        return len(self.query_rows) >= MIN_REVISIT_QUERIES

    def loss(self, city_loss, weight: float):
        """City cross-entropy plus `weight` x the multi-similarity loss over the batch's places."""
        from .places import multi_similarity_loss, pair_masks

        def objective(out, y):
            logits, embeddings = out
            labels, photos = y[:, 0], y[:, 1]
            keep = labels >= 0
            same, apart = pair_masks(photos[keep], *self.tensors)
            return city_loss(logits, labels) + weight * multi_similarity_loss(embeddings[keep], same, apart)
        return objective

    def recall(self, vectors: np.ndarray) -> dict:
        """recall@1/5/10 within 25 m of val's revisit queries among the val photos (`vectors`, val's embeddings),
        under the protocol's exclusions (the query itself, photos of its capture month)."""
        from .revisit import RECALL_AT, masked_top_k, recall_within

        lat, lon, dates, rows = self.lat[self.n_train:], self.lon[self.n_train:], self.dates[self.n_train:], \
            self.query_rows
        _, ids = masked_top_k(vectors[rows], vectors, rows, dates[rows], dates, max(RECALL_AT))
        return {name.replace("@", ""): value  # r1_25m: a history column name without punctuation
                for name, value in recall_within(ids, lat, lon, rows).items()}


def _mean_recall(row: dict) -> float:
    return float(np.mean([row[f"val_r{n}_25m"] for n in (1, 5, 10)]))


# Val's revisit queries are few (about a hundred in the 5,419 London photos): the mean of recall@1, @5 and @10
# within 25 m moves less from one query than recall@1 alone.
VAL_REVISIT = StopOn(_mean_recall, higher_is_better=True, min_delta=1e-4,
                     label="validation revisit recall (mean of recall@1, @5 and @10 within 25 m)")


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
                batch_size: int | None = None, patience: int | None = None, places: bool = TrainConfig.places,
                place_weight: float | None = TrainConfig.place_weight, tail_stages: int = TAIL_STAGES, device="auto",
                num_workers=None, seed: int = 0, progress: bool = True, log=print) -> AdaptResult:
    """Fine-tune the tail of the index's backbone on its train photos, re-embed every photo of the index with it
    and swap the index for the re-embedded one. `index` is closed; the result holds the re-embedded index, opened,
    and where the curves are. Holds the index's lock throughout (geoindex.locks).

    The tail learns the cities (cross-entropy) and, with `places`, the places too (the train photos must hold
    some: GSV-Cities place ids, or photos within 25 m of each other): batches of P places x K photos and a
    multi-similarity loss (geoindex.places), the epoch kept being the one with the best revisit recall on val's own
    revisits (else the lowest val loss)."""
    from .locks import writing_to

    settings = dict(DEFAULTS)
    settings.update({k: v for k, v in {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                                       "batch_size": batch_size, "patience": patience,
                                       "place_weight": place_weight}.items() if v is not None})
    settings["head_lr"] = settings["lr"] * DEFAULTS["head_lr"] / DEFAULTS["lr"]
    settings["places"] = places
    with writing_to(index, "train"):
        return _adapt_locked(index, settings, tail_stages, device, num_workers, seed, progress, log)


class TailTraining:
    """The tail's training on cached trunk features, for the cities and, given places, for the places: its model
    and optimiser, each epoch's batches and the validation that chooses the kept epoch. `geoindex train` runs it
    with a checkpoint in the index; benchmarks/place.py runs it on the same features with other settings."""

    def __init__(self, backbone, split, n_classes: int, settings: dict, places: "TrainPlaces | None" = None, *,
                 seed: int = 0, device="cpu"):
        self.settings, self.places, self.seed, self.device = settings, places, seed, torch.device(device)
        torch.manual_seed(seed)
        head = nn.Linear(backbone.embed_dim, n_classes).to(device)
        self.model = _TailClassifier(backbone.model, split.tail, head, with_embeddings=places is not None)
        self.optimizer = torch.optim.AdamW([{"params": split.parameters, "lr": settings["lr"]},
                                            {"params": head.parameters(), "lr": settings["head_lr"]}],
                                           weight_decay=settings["weight_decay"])
        city_loss = nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=settings["label_smoothing"])
        self.loss_fn = city_loss if places is None else places.loss(city_loss, settings["place_weight"])
        self.stop_on = VAL_REVISIT if places is not None and places.stops_on_recall else VAL_LOSS

    def loop(self, *, folder=None, log=None, progress: bool = True, plan: dict | None = None,
             title: str = "") -> TrainingLoop:
        # BatchNorm keeps its ImageNet statistics (a few thousand photos would only make them noisy); the
        # EfficientNet-Lite tails have no dropout, so eval mode throughout changes nothing else.
        s = self.settings
        loop_settings = LoopSettings(MODE, s["epochs"], s["patience"], stop_on=self.stop_on, train_mode=False,
                                     progress=progress)
        checkpoint = Checkpointing("tail fine-tuning", "tail-epoch", plan=plan) if folder is not None else None
        return TrainingLoop(self.model, self.optimizer, loop_settings, device=self.device, folder=folder, log=log,
                            title=title, checkpoint=checkpoint)

    def photos_per_epoch(self, labels: dict) -> int:
        if self.places is None:
            return len(labels["train"])
        sizes = np.bincount(self.places.places[self.places.places >= 0])
        return int(np.minimum(sizes[sizes >= 2], self.settings["photos_per_place"]).sum()
                   + ((self.places.places < 0) & (labels["train"] >= 0)).sum())

    def fit(self, loop: TrainingLoop, features: dict, labels: dict, on_batch=None):
        """Train until the loop stops; the model then holds the kept epoch's weights. Returns the LoopResult."""
        if self.places is not None:
            self.places.drop_unreadable(labels)
        return loop.run(lambda epoch: self.batches(epoch, features["train"], labels["train"]), self.loss_fn,
                        lambda: self.validate(features, labels), on_batch=on_batch)

    def batches(self, epoch: int, features: np.ndarray, labels: np.ndarray):
        # Each epoch's order comes from its own generator, never the global one that DataLoaders draw from:
        # a resumed run then shuffles exactly as an uninterrupted one, whatever it computed before.
        generator = epoch_generator(self.seed, epoch)
        if self.places is not None:
            yield from self._place_batches(generator, features, labels)
            return
        size = self.settings["batch_size"]
        order = torch.randperm(len(labels), generator=generator).numpy()
        for start in range(0, len(order), size):
            batch = np.sort(order[start:start + size])
            yield torch.from_numpy(features[batch]), torch.as_tensor(labels[batch])

    def _place_batches(self, generator, features, labels):
        """P places x K photos a batch; the photos that are no place's spread over the batches (the city's
        examples, and negatives for every place). Targets: (label, photo number)."""
        from .places import place_batches

        places, s = self.places.places, self.settings
        chosen = list(place_batches(places, s["places_per_batch"], s["photos_per_place"], generator))
        alone = np.flatnonzero((places < 0) & (labels >= 0))
        alone = alone[torch.randperm(len(alone), generator=generator).numpy()]
        spread = min(len(alone), len(chosen) * s["batch_size"])  # at most batch_size of them beside a batch's places
        batches = [np.concatenate([batch, extra]) for batch, extra in
                   zip(chosen, np.array_split(alone[:spread], max(1, len(chosen))))]
        batches += [alone[start:start + s["batch_size"]] for start in range(spread, len(alone), s["batch_size"])]
        for batch in batches:
            batch = np.sort(batch)
            yield torch.from_numpy(features[batch]), torch.from_numpy(np.column_stack([labels[batch], batch]))

    def embed(self, features: np.ndarray) -> np.ndarray:
        """The tuned tail's L2-normalised embeddings of trunk features (what the index will hold)."""
        with torch.no_grad():
            return torch.cat([self.model.embed(torch.from_numpy(features[start:start + 256]).to(self.device))
                              for start in range(0, len(features), 256)]).cpu().numpy()

    def validate(self, features: dict, labels: dict) -> dict:
        # Unsmoothed, summed over chunks: the loss the kept epoch is chosen on (and its recorded figures).
        total, correct, count, embedded = 0.0, 0, 0, []
        for start in range(0, len(labels["val"]), 256):
            y = torch.as_tensor(labels["val"][start:start + 256], device=self.device)
            out = self.model(torch.from_numpy(features["val"][start:start + 256]).to(self.device))
            logits = out[0] if isinstance(out, tuple) else out
            if isinstance(out, tuple):
                embedded.append(out[1].cpu().numpy())
            valid = y >= 0
            if valid.any():
                total += nn.functional.cross_entropy(logits[valid], y[valid], reduction="sum").item()
                correct += int((logits.argmax(1) == y)[valid].sum())
                count += int(valid.sum())
        figures = {"loss": total / max(1, count), "accuracy": correct / max(1, count)}
        if self.stop_on is VAL_REVISIT:
            figures |= self.places.recall(np.concatenate(embedded))
        return figures


PLACE_SETTINGS = tuple(PLACE_DEFAULTS)


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

    meta = {s: index.store.metadata(s) for s in ("train", "val")}
    rows = {"train": _sample(len(meta["train"]), MAX_TRAIN_PHOTOS, seed),
            "val": _sample(len(meta["val"]), MAX_VAL_PHOTOS, seed)}
    places = TrainPlaces(meta, rows, device) if settings.pop("places") else None
    if places is not None and places.count < MIN_PLACES:
        raise GeoindexError(f"the train photos of index {index.name!r} hold {places.count} places (photos within "
                            f"25 m of each other, or sharing a place id); training for places needs "
                            f"{MIN_PLACES} or more")
    if places is None:
        settings = {k: v for k, v in settings.items() if k not in PLACE_SETTINGS}
    # "shuffle" names how epochs draw their order: a checkpoint of another scheme cannot resume bit for bit.
    plan = {"backbone": index.manifest["backbone"], "weights_sha256": index.manifest["weights"]["sha256"],
            "build_id": index.manifest.get("build_id"), "tail_stages": tail_stages, "seed": seed,
            "shuffle": "generator(seed, epoch)", "objective": "city+places" if places else "city", **settings}

    training = TailTraining(backbone, split, len(index.classes), settings, places, seed=seed, device=device)
    loop = training.loop(folder=folder, log=log, progress=progress, plan=plan,
                         title=f"{index.manifest['backbone']} tail fine-tuned ({index.name})")
    done = loop.finished
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
        if places is not None:
            log(f"training the last {tail_stages} stages of {index.manifest['backbone']} for the cities and for "
                f"{places.count:,} places of the train photos ({settings['places_per_batch']} places x "
                f"{settings['photos_per_place']} photos a batch), keeping the epoch with the best "
                + ("revisit recall on val's own revisits" if training.stop_on is VAL_REVISIT else
                   "val loss (val has too few revisits to stop on their recall)"))
        else:
            log(f"training the last {tail_stages} stages of {index.manifest['backbone']}")

    epochs_estimate = None if done else StageEstimate(
        log, f"tail fine-tuning (at most {settings['epochs'] - loop.start_epoch + 1} epochs)",
        training.photos_per_epoch(labels) * (settings["epochs"] - loop.start_epoch + 1))
    result = training.fit(loop, features, labels, on_batch=epochs_estimate.seen if epochs_estimate else None)
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
            **{k: settings[k] for k in ("lr", "head_lr", "weight_decay", "batch_size", "label_smoothing")},
            "objective": plan["objective"], "stopped_on": training.stop_on.label}
    if places is not None:
        info |= {"places": places.count, "val_revisit_queries": int(len(places.query_rows)),
                 **{k: settings[k] for k in PLACE_SETTINGS},
                 **{f"best_val_{k}": result.figure(f"val_{k}") for k in ("r1_25m", "r5_25m", "r10_25m")}}
    write_json_atomic(folder / HEAD_META, info)
    log(f"{result.summary()}; re-embedding every photo of the index with the tuned backbone")
    tuned = create_backbone(index.manifest["backbone"], weights=weights, image_size=index.manifest["image_size"],
                            device=device)
    reembed_index(index, tuned, adapted=info, batch_size=max(32, settings["batch_size"]), num_workers=num_workers,
                  device=device, progress=progress, log=log)
    index.close()
    return AdaptResult(folder, history, best_epoch, best_val_accuracy, best_val_loss,
                       Path(index.path) / TUNED_WEIGHTS, int(len(rows["train"])), load_index(index.path, device=device))
