"""The embeddings file: one HDF5 group per split with embeddings and per-row metadata.

Layout: /<split>/embeddings (N, D) float16|float32, L2-normalised, contiguous;
/<split>/{path, city, label, lat, lon, place_id, yyyymm (capture month, -1 unknown; absent in older files)}, and the photo's key {size, mtime_ns, digest} (what a later
build compares to reuse an embedding instead of recomputing it); root attrs: classes (city ids), embed_dim, backbone.
Readers stream it in row blocks, so no step needs the whole matrix in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd

from .data import SPLITS

STRING = h5py.string_dtype(encoding="utf-8")
META_FIELDS = ("path", "city", "label", "lat", "lon", "place_id")
KEY_FIELDS = ("size", "mtime_ns", "digest")


def create_store(path, counts: dict[str, int], embed_dim: int, dtype: str, classes: list[str], attrs: dict) -> h5py.File:
    """Open a new file with every split's datasets allocated; the caller fills rows and closes it."""
    f = h5py.File(path, "w")
    f.attrs["classes"] = np.array(classes, dtype=object)
    f.attrs["embed_dim"] = embed_dim
    for key, value in attrs.items():
        f.attrs[key] = value
    for split in SPLITS:
        n = counts.get(split, 0)
        g = f.create_group(split)
        # Contiguous, uncompressed: readers can memory-map the rows (exact re-ranking after a
        # compressed search reads a few rows per query straight from the page cache).
        g.create_dataset("embeddings", shape=(n, embed_dim), dtype=dtype, chunks=None)
        g.create_dataset("path", shape=(n,), dtype=STRING)
        g.create_dataset("city", shape=(n,), dtype=STRING)
        g.create_dataset("label", shape=(n,), dtype=np.int32)
        g.create_dataset("lat", shape=(n,), dtype=np.float64)
        g.create_dataset("lon", shape=(n,), dtype=np.float64)
        g.create_dataset("place_id", shape=(n,), dtype=np.int64)
        g.create_dataset("yyyymm", shape=(n,), dtype=np.int32, fillvalue=-1)
        g.create_dataset("size", shape=(n,), dtype=np.int64)
        g.create_dataset("mtime_ns", shape=(n,), dtype=np.int64)
        g.create_dataset("digest", shape=(n,), dtype=STRING)
    return f


def write_metadata(group: h5py.Group, records: pd.DataFrame, classes: list[str]) -> None:
    label_of = {c: i for i, c in enumerate(classes)}
    group["path"][:] = records["path"].astype(str).to_numpy(dtype=object)
    group["city"][:] = records["city"].astype(str).to_numpy(dtype=object)
    group["label"][:] = records["city"].map(label_of).to_numpy(dtype=np.int32)
    group["lat"][:] = records["lat"].to_numpy(dtype=np.float64)
    group["lon"][:] = records["lon"].to_numpy(dtype=np.float64)
    group["place_id"][:] = records["place_id"].to_numpy(dtype=np.int64)
    if "yyyymm" in records:
        group["yyyymm"][:] = records["yyyymm"].to_numpy(dtype=np.int32)
    for name in ("size", "mtime_ns"):
        if name in records:
            group[name][:] = records[name].to_numpy(dtype=np.int64)
    if "digest" in records:
        group["digest"][:] = records["digest"].astype(str).to_numpy(dtype=object)


class EmbeddingStore:
    """Read access to an embeddings file; small per-row columns are loaded once, vectors on demand."""

    def __init__(self, path):
        self.path = Path(path)
        self.file = h5py.File(self.path, "r")
        self.classes = [c.decode() if isinstance(c, bytes) else str(c) for c in self.file.attrs["classes"]]
        self.embed_dim = int(self.file.attrs["embed_dim"])
        self._meta: dict[str, pd.DataFrame] = {}

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def count(self, split: str) -> int:
        return self.file[split]["embeddings"].shape[0]

    def embeddings(self, split: str, rows=None) -> np.ndarray:
        data = self.file[split]["embeddings"]
        if rows is None:
            return data[...].astype(np.float32)
        uniq, inverse = np.unique(np.asarray(rows), return_inverse=True)  # h5py wants sorted, unique rows
        return data[uniq].astype(np.float32)[inverse]

    def memmap(self, split: str) -> np.ndarray | None:
        """A read-only memory map of a split's embeddings, or None where the layout does not allow one."""
        data = self.file[split]["embeddings"]
        offset = data.id.get_offset()
        if offset is None or data.chunks is not None or data.compression is not None:
            return None
        return np.memmap(self.path, dtype=data.dtype, mode="r", offset=offset, shape=data.shape)

    def iter_blocks(self, split: str, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        data = self.file[split]["embeddings"]
        for start in range(0, data.shape[0], block_rows):
            yield start, data[start:start + block_rows].astype(np.float32)

    def photo_keys(self, split: str) -> pd.DataFrame | None:
        """path, size, mtime_ns, digest per row; None for files written before photos were keyed."""
        g = self.file[split]
        if not all(name in g for name in KEY_FIELDS):
            return None
        return pd.DataFrame({"path": g["path"].asstr()[...], "size": g["size"][...], "mtime_ns": g["mtime_ns"][...],
                             "digest": g["digest"].asstr()[...]})

    def labels(self, split: str) -> np.ndarray:
        return self.file[split]["label"][...]

    def metadata(self, split: str) -> pd.DataFrame:
        if split not in self._meta:
            g = self.file[split]
            self._meta[split] = pd.DataFrame({
                "path": g["path"].asstr()[...], "city": g["city"].asstr()[...], "label": g["label"][...],
                "lat": g["lat"][...], "lon": g["lon"][...], "place_id": g["place_id"][...],
                "yyyymm": g["yyyymm"][...] if "yyyymm" in g else np.full(len(g["path"]), -1, dtype=np.int32)})
        return self._meta[split]
