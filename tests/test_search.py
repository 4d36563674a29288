"""geoindex.search: the large-index default (hnsw over a PCA copy, exact re-rank) against exact search."""
import faiss
import numpy as np
import pytest

from geoindex.search import (LARGE_INDEX_DEFAULT, build_from_blocks, default_params, exact_search, recall_at_k, search,
                             set_search_params, to_gpu)


def clustered(n, d, seed=0):
    """Unit vectors in 40 clusters whose spread lives in a 24-d subspace, as image embeddings' does."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, 24)))[0].T
    centres = rng.normal(size=(40, 24)) @ basis + rng.normal(size=d) / 4
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, 24)) @ basis + 0.05 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(6000, 256)
    return x[:5800], x[5800:]


def test_hnsw_is_the_large_index_default_and_uses_pca_only_when_it_can_learn_it():
    assert LARGE_INDEX_DEFAULT == "hnsw"
    big, small = default_params("hnsw", 100_000, 1024), default_params("hnsw", 500, 1024)
    assert big["pca"] == 256 and big["rerank"] > 1
    assert small["pca"] == 0 and small["rerank"] == 1  # too few rows to learn a 256-d PCA: plain graph, exact scores
    assert default_params("hnsw", 100_000, 128)["pca"] == 0


def test_hnsw_with_pca_and_rerank_finds_the_exact_neighbours_with_exact_scores(data):
    xb, xq = data
    index, params = build_from_blocks("hnsw", 256, len(xb), [xb[:3000], xb[3000:]], xb, progress=False)
    assert params["pca"] == 64 and isinstance(index, faiss.IndexPreTransform) and index.ntotal == len(xb)
    exact_s, exact_i = exact_search(xq, [(0, xb)], 20)
    sims, ids = search(index, xq, 20, xb.astype(np.float16), params["rerank"])
    assert recall_at_k(ids, exact_i) > 0.95
    # Re-ranked scores are cosine similarities, not distances in the PCA space.
    np.testing.assert_allclose(sims[:, 0], np.einsum("qd,qd->q", xq, xb[ids[:, 0]]), atol=2e-3)
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_without_rerank_l2_distances_come_back_as_similarities(data):
    xb, xq = data
    index, _ = build_from_blocks("hnsw", 256, len(xb), [xb], xb, {"rerank": 1}, progress=False)
    sims, ids = search(index, xq, 5)
    true = np.einsum("qd,qkd->qk", xq, xb[ids])
    assert np.abs(sims - true).max() < 0.1  # approximate (PCA), but on the cosine scale, largest first
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_a_single_query_gives_the_same_answer_as_in_a_batch(data):
    xb, xq = data
    index, params = build_from_blocks("hnsw", 256, len(xb), [xb], xb, progress=False)
    refine = xb.astype(np.float16)
    batch_s, batch_i = search(index, xq[:8], 10, refine, params["rerank"])
    threads = faiss.omp_get_max_threads()
    for q in range(8):
        s, i = search(index, xq[q:q + 1], 10, refine, params["rerank"])
        np.testing.assert_array_equal(i[0], batch_i[q])
    assert faiss.omp_get_max_threads() == threads  # the one-thread setting for single queries is undone


def test_search_params_reach_the_graph_behind_the_pca(data):
    xb, _ = data
    index, _ = build_from_blocks("hnsw", 256, len(xb), [xb], xb, progress=False)
    set_search_params(index, ef_search=17)
    assert faiss.downcast_index(index.index).hnsw.efSearch == 17
    assert to_gpu(index) is index  # no GPU form: stays on the CPU
