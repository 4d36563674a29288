"""Frozen settings of each stage: every default is written here, once.

The Python API takes these objects (`build_index(data, config=BuildConfig(cell_km=5))`), the CLI takes its
options' defaults from them (`BuildConfig.cell_km`), and the manifest records the build's (`manifest["config"]`).
Only the standard library is imported, so `geoindex --help` stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Well under PIL's bomb limit (89 MP): a 40 MP photo is already larger than any street-level camera gives.
# Build, query and the service refuse images past it, before decoding them.
DEFAULT_MAX_PIXELS = 40_000_000

INDEX_TYPES = ("flat", "ivfpq", "hnsw")
SPLIT_UNITS = ("auto", "place", "cell", "image")
DTYPES = ("float16", "float32")
TRAIN_MODES = ("auto", "tail", "probe", "finetune")


class _Config:
    """Shared by the config classes: a plain dict for JSON, and a copy with some fields changed."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field `name` (what the CLI shows and uses)."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                return f.default_factory()
        raise KeyError(name)


def _plain(value):
    if isinstance(value, _Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
        return value
    return getattr(value, "name", type(value).__name__)  # an engine object: its kind, not its address


@dataclass(frozen=True)
class ExtractionConfig(_Config):
    """How photos are decoded and embedded (build, re-embedding after `train`)."""
    batch_size: int = 64
    num_workers: int | None = None  # decoding processes; None: threads on a CPU, cores - 1 processes for a GPU
    device: str = "auto"            # auto: a CUDA GPU when torch sees one
    image_size: int | None = None   # None: the backbone's own
    precision: str = "auto"         # auto: bf16 where OpenVINO computes it natively, else fp32; int8: calibrated on
                                    # the index's train photos (queries embed at auto)
    calibration_photos: int = 300   # train photos an int8 model is calibrated on


@dataclass(frozen=True)
class BuildConfig(_Config):
    """What `build_index` does with a dataset: which photos, how they are split, embedded, stored and indexed."""
    # data
    per_city: int | None = None     # about this many photos per city, whole places
    follow_symlinks: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    # split
    split_by: str = "auto"
    cell_km: float = 1.0
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # storage and index
    dtype: str = "float16"
    index_type: str = "flat"
    index_params: dict | None = None
    # checkpoints: a shard every checkpoint_rows photos or checkpoint_seconds, whichever comes first
    checkpoint_rows: int = 2048
    checkpoint_seconds: float = 30.0
    engine: Any = "local"           # "local", "ray" or a geoindex.engines engine
    # an index (name, path or GeoIndex) whose backbone, tuned weights and kNN settings the build borrows: no split,
    # every photo searchable (geoindex.features_from)
    features_from: Any = None
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)

    def __post_init__(self):
        object.__setattr__(self, "fractions", tuple(self.fractions))


@dataclass(frozen=True)
class TrainConfig(_Config):
    """What `geoindex.train` does; None means the mode's own default (MODE_DEFAULTS)."""
    mode: str = "auto"              # auto: tail where the backbone allows it and the index is not adapted, else probe
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    patience: int | None = None
    resume: bool = False            # whole-backbone fine-tuning only; the tail resumes by itself
    # The tail also learns places (multi-similarity over photos of one spot). Off by default: on the London photos
    # it cost 3.7 points of val city accuracy and did not raise test revisit recall (benchmarks/place.md).
    places: bool = False
    place_weight: float | None = None  # the place loss beside the cities' (None: PLACE_DEFAULTS); with places only
    num_workers: int | None = None
    device: str = "auto"

    def for_mode(self, mode: str) -> dict:
        """Epochs, lr, weight decay, batch size and patience for `mode`: what was set, else the mode's default."""
        chosen = {name: getattr(self, name) for name in MODE_DEFAULTS[mode]}
        return {name: MODE_DEFAULTS[mode][name] if value is None else value for name, value in chosen.items()}


