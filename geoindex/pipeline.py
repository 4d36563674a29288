"""`geoindex.train(index, mode=...)`: the train policy, written once for the API, `geoindex train` and the demo.

auto (the default): adapt the backbone's tail to the index's cities where the backbone allows it and the index is
not adapted yet (re-embedding the index), then a probe head; then kNN and the fusion tuned on val.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import TRAIN_MODES, TrainConfig, split_options
from .errors import GeoindexError


@dataclass
class TrainOutcome:
    index: object                # the trained index (re-embedded and opened again when the tail was adapted)
    head: object                 # heads.TrainResult of the probe or fine-tuned head
    adapted: object = None       # adapt.AdaptResult when this run adapted the backbone
    knn: dict | None = None      # tune_knn's choice, None without a validation split


def train(index=None, *, mode: str | None = None, config: TrainConfig | None = None, index_dir=None,
          tune: bool = True, progress: bool = True, log: Callable[[str], None] = print, **options) -> TrainOutcome:
    """Train for the index's cities: [adapt the backbone's tail], a head, then tune kNN and the fusion on val.

    index: a loaded GeoIndex, an index name or path, or None for the most recently built. mode and any TrainConfig
    field given by name (`epochs=5`) replace the config's. The index's lock is held throughout (geoindex.locks):
    a second writer is refused before any work, and no build can swap the index out while this one trains for it.
    """
    (fields,), unknown = split_options(options, TrainConfig)
    if unknown:
        raise TypeError(f"train() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    config = (config or TrainConfig()).replace(**fields, **({} if mode is None else {"mode": mode}))
    if config.mode not in TRAIN_MODES:
        raise GeoindexError(f"unknown training mode {config.mode!r}; choose one of {', '.join(TRAIN_MODES)}")
    from .locks import index_lock
    from .locate import default_index_name, resolve_index_path

    if isinstance(index, (str, bytes)) or index is None or hasattr(index, "__fspath__"):
        named = index is not None
        path = resolve_index_path(index or default_index_name(index_dir), index_dir)
        with index_lock(path, "train"):
            from .geo_index import load_index
            index = load_index(path, device=config.device)
            return _train_locked(index, config, tune, progress, log,
                                 "" if named else ": the most recently built; --index NAME picks another")
    with index_lock(index.path, "train"):
        return _train_locked(index, config, tune, progress, log)


def _train_locked(index, config: TrainConfig, tune: bool, progress: bool, log, which: str = "") -> TrainOutcome:
    from .features_from import refuse_training

    refuse_training(index)  # an index of another's features has nothing to train on: one line, nothing run
    log(f"training index {index.name!r} ({index.path}){which}")
    from .adapt import adapt_index, is_adapted, wants_adaptation
    from .heads import train_finetune, train_probe

    mode, adapted = config.mode, None
    if mode == "auto":
        mode = "tail" if wants_adaptation(index) else "probe"
        if is_adapted(index):
            log(f"index {index.name!r} is already adapted to its cities; training the probe and tuning kNN")
    if config.place_weight is not None and not config.places:
        raise GeoindexError("--place-weight weighs the place loss of --places; add --places, or drop --place-weight")
    if config.places and mode != "tail":
        why = ("it is adapted already" if is_adapted(index) else
               "it has no validation split" if not index.store.count("val") else
               f"--mode {config.mode} trains no backbone" if config.mode != "auto" else
               f"its backbone {index.manifest['backbone']!r} has no tail to train")
        raise GeoindexError(f"--places trains the backbone's tail for places, which index {index.name!r} cannot "
                            f"have: {why}; drop --places")
    if mode == "tail":
        tail = config.for_mode("tail")
        adapted = adapt_index(index, epochs=tail["epochs"], lr=tail["lr"], weight_decay=tail["weight_decay"],
                              batch_size=tail["batch_size"], patience=tail["patience"], places=config.places,
                              place_weight=config.place_weight, device=config.device,
                              num_workers=config.num_workers, progress=progress, log=log)
        index = adapted.index
        # The head after adaptation is the probe, with the probe's own defaults: the options named the tail's.
        mode, config = "probe", TrainConfig(mode="probe", device=config.device, num_workers=config.num_workers)
    settings = config.for_mode(mode)
    common = dict(epochs=settings["epochs"], lr=settings["lr"], weight_decay=settings["weight_decay"],
                  batch_size=settings["batch_size"], patience=settings["patience"], device=config.device,
                  progress=progress, log=log)
    if mode == "probe":
        head = train_probe(index, **common)
    else:
        head = train_finetune(index, resume=config.resume, num_workers=config.num_workers, **common)
    log(head.summary())  # which epoch was kept and why (geoindex.training)
    outcome = TrainOutcome(index, head, adapted)
    if not tune:
        return outcome
    if index.store.count("val"):
        from .tuning import tune_knn
        outcome.knn = tune_knn(index, log=log)
    else:
        log("kNN not tuned and no fusion fitted: there is no validation split to choose them on; answers "
            "use kNN with its default settings")
    return outcome
