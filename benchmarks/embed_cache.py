"""Embeddings of a dataset's photos cached once per backbone, with geoindex's own pipeline.

    python benchmarks/embed_cache.py --data DIR_OR_CSV --backbone effnet [--flip] [--cache DIR]

Writes DIR/<backbone>.npz (and DIR/<backbone>_flip.npz with --flip: the same photos mirrored
left-right) holding float32 L2-normalised `embeddings`, the `paths` in the order of the
dataset's records, an `ok` mask, and `seconds`/`images_per_s` of the pass on this machine.
With --flip one decode feeds both views, so `seconds` is the cost of original + mirror together.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geoindex.backbones import create_backbone
from geoindex.extraction import iter_embeddings


class _WithMirror(nn.Module):
    """Embeds a batch and its left-right mirror in one forward; (B, 2D) unnormalised."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        both = self.model(torch.cat([x, x.flip(3)]))
        return torch.cat(both.chunk(2), dim=1)


def embed_with_mirror(backbone, paths, **kwargs):
    """(original, mirrored, ok, seconds): L2-normalised float32, one decode per photo."""
    dim = backbone.embed_dim
    original = np.full((len(paths), dim), np.nan, np.float32)
    mirrored = np.full((len(paths), dim), np.nan, np.float32)
    ok_all = np.zeros(len(paths), bool)
    backbone.model = _WithMirror(backbone.model)
    backbone.embed_dim = 2 * dim
    try:
        start = time.perf_counter()
        for item in iter_embeddings(backbone, paths, normalize=False, **kwargs):
            rows = item.positions[item.ok]
            a, b = item.embeddings[:, :dim], item.embeddings[:, dim:]
            original[rows] = a / np.linalg.norm(a, axis=1, keepdims=True)
            mirrored[rows] = b / np.linalg.norm(b, axis=1, keepdims=True)
            ok_all[item.positions] = item.ok
        seconds = time.perf_counter() - start
    finally:
        backbone.model = backbone.model.model
        backbone.embed_dim = dim
    return original, mirrored, ok_all, seconds


def embed_plain(backbone, paths, **kwargs):
    out = np.full((len(paths), backbone.embed_dim), np.nan, np.float32)
    ok_all = np.zeros(len(paths), bool)
    start = time.perf_counter()
    for item in iter_embeddings(backbone, paths, **kwargs):
        out[item.positions[item.ok]] = item.embeddings
        ok_all[item.positions] = item.ok
    return out, ok_all, time.perf_counter() - start


def cache_path(cache: Path, backbone: str, flip: bool = False) -> Path:
    return Path(cache) / f"{backbone}{'_flip' if flip else ''}.npz"


def ensure_cached(paths, backbone_name: str, cache: Path, flip: bool = False, batch_size: int = 32,
                  progress: bool = True) -> None:
    """Compute and save what is missing from the cache; reuse what is there (same paths, same order)."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    targets = [cache_path(cache, backbone_name)] + ([cache_path(cache, backbone_name, True)] if flip else [])
    if all(t.is_file() and list(np.load(t)["paths"]) == list(paths) for t in targets):
        return
    backbone = create_backbone(backbone_name)
    meta = {"backbone": backbone_name, "image_size": backbone.image_size, "threads": torch.get_num_threads(),
            "weights_sha256": backbone.weights.sha256 or ""}
    if flip:
        original, mirrored, ok, seconds = embed_with_mirror(backbone, paths, batch_size=batch_size, progress=progress)
        views = {targets[0]: original, targets[1]: mirrored}
    else:
        original, ok, seconds = embed_plain(backbone, paths, batch_size=batch_size, progress=progress)
        views = {targets[0]: original}
    for target, embeddings in views.items():
        np.savez(target, embeddings=embeddings, paths=np.array(paths), ok=ok, seconds=seconds,
                 images_per_s=len(paths) / seconds, with_mirror=flip, **meta)
        print(f"saved {target}: {ok.sum()}/{len(paths)} photos, {len(paths) / seconds:.1f} img/s"
              f"{' (original + mirror)' if flip else ''}", file=sys.stderr)


def dataset_paths(data) -> list[str]:
    from geoindex.data import scan_dataset
    return [str(p) for p in scan_dataset(data).records["path"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "geoindex-accuracy"))
    args = parser.parse_args(argv)
    ensure_cached(dataset_paths(args.data), args.backbone, Path(args.cache), args.flip)


if __name__ == "__main__":
    main()
