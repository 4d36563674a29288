"""Extraction engines: who runs the backbone over a build's pending files.

An engine embeds (row, path) pairs with a backbone and hands each finished shard of rows to a
sink; `build_index` persists every shard as a checkpoint the moment it arrives, so an
interrupted build resumes from the shards it got, whichever engine made them.

* ``local`` (LocalEngine): this process, DataLoader decoders, one model (geoindex.extraction).
* ``ray`` (RayEngine): shards as Ray tasks over a cluster's CPU or GPU slots; a task whose
  worker dies is retried by Ray. Needs ``pip install geoindex[ray]``.
"""
from __future__ import annotations

from ..errors import GeoindexError
from .base import ENGINES, BackboneRecipe, Engine, Shard, Sink

__all__ = ["ENGINES", "BackboneRecipe", "Engine", "Shard", "Sink", "get_engine"]


def get_engine(name: str = "local", address: str | None = None, **options) -> Engine:
    """An engine by name: 'local', or 'ray' (address: a running cluster's, e.g. 'auto' or 'HOST:PORT')."""
    if name == "local":
        if address:
            raise GeoindexError("--ray-address only applies to --engine ray")
        from .local import LocalEngine
        return LocalEngine(**options)
    if name == "ray":
        from .ray import RayEngine
        return RayEngine(address=address, **options)
    raise GeoindexError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