# Per training mode, what TrainConfig's None stands for (the tail's lr is the backbone's; its new head
# learns 10x faster). Measured choices: benchmarks/accuracy.md.
MODE_DEFAULTS = {
    "tail": {"epochs": 6, "lr": 1e-4, "weight_decay": 0.05, "batch_size": 64, "patience": 2},
    "probe": {"epochs": 30, "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 256, "patience": 3},
    "finetune": {"epochs": 10, "lr": 1e-4, "weight_decay": 1e-5, "batch_size": 32, "patience": 3},
}


# `train --places`: a batch holds places_per_batch places x photos_per_place photos, and the multi-similarity loss
# weighs place_weight beside the cities' cross-entropy (gsv-cities' batch shape; benchmarks/place.md).
PLACE_DEFAULTS = {"places_per_batch": 16, "photos_per_place": 4, "place_weight": 1.0}


@dataclass(frozen=True)
class QueryConfig(_Config):
    """`geoindex query`'s options; k, vote and temperature None: as `geoindex train` tuned them on val."""
    k: int | None = None
    vote_method: str | None = None
    temperature: float | None = None
    batch_size: int = 32            # photos decoded and embedded together: memory stays flat in the number of photos
    verify: bool = False            # hash every index file in full before answering
    device: str = "auto"


@dataclass(frozen=True)
class ServeConfig(_Config):
    """The service's options: where it listens, how it batches, what it accepts and how long it waits."""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1                # server processes, each with its own copy of the model
    # what a request may be
    max_upload_mb: float = 20.0     # one photo
    max_request_mb: float = 100.0   # one request's whole body: a batch of 32 ordinary photos fits
    max_inflight_mb: float = 256.0  # every request's body in memory at once; past it, 503 and Retry-After
    max_files: int = 32             # photos in one /v1/locate/batch request
    max_pixels: int = DEFAULT_MAX_PIXELS
    # PNG, WebP, BMP and TIFF are decoded whole (JPEG at 1/2 to 1/8 scale, as small as the model allows): a 64 MP
    # RGBA PNG of 250 KB costs 6 s of CPU and 1.5 GB. The model sees 224-300 px, so the service decodes such
    # formats up to what a camera gives (a 4000 x 3000 photo), not to max_pixels.
    max_unscaled_pixels: int = 12_000_000
    # micro-batching: what benchmarks/serve.py measured best on 2 CPU cores
    max_batch: int = 8              # photos embedded in one model call (1 turns micro-batching off)
    max_wait_ms: float = 10.0       # how long a photo may wait for others to share its batch
    max_queue: int = 256            # photos waiting for the model; past it, 503
    decode_threads: int | None = None  # None: cores, at most 4
    torch_threads: int | None = None   # None: torch's own, divided among workers
    model_threads: int | None = None   # None: 2 on a CPU of 2 or more cores, 1 on a GPU
    reload_check_s: float = 2.0     # how often the service looks whether the index on disk changed; 0 never
    k: int | None = None            # None: as tuned on val by `geoindex train`
    device: str = "auto"
    # behind a proxy, and connections
    root_path: str = ""
    forwarded_allow_ips: str = "127.0.0.1"
    max_connections: int | None = None  # None: well below the file descriptor limit, at most 1024
    header_timeout: float = 10.0    # seconds to send a request's headers (and an idle keep-alive is kept)
    body_timeout: float = 30.0      # seconds a request body may send nothing
    log_level: str = "info"


def split_options(options: dict, *configs: type) -> tuple[list[dict], dict]:
    """Sort keyword options by the config class whose field they name; returns (per config, the rest)."""
    per_config: list[dict] = [{} for _ in configs]
    rest = {}
    for key, value in options.items():
        for i, cls in enumerate(configs):
            if key in cls.field_names():
                per_config[i][key] = value
                break
        else:
            rest[key] = value
    return per_config, rest
