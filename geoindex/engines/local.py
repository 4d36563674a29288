"""The in-process engine: geoindex.extraction.iter_embeddings, batches gathered into shards by size or age."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..backbones import Backbone
from ..config import BuildConfig, ExtractionConfig
from ..extraction import iter_embeddings
from ..fileio import fault_point
from ..images import DEFAULT_MAX_PIXELS
from .base import Shard, Sink


class LocalEngine:
    name = "local"

    def embed(self, backbone: Backbone, rows: np.ndarray, paths: Sequence[str], *, sink: Sink,
              batch_size: int = ExtractionConfig.batch_size,
              num_workers: int | None = None, device="auto", progress: bool = True,
              shard_rows: int = BuildConfig.checkpoint_rows,
              shard_seconds: float = BuildConfig.checkpoint_seconds, on_batch: Callable[[int], None] | None = None,
              max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        buffer: list[Shard] = []
        buffered, last_flush = 0, time.monotonic()

        def flush():
            nonlocal buffer, buffered, last_flush
            if buffer:
                sink(Shard.concat(buffer))
            buffer, buffered, last_flush = [], 0, time.monotonic()

        batches = 0
        try:
            for item in iter_embeddings(backbone, paths, batch_size=batch_size, num_workers=num_workers, device=device,
                                        progress=progress, desc=f"embedding ({backbone.name})", max_pixels=max_pixels):
                buffer.append(Shard(rows[item.positions], item.ok, list(item.errors),
                                    item.embeddings.astype(np.float32, copy=False),
                                    list(item.digests or [""] * len(item.positions))))
                buffered += len(item.positions)
                if buffered >= shard_rows or time.monotonic() - last_flush >= shard_seconds:
                    flush()
                batches += 1
                fault_point("extract")
                if on_batch is not None:
                    on_batch(batches)
        except BaseException:
            try:
                flush()  # on Ctrl-C and SIGTERM too: what was embedded is kept for the resume
            except OSError:
                pass  # disk full while saving: the shards written before are still there
            raise
        flush()
