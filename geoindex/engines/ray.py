"""Extraction on a Ray cluster: each shard of the file list is a Ray task on one CPU or GPU slot.

The driver keeps a bounded number of shards in flight, takes them back with ray.wait as they
finish and hands each to the sink (build_index checkpoints it), so finished shards survive
anything that happens after. A task whose worker process dies is resubmitted by Ray
(max_retries); a shard lost with the driver is simply pending on the next run.

Every node must see the image paths and the weights file at the same paths (a shared or
replicated file system), and have geoindex installed.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

from ..backbones import Backbone
from ..config import BuildConfig, ExtractionConfig
from ..errors import GeoindexError
from .base import BackboneRecipe, Shard, Sink


def require_ray():
    try:
        import ray
    except ImportError:
        raise GeoindexError("--engine ray needs Ray: pip install 'geoindex[ray]'") from None
    return ray


@functools.lru_cache(maxsize=2)
def _backbone_in_this_worker(recipe: BackboneRecipe, device: str) -> Backbone:
    # Ray reuses worker processes across tasks: the model is built once per worker, not per shard.
    return recipe.build(device)


def embed_shard(recipe: BackboneRecipe, rows: np.ndarray, paths: list[str], batch_size: int, use_gpu: bool,
                on_shard_start: Callable[[np.ndarray], None] | None = None, max_pixels: int | None = None) -> Shard:
    """The Ray task: one shard, decoded in-process (the task owns one slot), embedded in batches."""
    import torch

    from ..extraction import iter_embeddings

    if on_shard_start is not None:
        on_shard_start(rows)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    backbone = _backbone_in_this_worker(recipe, device)
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    parts = [Shard(rows[item.positions], item.ok, list(item.errors), item.embeddings.astype(np.float32, copy=False),
                   list(item.digests or [""] * len(item.positions)))
             for item in iter_embeddings(backbone, paths, batch_size=batch_size, num_workers=0, device=device,
                                         progress=False, **kwargs)]
    if not parts:
        return Shard(rows[:0], np.zeros(0, bool), [], np.zeros((0, backbone.embed_dim), np.float32))
    return Shard.concat(parts)


class RayEngine:
    """Shards as Ray tasks: one per CPU slot (cpus_per_task cores each), or one per GPU when the cluster has GPUs.

    address: None starts a private Ray instance on this machine for the build (and stops it after);
    'auto' or 'HOST:PORT' joins a running cluster. When Ray is already initialised in this process,
    that session is used as it is.
    on_shard_start runs in the worker before each shard (a hook for fault-injection tests).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_task: float = 1, max_retries: int = 3,
                 max_shard_rows: int | None = None, on_shard_start: Callable[[np.ndarray], None] | None = None):
        require_ray()
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.max_retries = max_retries
        self.max_shard_rows = max_shard_rows
        self.on_shard_start = on_shard_start

    def embed(self, backbone: Backbone, rows: np.ndarray, paths: Sequence[str], *, sink: Sink,
              batch_size: int = ExtractionConfig.batch_size,
              num_workers: int | None = None, device="auto", progress: bool = True,
              shard_rows: int = BuildConfig.checkpoint_rows,
              shard_seconds: float = BuildConfig.checkpoint_seconds, on_batch: Callable[[int], None] | None = None,
              max_pixels: int | None = None) -> None:
        from tqdm.auto import tqdm

        ray = require_ray()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                # "local": a new private instance, never a cluster that `ray start` left on this machine.
                ray.init(address=self.address or "local", include_dashboard=False, logging_level="warning",
                         configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise GeoindexError(f"cannot reach a Ray cluster at {self.address or 'a new local instance'}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        pending_refs: dict = {}
        try:
            resources = ray.cluster_resources()
            use_gpu = str(device) != "cpu" and resources.get("GPU", 0) >= 1
            slots = int(resources.get("GPU", 0)) if use_gpu else max(1, int(resources.get("CPU", 1) // self.cpus_per_task))
            rows = np.asarray(rows, dtype=np.int64)
            paths = [str(p) for p in paths]
            # Several shards per slot balance uneven nodes; none bigger than a checkpoint would be.
            size = max(1, min(self.max_shard_rows or shard_rows, shard_rows, math.ceil(len(rows) / (4 * slots))))
            starts = list(range(0, len(rows), size))
            task = ray.remote(embed_shard).options(num_cpus=self.cpus_per_task, num_gpus=1 if use_gpu else 0,
                                                   max_retries=self.max_retries, retry_exceptions=False)
            recipe = BackboneRecipe.of(backbone)
            next_shard, finished = 0, 0
            with tqdm(total=len(rows), desc=f"embedding ({backbone.name}, ray: {slots} slots)", unit="img",
                      disable=not progress, smoothing=0.05) as bar:
                while next_shard < len(starts) or pending_refs:
                    while next_shard < len(starts) and len(pending_refs) < 2 * slots:
                        s = starts[next_shard]
                        ref = task.remote(recipe, rows[s:s + size], paths[s:s + size], batch_size, use_gpu,
                                          self.on_shard_start, max_pixels)
                        pending_refs[ref] = s
                        next_shard += 1
                    done, _ = ray.wait(list(pending_refs), num_returns=1)
                    for ref in done:
                        start = pending_refs.pop(ref)
                        try:
                            shard = ray.get(ref)
                        except ray.exceptions.RayTaskError as exc:
                            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                            if isinstance(cause, GeoindexError):
                                raise cause from None
                            raise GeoindexError(f"shard at row {rows[start]} failed on a Ray worker: "
                                                f"{type(cause).__name__}: {cause}") from None
                        except ray.exceptions.RayError as exc:
                            raise GeoindexError(f"shard at row {rows[start]} was lost {self.max_retries + 1} times "
                                                f"({type(exc).__name__}); finished shards are kept, rerun to resume") from None
                        sink(shard)
                        finished += 1
                        bar.update(len(shard.rows))
                        if on_batch is not None:
                            on_batch(finished)
        finally:
            for ref in pending_refs:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
