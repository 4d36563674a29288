"""CLIP zero-shot: a city is the text prompt its photo is closest to.

Three label formats, as in the seed study: "City, Country", "City", and "Country" (scored on
countries, since several cities share one). A prompt ensemble averages several templates in
text-embedding space, as open_clip does for ImageNet.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .backbones import Backbone
from .catalog import backbone_info
from .cities import city_info, full_name
from .errors import GeoindexError

LABEL_FORMATS = ("city_country", "city", "country")
SINGLE_TEMPLATE = "a street view photo in {place}."
ENSEMBLE_TEMPLATES = (
    "a street view photo in {place}.",
    "a photo taken in {place}.",
    "a Google Street View image of {place}.",
    "a street in {place}.",
    "a photo of a street in {place}.",
    "buildings and a road in {place}.",
    "a city street scene in {place}.",
    "{place}.",
)


def place_name(city_id: str, label_format: str) -> str:
    info = city_info(city_id)
    if label_format == "city_country":
        return full_name(city_id)
    if label_format == "city":
        return info.name
    if label_format == "country":
        return info.country or info.name
    raise GeoindexError(f"unknown label format {label_format!r}; choose one of {', '.join(LABEL_FORMATS)}")


def read_templates(path) -> list[str]:
    """One template per line, each with a {place} (or {city}) field; blank lines and # comments ignored."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    templates = [line.replace("{city}", "{place}") for line in lines if line and not line.startswith("#")]
    bad = [t for t in templates if "{place}" not in t]
    if not templates or bad:
        raise GeoindexError(f"templates file {path}: every line needs a {{place}} field" + (f" (not: {bad[0]!r})" if bad else ""))
    return templates


class ZeroShotClassifier:
    """Text embeddings for a set of labels; `predict` maps L2-normalised CLIP image embeddings to (N, L) probabilities."""

    def __init__(self, clip_backbone: Backbone, cities: list[str], label_format: str = "city_country",
                 templates=(SINGLE_TEMPLATE,)):
        if not backbone_info(clip_backbone.name).zero_shot:
            raise GeoindexError(f"zero-shot needs the clip backbone, not {clip_backbone.name!r}")
        self.backbone = clip_backbone
        self.cities = list(cities)
        self.label_format = label_format
        self.templates = list(templates)
        names = [place_name(c, label_format) for c in self.cities]
        # Labels are unique place names: for "country", the classes are countries, not cities.
        self.labels = list(dict.fromkeys(names))
        self.city_to_label = np.array([self.labels.index(n) for n in names])
        self.text_embeddings = self._encode(self.labels)

    @torch.inference_mode()
    def _encode(self, labels: list[str]) -> np.ndarray:
        clip_model, tokenizer = self.backbone.extras["clip_model"], self.backbone.extras["tokenizer"]
        device = self.backbone.device
        out = []
        for label in labels:
            tokens = tokenizer([t.format(place=label) for t in self.templates]).to(device)
            emb = torch.nn.functional.normalize(clip_model.encode_text(tokens).float(), dim=-1).mean(0)
            out.append(torch.nn.functional.normalize(emb, dim=0))
        return torch.stack(out).cpu().numpy()

    def predict(self, image_embeddings: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            scale = float(self.backbone.extras["clip_model"].logit_scale.exp().clamp(max=100))
        logits = scale * np.asarray(image_embeddings, dtype=np.float32) @ self.text_embeddings.T
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits.astype(np.float64))
        return probs / probs.sum(axis=1, keepdims=True)

    def map_labels(self, city_labels: np.ndarray) -> np.ndarray:
        """City class indices -> this classifier's label indices (identity unless label_format is country)."""
        return self.city_to_label[np.asarray(city_labels)]
