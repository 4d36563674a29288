"""What every extraction engine shares: the shard it hands over, the sink it hands it to, the recipe another
process builds the same backbone from, and the Engine protocol. `engines/__init__` picks an engine by name and
`engines.local`/`engines.ray` implement it; both import this module, never their package, so no circle."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from ..backbones import Backbone, create_backbone
from ..config import BuildConfig, ExtractionConfig
from ..errors import GeoindexError

ENGINES = ("local", "ray")


@dataclass
class Shard:
    """Finished rows: `rows` are the caller's row numbers; embeddings hold the ok rows only, in order."""

    rows: np.ndarray        # int64 (n,)
    ok: np.ndarray          # bool (n,)
    errors: list[str]       # "" where ok
    embeddings: np.ndarray  # float32 (ok.sum(), D), L2-normalised
    digests: list[str] | None = None  # content hash per row ("" where unreadable), for duplicate detection

    @staticmethod
    def concat(shards: Sequence["Shard"]) -> "Shard":
        digests = None
        if all(s.digests is not None for s in shards):
            digests = [d for s in shards for d in s.digests]
        return Shard(np.concatenate([s.rows for s in shards]), np.concatenate([s.ok for s in shards]),
                     [e for s in shards for e in s.errors], np.concatenate([s.embeddings for s in shards]), digests)


Sink = Callable[[Shard], None]


@dataclass(frozen=True)
class BackboneRecipe:
    """What another process needs to build the same backbone: name, weights, input size.

    weights follows create_backbone: None = the library's pretrained weights, "none" = seeded random,
    else a state-dict path, which must exist on every machine; `sha256` (when known) is checked there.
    """

    name: str
    weights: str | None
    image_size: int
    sha256: str | None = None

    @classmethod
    def of(cls, backbone: Backbone) -> "BackboneRecipe":
        source = backbone.weights.source
        weights = {"random": "none", "file": backbone.weights.path}.get(source)
        return cls(backbone.name, weights, backbone.image_size, backbone.weights.sha256)

    def build(self, device="cpu") -> Backbone:
        backbone = create_backbone(self.name, weights=self.weights, image_size=self.image_size, device=device)
        if self.sha256 and backbone.weights.sha256 and backbone.weights.sha256 != self.sha256:
            raise GeoindexError(f"{self.name} weights on this machine ({backbone.weights.path}) differ from the "
                                "driver's (sha256 mismatch); every node must hold the same weights")
        return backbone


class Engine(Protocol):
    name: str

    def embed(self, backbone: Backbone, rows: np.ndarray, paths: Sequence[str], *, sink: Sink,
              batch_size: int = ExtractionConfig.batch_size,
              num_workers: int | None = None, device="auto", progress: bool = True,
              shard_rows: int = BuildConfig.checkpoint_rows,
              shard_seconds: float = BuildConfig.checkpoint_seconds, on_batch: Callable[[int], None] | None = None,
              max_pixels: int | None = None) -> None:
        """Embed paths[i] for row rows[i]; call sink(shard) for every finished shard (each row exactly once)."""
        ...
