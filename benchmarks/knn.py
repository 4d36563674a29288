"""Nearest-neighbour search: FAISS (flat, ivfpq, hnsw) against scikit-learn and NumPy brute force, one run.

    python benchmarks/knn.py --n 100000 --dim 1024                  # flat vs sklearn vs numpy, ivfpq, hnsw
    python benchmarks/knn.py --n 530000 --dim 1024 --methods flat,ivfpq --baselines none --streaming
    python benchmarks/knn.py --real NAME [--index-dir DIR]           # a built index: train = database, test = queries

Synthetic data: 23 "cities", each a cloud of "places", each place a cloud of images, L2-normalised;
queries come from places the database has never seen (as a place-disjoint test split does).
For every method: build seconds, index bytes, queries/s at batch 1 and batch --batch, recall@k against
exact search, and how often the top-1 city of the softmax vote agrees with the exact neighbours' vote.
--streaming also builds the ivfpq index from an HDF5 file in a fresh process (geoindex's own streaming
path) and reports that process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEAK_RSS_SOURCE, Timer, save  # noqa: E402

from geoindex.search import build_from_blocks, gpu_count, recall_at_k, search as geoindex_search, to_gpu  # noqa: E402
from geoindex.voting import vote  # noqa: E402

N_CITIES = 23


class ClusteredEmbeddings:
    """Deterministic city > place > image clouds, generated in chunks so any N fits in bounded memory.

    Like real CNN features, the variation lives mostly in a low-dimensional subspace (`intrinsic`
    dims) on top of a component shared by every street photo, so cities overlap: exact kNN is far
    from perfect, and approximate search has real ties to get wrong.
    """

    def __init__(self, n: int, dim: int, images_per_place: int = 20, seed: int = 0, intrinsic: int = 32,
                 city_scale: float = 0.6, place_scale: float = 1.0, image_scale: float = 0.5,
                 shared_scale: float = 1.0, isotropic_scale: float = 0.3):
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.normal(size=(dim, intrinsic)))
        self.basis = basis.T.astype(np.float32)  # (intrinsic, dim), orthonormal rows
        self.shared = rng.normal(size=dim).astype(np.float32)
        self.shared *= shared_scale / np.linalg.norm(self.shared)
        self.n_places = max(N_CITIES, n // images_per_place)
        self.city_centres = self._low_rank(rng, N_CITIES, city_scale)
        self.place_city = np.arange(self.n_places) % N_CITIES
        self.place_scale, self.image_scale, self.isotropic_scale = place_scale, image_scale, isotropic_scale
        self.place_centres = self._places(rng, self.place_city)

    def _low_rank(self, rng, count, scale):
        return (rng.normal(size=(count, self.basis.shape[0])).astype(np.float32) @ self.basis) * (
            scale / np.sqrt(self.basis.shape[0]))

    def _places(self, rng, cities):
        return self.shared + self.city_centres[cities] + self._low_rank(rng, len(cities), self.place_scale)

    def _images(self, rng, centres):
        x = centres + self._low_rank(rng, len(centres), self.image_scale)
        x += rng.normal(size=centres.shape).astype(np.float32) * (self.isotropic_scale / np.sqrt(self.dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, start])
        places = np.arange(start, stop) % self.n_places
        return self._images(rng, self.place_centres[places]), self.place_city[places]

    def database(self, chunk: int = 65536):
        for start in range(0, self.n, chunk):
            yield self.chunk(start, min(self.n, start + chunk))

    def queries(self, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 10**9])
        cities = np.arange(n_queries) % N_CITIES
        return self._images(rng, self._places(rng, cities)), cities  # unseen places


def qps(search, queries: np.ndarray, batch: int, max_seconds: float = 10.0) -> float:
    """Queries per second at a given batch size, over as many batches as fit in max_seconds (at least one)."""
    search(queries[:batch])  # warm-up
    done, start = 0, time.perf_counter()
    while done < len(queries):
        search(queries[done:done + batch])
        done += len(queries[done:done + batch])
        if time.perf_counter() - start > max_seconds:
            break
    return done / (time.perf_counter() - start)


def city_votes(ids, sims, labels, n_classes):
    return vote(np.where(ids >= 0, labels[np.clip(ids, 0, None)], -1), sims, n_classes).argmax(1)


def numpy_search(xb):
    def search(q, k=20):
        s = q @ xb.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1)
        return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)
    return search


STREAM_CHILD = """
import json, resource, sys, time
import numpy as np
from geoindex.search import build_from_blocks
from geoindex.store import EmbeddingStore
path, kind = sys.argv[1], sys.argv[2]
t = time.perf_counter()
with EmbeddingStore(path) as store:
    n, d = store.count("train"), store.embed_dim
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, 100_000), replace=False))
    sample = store.embeddings("train", rows)
    index, params = build_from_blocks(kind, d, n, (b for _, b in store.iter_blocks("train")), sample, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "ntotal": int(index.ntotal), "params": params,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def streaming_build(data: ClusteredEmbeddings, workdir: Path, kind: str) -> dict:
    """Write the database to an HDF5 store in chunks, then build from it in a fresh process."""
    from geoindex.store import create_store

    path = workdir / "stream.h5"
    with create_store(path, {"train": data.n}, data.dim, "float16", [str(c) for c in range(N_CITIES)], {}) as f:
        start = 0
        for x, _ in data.database():
            f["train"]["embeddings"][start:start + len(x)] = x.astype(np.float16)
            start += len(x)
    baseline = subprocess.run([sys.executable, "-c", PEAK_RSS_SOURCE + "import faiss, numpy, h5py, geoindex.search, "
                               "geoindex.store\nprint(peak_rss_mb())"], capture_output=True, text=True, check=True)
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SOURCE + STREAM_CHILD, str(path), kind], capture_output=True,
                          text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["import_rss_mb"] = float(baseline.stdout.strip())
    result["peak_rss_beyond_imports_mb"] = result["peak_rss_mb"] - result["import_rss_mb"]
    result["h5_bytes"] = path.stat().st_size
    path.unlink()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--methods", default="flat,ivfpq,hnsw")
    parser.add_argument("--baselines", default="sklearn,numpy", help="sklearn,numpy or none")
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--streaming", action="store_true", help="also build ivfpq from HDF5 in a fresh process")
    parser.add_argument("--real", default=None, help="a built index's name: its embeddings instead of synthetic ones")
    parser.add_argument("--index-dir", default=None)
    parser.add_argument("--device", default="auto", help="cuda: also time FAISS on the GPU")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    if args.real:
        from geoindex.geo_index import load_index
        index = load_index(args.real, args.index_dir, device="cpu")
        xb, yb = index.store.embeddings("train"), index.store.labels("train")
        xq, yq = index.store.embeddings("test"), index.store.labels("test")
        n_classes, source = len(index.classes), f"real:{args.real}"
        data = None
    else:
        data = ClusteredEmbeddings(args.n, args.dim)
        with Timer() as t:
            parts = list(data.database())
            xb, yb = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            del parts
        xq, yq = data.queries(args.queries)
        n_classes, source = N_CITIES, "synthetic"
        print(f"generated {len(xb)} x {xb.shape[1]} database vectors in {t.seconds:.1f} s")
    n, d, k = xb.shape[0], xb.shape[1], args.k
    print(f"{source}: N={n}, d={d}, {len(xq)} queries, k={k}, {faiss.omp_get_max_threads()} threads")

    exact = faiss.IndexFlatIP(d)
    exact.add(xb)
    exact_sims, exact_ids = exact.search(xq, k)
    exact_votes = city_votes(exact_ids, exact_sims, yb, n_classes)
    results = {"source": source, "n": n, "dim": d, "queries": len(xq), "k": k, "batch": args.batch,
               "exact_vote_accuracy": float((exact_votes == yq).mean()), "methods": {}}
    print(f"exact kNN vote accuracy on the queries: {results['exact_vote_accuracy']:.3f}")

    def record(name, build_seconds, nbytes, search, batch1_queries=200):
        sims, ids = search(xq, k)
        row = {"build_s": build_seconds, "bytes": int(nbytes),
               "qps_batch1": qps(lambda q: search(q, k), xq[:batch1_queries], 1),
               f"qps_batch{args.batch}": qps(lambda q: search(q, k), xq, args.batch),
               f"recall@{k}": recall_at_k(np.asarray(ids), exact_ids),
               "top1_city_agreement": float((city_votes(np.asarray(ids), np.asarray(sims), yb, n_classes) == exact_votes).mean())}
        results["methods"][name] = row
        print(f"{name:<14} build {row['build_s']:7.1f} s  {row['bytes'] / 2**20:9.1f} MiB  "
              f"batch1 {row['qps_batch1']:9.1f} q/s  batch{args.batch} {row[f'qps_batch{args.batch}']:9.1f} q/s  "
              f"recall@{k} {row[f'recall@{k}']:.4f}  top-1 city agreement {row['top1_city_agreement']:.4f}")

    workdir = Path(tempfile.mkdtemp(prefix="geoindex-knn-"))
    sample = xb[np.random.default_rng(0).choice(n, size=min(n, 100_000), replace=False)]
    for kind in [m for m in args.methods.split(",") if m]:
        params = {"nprobe": args.nprobe} if (kind == "ivfpq" and args.nprobe) else None
        with Timer() as t:
            index, used = build_from_blocks(kind, d, n, [xb[i:i + 65536] for i in range(0, n, 65536)],
                                            sample if kind == "ivfpq" else None, params, progress=False)
        nbytes = faiss.serialize_index(index).nbytes
        refine, factor = None, int(used.get("rerank", 1))
        if factor > 1:  # as geoindex does: exact re-ranking from float16 vectors on disk (memory-mapped)
            np.save(workdir / "refine.npy", xb.astype(np.float16))
            refine = np.load(workdir / "refine.npy", mmap_mode="r")
        record(f"faiss-{kind}", t.seconds, nbytes, lambda q, kk, index=index, refine=refine, factor=factor:
               geoindex_search(index, q, kk, refine, factor))
        results["methods"][f"faiss-{kind}"]["params"] = used
        if refine is not None:
            results["methods"][f"faiss-{kind}"]["refine_disk_bytes"] = int(refine.nbytes)
            # The same index without re-ranking, to show what the re-ranking buys.
            record(f"faiss-{kind}-norerank", t.seconds, nbytes, index.search)
        if args.device == "cuda" or (args.device == "auto" and gpu_count()):
            gpu_index = to_gpu(index)
            if gpu_index is not index:
                record(f"faiss-{kind}-gpu", 0.0, 0, gpu_index.search, batch1_queries=len(xq))
        del index

    baselines = [b for b in args.baselines.split(",") if b and b != "none"]
    if "sklearn" in baselines:
        from sklearn.neighbors import KNeighborsClassifier
        with Timer() as t:
            knn = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(xb, yb)
        nbytes = xb.nbytes  # it keeps the training matrix

        def sk_search(q, kk):
            dist, ids = knn.kneighbors(q, kk)
            return 1 - dist ** 2 / 2, ids  # unit vectors: cosine from euclidean distance
        record("sklearn-brute", t.seconds, nbytes, sk_search, batch1_queries=50)
    if "numpy" in baselines:
        search = numpy_search(xb)
        record("numpy-matmul", 0.0, xb.nbytes, search, batch1_queries=50)

    methods = results["methods"]
    if "faiss-flat" in methods and "sklearn-brute" in methods:
        for key in ("qps_batch1", f"qps_batch{args.batch}"):
            ratio = methods["faiss-flat"][key] / methods["sklearn-brute"][key]
            results[f"flat_over_sklearn_{key}"] = ratio
            print(f"faiss-flat / sklearn-brute {key}: {ratio:.1f}x")
    if "faiss-flat" in methods and "faiss-ivfpq" in methods:
        results["ivfpq_bytes_over_flat"] = methods["faiss-ivfpq"]["bytes"] / methods["faiss-flat"]["bytes"]
        print(f"ivfpq memory / flat memory: 1/{1 / results['ivfpq_bytes_over_flat']:.1f}; "
              f"top-1 city agreement {methods['faiss-ivfpq']['top1_city_agreement']:.4f}")
    if args.streaming and data is not None:
        del exact, xb
        with tempfile.TemporaryDirectory() as tmp:
            results["streaming_ivfpq"] = streaming_build(data, Path(tmp), "ivfpq")
        s = results["streaming_ivfpq"]
        print(f"streaming ivfpq build from HDF5 ({s['h5_bytes'] / 2**20:.0f} MiB file): {s['seconds']:.0f} s, "
              f"peak RSS {s['peak_rss_mb']:.0f} MB ({s['peak_rss_beyond_imports_mb']:.0f} MB beyond imports)")
    save(f"knn_{source.replace(':', '_')}_n{n}_d{d}{args.tag}", results)


if __name__ == "__main__":
    main()
