"""Classifier heads as methods: the probe reads the index's embeddings; a fine-tuned head reads its own backbone's."""
from __future__ import annotations

import numpy as np

from .base import Answer, Method, Photos, register_method


def embed_sources(backbone, photos: Photos, normalize: bool, **embed_kwargs) -> np.ndarray:
    """Features of photos' sources with another backbone: streamed from files, or one batch of PIL images.
    Rows whose file cannot be read get NaN (and are scored as a uniform guess)."""
    if photos.all_paths and len(photos) > 32:
        from ..extraction import embed_paths

        features, _, _ = embed_paths(backbone, [str(s) for s in photos.sources], normalize=normalize,
                                     desc=f"{backbone.name} features ({photos.name})", **embed_kwargs)
        return features
    return backbone.embed(photos.sources, normalize=normalize)


@register_method("classifier", order=1)
class ClassifierMethod(Method):
    """A trained softmax head of the index (`probe` or `finetune`); its GPS guess is the predicted city's centre."""

    def __init__(self, index, classifier, embed_kwargs: dict | None = None):
        self.index, self.classifier = index, classifier
        self.name = f"classifier:{classifier.mode}"
        self.classes = index.classes
        self.embed_kwargs = embed_kwargs or {}

    @property
    def val_accuracy(self) -> float:
        return float(self.classifier.meta.get("best_val_accuracy") or 0.0)

    def features(self, photos: Photos) -> np.ndarray:
        if self.classifier.mode == "probe":
            return photos.embeddings
        return photos.feature(("finetune", str(self.classifier.folder)),
                              lambda p: embed_sources(self.classifier.backbone, p, normalize=False, **self.embed_kwargs))

    def predict(self, photos: Photos) -> Answer:
        features = self.features(photos)
        ok = np.isfinite(features).all(axis=1)
        probs = np.full((len(photos), len(self.classes)), 1.0 / len(self.classes))
        if ok.any():
            probs[ok] = self.classifier.predict_features(features[ok])
        meta = self.classifier.meta
        notes = (f"val acc {meta['best_val_accuracy']:.3f} at its kept epoch {meta['best_epoch']}"
                 if meta.get("best_val_accuracy") is not None else
                 f"epoch {meta['best_epoch']} kept without a validation split")
        return Answer(self.name, probs, self.classes, self.index.city_centres[probs.argmax(1)], notes=notes)


def classifier_methods(index, embed_kwargs=None) -> list[ClassifierMethod]:
    """Every trained head of the index, best validation accuracy first."""
    from ..heads import available_heads, load_classifier

    methods = [ClassifierMethod(index, load_classifier(index, mode, device=index.device), embed_kwargs)
               for mode in available_heads(index)]
    return sorted(methods, key=lambda m: -m.val_accuracy)
