"""FAISS indexes over L2-normalised embeddings (inner product = cosine similarity).

Indexes are built from the embeddings file in row blocks, saved in CPU format (so one file
serves CPU and GPU machines), and moved to the GPU at load time when there is one.

Which index for which size (measured by benchmarks/knn.py, figures in benchmarks/results/):

* ``flat``: exact; below ~50k photos a query scans the matrix in a few milliseconds anyway.
* ``hnsw`` (LARGE_INDEX_DEFAULT): the default for large indexes. A graph over a PCA-reduced
  copy of the vectors (d/4 dimensions) proposes rerank x k candidates, which are re-scored
  exactly from the float16 embeddings already on disk. Answers one photo at a time > 20x faster
  than float32 brute force at N=100k, d=1024, with >= 99% of top-1 city votes unchanged.
* ``ivfpq``: compressed codes (1/32 of float32) for when the index must be small; slower per
  query than hnsw on clustered embeddings, whose neighbours spread over many inverted lists.
"""
from __future__ import annotations

import contextlib
import math

import faiss
import numpy as np

from .config import INDEX_TYPES  # noqa: F401  (build and the CLI name them from here too)
from .errors import GeoindexError
from .fileio import atomic_path

LARGE_INDEX_DEFAULT = "hnsw"
TRAINED_TYPES = ("ivfpq", "hnsw")  # need a training sample (k-means, PCA)


def hnsw_pca_dim(n: int, d: int) -> int:
    """PCA width of the hnsw graph: d/4 when d and n are large enough to learn it, else 0 (no PCA)."""
    return d // 4 if d >= 256 and n >= 4096 else 0


