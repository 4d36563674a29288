"""CLIP zero-shot as a method: a photo's class is the prompt its CLIP embedding is closest to."""
from __future__ import annotations

import numpy as np

from ..catalog import backbone_info
from ..zeroshot import ZeroShotClassifier
from .base import Answer, Method, Photos, register_method
from .classifier import embed_sources


@register_method("zeroshot", order=2)
class ZeroShotMethod(Method):
    def __init__(self, index, clip_backbone, label_format: str, templates, name: str, embed_kwargs=None,
                 weights_note: str = ""):
        self.index, self.name = index, name
        self.clip = clip_backbone
        self.classifier = ZeroShotClassifier(clip_backbone, index.classes, label_format, templates)
        self.level = "country" if label_format == "country" else "city"
        self.embed_kwargs = embed_kwargs or {}
        self.notes = f"{len(self.classifier.templates)} template(s), labels '{label_format}'" + weights_note

    def clip_features(self, photos: Photos) -> np.ndarray:
        if backbone_info(self.index.manifest["backbone"]).zero_shot and self.clip is self.index.backbone:
            return photos.embeddings
        return photos.feature("clip", lambda p: embed_sources(self.clip, p, normalize=True, **self.embed_kwargs))

    def predict(self, photos: Photos) -> Answer:
        features = self.clip_features(photos)
        ok = np.isfinite(features).all(axis=1)
        labels = self.classifier.labels
        probs = np.full((len(photos), len(labels)), 1.0 / len(labels))
        if ok.any():
            probs[ok] = self.classifier.predict(features[ok])
        coords = None
        if self.level == "city":
            coords = self.index.city_centres[probs.argmax(1)]
        return Answer(self.name, probs, labels, coords, level=self.level, notes=self.notes,
                      label_map=self.classifier.city_to_label)
