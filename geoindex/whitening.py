"""Centring and PCA whitening learnt on the train photos, for kNN.

Every street photo shares a few dominant directions (sky, road, lighting) that swamp cosine similarity;
centring on the train mean, projecting on the top principal axes and flattening their variance (power 1:
full whitening, 0: plain PCA) lets the directions that tell cities apart count (the classic fix of
Jégou & Chum 2012 and Radenović et al. 2018). The dimension and power are chosen on val with the vote.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

FIT_SAMPLE = 200_000


@dataclass(frozen=True)
class Whitening:
    mean: np.ndarray      # (d,)
    axes: np.ndarray      # (m, d) principal axes, largest variance first
    singular: np.ndarray  # (m,) their standard deviations
    dims: int
    power: float

    @classmethod
    def fit(cls, x: np.ndarray, max_dims: int = 512, seed: int = 0) -> "Whitening":
        x = np.asarray(x, dtype=np.float32)
        if len(x) > FIT_SAMPLE:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), FIT_SAMPLE, replace=False))]
        mean = x.mean(axis=0)
        centred = (x - mean).astype(np.float64)
        covariance = centred.T @ centred / max(1, len(x) - 1)
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(values)[::-1]
        m = int(min(max_dims, x.shape[1], max(1, len(x) - 1)))
        values, vectors = np.clip(values[order][:m], 1e-12, None), vectors[:, order][:, :m]
        return cls(mean.astype(np.float32), vectors.T.astype(np.float32), np.sqrt(values).astype(np.float32), m, 0.5)

    def using(self, dims: int, power: float) -> "Whitening":
        return replace(self, dims=int(min(dims, len(self.singular))), power=float(power))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        scale = (self.singular[:self.dims] / self.singular[0]) ** self.power
        projected = ((np.asarray(x, dtype=np.float32) - self.mean) @ self.axes[:self.dims].T) / scale
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        return (projected / np.clip(norms, 1e-12, None)).astype(np.float32)

    def save(self, path) -> None:
        from .fileio import atomic_path
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, mean=self.mean, axes=self.axes[:self.dims], singular=self.singular[:self.dims],
                         dims=np.int64(self.dims), power=np.float64(self.power))

    @classmethod
    def load(cls, path) -> "Whitening":
        with np.load(Path(path), allow_pickle=False) as z:  # data only: nothing in the file can run
            return cls(z["mean"], z["axes"], z["singular"], int(z["dims"]), float(z["power"]))


def flat_index(vectors: np.ndarray):
    """An exact inner-product FAISS index over (whitened, L2-normalised) vectors, row ids = train rows."""
    import faiss
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index