def default_params(kind: str, n: int, d: int) -> dict:
    """Parameters from the data's size, after FAISS's own guidelines (nlist ~ 4*sqrt(N), >= 39 points per list)."""
    if kind == "flat":
        return {}
    if kind == "ivfpq":
        nlist = int(max(1, min(4 * math.sqrt(n), n // 39, 65536)))
        m = next(m for m in (d // 8, d // 4, d // 2, d, 1) if m >= 1 and d % m == 0)
        nbits = int(max(1, min(8, math.floor(math.log2(max(2, n // 39))))))
        # Measured on clustered 1024-d embeddings (benchmarks/knn.py): neighbours of unseen places
        # spread over ~1/5 of the lists, and PQ codes need 16 x k candidates re-scored exactly for
        # the vote to agree with exact search >= 99% of the time.
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, max(32, nlist // 5)), "rerank": 16}
    if kind == "hnsw":
        # Tuned by benchmarks/knn.py on tuning queries apart from the reported ones (d=1024): recall
        # is set by efSearch (the graph), not by the PCA width or the re-rank factor. The smallest
        # efSearch keeping >= 99% of top-1 city votes and recall@20 >= 0.97 was 128 at N=100k and
        # 192 at N=530k; 128 * (N / 100k) ** 0.25 fits both (beyond 530k it is extrapolated).
        pca = hnsw_pca_dim(n, d)
        ef = max(128, 32 * round(4 * (max(n, 1) / 100_000) ** 0.25))
        return {"M": 32, "efConstruction": 80, "efSearch": ef, "pca": pca, "rerank": 2 if pca else 1}
    raise GeoindexError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_TYPES)}")


def new_index(kind: str, d: int, params: dict) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "ivfpq":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
        index.nprobe = params["nprobe"]
        # Small data sets cannot give k-means its 39 points per centroid; accept that quietly.
        index.cp.min_points_per_centroid = 1
        index.pq.cp.min_points_per_centroid = 1
        return index
    if kind == "hnsw":
        pca = int(params.get("pca", 0))
        if not pca:
            index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
        else:
            # PCA centres the data, which changes inner products but not L2 distances; for unit
            # vectors L2 ranks as cosine does, so the reduced graph searches by L2.
            index = faiss.IndexHNSWFlat(pca, params["M"], faiss.METRIC_L2)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
        return faiss.IndexPreTransform(faiss.PCAMatrix(d, pca), index) if pca else index
    raise GeoindexError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_TYPES)}")


def build_from_blocks(kind: str, d: int, n: int, blocks, training_sample=None, params: dict | None = None,
                      progress: bool = True) -> tuple[faiss.Index, dict]:
    """Build an index from an iterable of float32 row blocks (added in order, so ids = row numbers)."""
    from tqdm.auto import tqdm

    params = {**default_params(kind, n, d), **(params or {})}
    index = new_index(kind, d, params)
    if not index.is_trained:
        if training_sample is None:
            raise GeoindexError(f"a {kind} index needs a training sample")
        index.train(np.ascontiguousarray(training_sample, dtype=np.float32))
    with tqdm(total=n, desc=f"indexing ({kind})", unit="vec", disable=not progress) as bar:
        for block in blocks:
            index.add(np.ascontiguousarray(block, dtype=np.float32))
            bar.update(len(block))
    return index, params


def save_index(index: faiss.Index, path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index_file(path) -> faiss.Index:
    return faiss.read_index(str(path))


def gpu_count() -> int:
    try:
        return faiss.get_num_gpus()
    except AttributeError:  # a CPU-only FAISS build
        return 0


def _hnsw(index: faiss.Index):
    """The HNSW index inside `index` (itself, or behind a PCA transform), else None."""
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Move to all GPUs when FAISS sees any (HNSW has no GPU form and stays put)."""
    if gpu_count() == 0 or _hnsw(index) is not None:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True  # halves GPU memory for flat/IVF vectors; recall is unaffected at cosine scale
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    if nprobe is not None:
        try:
            faiss.extract_index_ivf(index).nprobe = nprobe
        except RuntimeError:
            pass
    if ef_search is not None and _hnsw(index) is not None:
        _hnsw(index).hnsw.efSearch = ef_search


def exact_search(queries: np.ndarray, blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product against row blocks, merged block by block (bounded memory)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for start, block in blocks:
        s, i = faiss.knn(q, np.ascontiguousarray(block, dtype=np.float32), min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, i + start], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_s, best_i


def rerank(queries: np.ndarray, candidate_ids: np.ndarray, vectors, k: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products for each query's candidates (rows of `vectors`, e.g. a memory map), top k.

    Compressed codes (PQ) blur the fine differences that decide which neighbours come first;
    re-scoring a few times k candidates with the stored vectors restores them.
    """
    q = np.asarray(queries, dtype=np.float32)
    k = min(k, candidate_ids.shape[1])
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for start in range(0, len(q), chunk):
        ids = candidate_ids[start:start + chunk]
        uniq, inverse = np.unique(np.clip(ids, 0, None), return_inverse=True)
        rows = np.asarray(vectors[uniq], dtype=np.float32)[inverse.reshape(ids.shape)]
        sims = np.einsum("qd,qkd->qk", q[start:start + chunk], rows)
        sims[ids < 0] = -np.inf
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out_s[start:start + chunk] = np.take_along_axis(sims, top, 1)
        out_i[start:start + chunk] = np.take_along_axis(ids, top, 1)
    return out_s, out_i


@contextlib.contextmanager
def omp_threads(n: int):
    """FAISS's OpenMP threads for the calling thread only (OpenMP keeps the setting per thread)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def search(index: faiss.Index, queries: np.ndarray, k: int, refine_vectors=None, rerank_factor: int = 1):
    """k nearest by inner product; with refine_vectors, exact re-ranking of rerank_factor * k candidates.

    A single query runs on one thread: there is nothing to share out, and a parallel region
    waits for its slowest thread, which a busy machine may not schedule for milliseconds.
    """
    if len(queries) == 1 and faiss.omp_get_max_threads() > 1:
        with omp_threads(1):
            return search(index, queries, k, refine_vectors, rerank_factor)
    k = min(k, index.ntotal)
    if refine_vectors is None or rerank_factor <= 1:
        scores, ids = index.search(queries, k)
        if index.metric_type == faiss.METRIC_L2:  # unit vectors: |q - x|^2 = 2 - 2 cos
            scores = 1 - scores / 2
        return scores, ids
    _, candidates = index.search(queries, min(k * rerank_factor, index.ntotal))
    return rerank(queries, candidates, refine_vectors, k)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    k = exact_ids.shape[1]
    hits = sum(len(set(a[:k]) & set(e[e >= 0])) for a, e in zip(approx_ids, exact_ids))
    return hits / max(1, int((exact_ids >= 0).sum()))
