from __future__ import annotations

import numpy as np
import pytest

from curator.core.neighbours import (
    Graph,
    Neighbourhood,
    UnitRows,
    build,
    exact_knn,
    exact_reference,
    graph_width,
    knn,
    memory_note,
    normalise,
    pair_recall,
    synthetic_embeddings,
)
from curator.embedding.embed import EmbeddingCache, embedding_matrix


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    unit = normalise(x)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(sims, ids, axis=1)


def test_exact_graph_is_each_rows_nearest_other_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32)) * rng.uniform(0.5, 3.0, size=(300, 1))  # not unit: knn normalises
    graph = knn(x, 10)
    ids, sims = brute_force(x, 10)
    assert graph.exact and graph.ids.dtype == np.int64 and graph.sims.dtype == np.float32
    assert (graph.ids != np.arange(300)[:, None]).all()
    assert np.array_equal(graph.ids, ids)
    assert np.allclose(graph.sims, sims, atol=1e-5)


def test_fewer_rows_than_neighbours_asked_for_are_padded():
    x = np.eye(4, 8)
    graph = exact_knn(x, 6)
    assert graph.ids.shape == (4, 6)
    assert (graph.ids[:, :3] >= 0).all() and (graph.ids[:, 3:] == -1).all()
    assert np.isneginf(graph.sims[:, 3:]).all()
    assert knn(x, 6).k == 3  # knn asks for at most n - 1
    assert knn(np.ones((1, 8)), 5).ids.shape == (1, 0)


@pytest.fixture(scope="module")
def real_like():
    """8,000 real-like 2,304-wide unit rows (class centres, artist offsets, power-law noise, 1% planted copies)."""
    return synthetic_embeddings(8000, seed=3)


def test_synthetic_embeddings_look_like_lite0_embeddings_of_paintings(real_like):
    x = real_like["vectors"][:2000]
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    ranked = -np.sort(-sims, axis=1)
    assert 0.7 < np.median(ranked[:, 0]) < 0.9  # wikiart-dev: 0.79
    assert 0.45 < np.median(sims[np.triu_indices(2000, 1)]) < 0.65  # wikiart-dev: 0.57
    planted = real_like["planted"]
    cos = (real_like["vectors"][planted[:, 0]] * real_like["vectors"][planted[:, 1]]).sum(axis=1)
    assert cos.min() > 0.9 and np.median(cos) > np.median(ranked[:, 0]) + 0.1


@pytest.mark.slow
def test_compressed_graph_finds_the_exact_neighbours_with_exact_cosines(real_like):
    x = real_like["vectors"]
    graph = knn(x, 16, exact_limit=1000)
    assert not graph.exact and "compressed" in graph.method and graph.projection.shape == (2304, 256)
    queries = np.sort(np.random.default_rng(0).choice(len(x), 400, replace=False))
    reference = exact_reference(x, queries, 16)
    assert pair_recall(graph, reference, queries, 8) >= 0.98
    assert pair_recall(graph, reference, queries, 16) >= 0.95
    # the cosines are the full-width ones of the float16 unit rows, not the compressed codes' estimates
    half = x.astype(np.float16).astype(np.float32)
    rows = np.repeat(queries, 16)
    cols = graph.ids[queries].ravel()
    assert np.allclose(graph.sims[queries].ravel(), (half[rows] * half[cols]).sum(axis=1), atol=2e-3)
    assert (np.diff(graph.sims, axis=1) <= 1e-6).all()  # nearest first
    planted = real_like["planted"]
    found = (graph.ids[planted[:, 1]] == planted[:, :1]).any(axis=1)
    assert found.mean() >= 0.98


def test_unit_rows_hold_float16_once_and_outlive_their_holder():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 64)).astype(np.float32)
    store = UnitRows(500, 64)
    for start in range(0, 500, 128):
        store.put(start, x[start:start + 128] * 3.0)
    rows = store.rows
    assert rows.dtype == np.float16 and rows.shape == (500, 64) and store.nbytes == 500 * 64 * 2
    assert np.allclose(rows.astype(np.float32), normalise(x), atol=1e-3)
    sims, ids = store.index.search(normalise(x[:5]), 1)  # faiss reads the very same memory
    assert ids.ravel().tolist() == [0, 1, 2, 3, 4]
    del store
    assert np.allclose(rows.astype(np.float32), normalise(x), atol=1e-3)  # the view keeps the index alive


def test_subset_maps_the_graph_to_the_rows_kept():
    ids = np.array([[1, 2, 3], [0, 3, 2], [3, 0, -1], [2, 1, 0]])
    sims = np.array([[0.9, 0.8, 0.7], [0.9, 0.6, 0.5], [0.8, 0.8, -np.inf], [0.8, 0.6, 0.7]], dtype=np.float32)
    graph = Graph(ids, sims, True, "exact (flat)")
    sub = graph.subset(np.array([0, 2, 3]))  # row 1 left out: 0 -> 0, 2 -> 1, 3 -> 2
    assert sub.ids.tolist() == [[1, 2, -1], [2, 0, -1], [1, 0, -1]]
    assert sub.sims[0, :2].tolist() == pytest.approx([0.8, 0.7]) and np.isneginf(sub.sims[:, 2]).all()
    assert graph.first(1).ids.tolist() == [[1], [0], [3], [2]]


def test_pair_keys_and_graph_width():
    from curator.core.neighbours import pair_keys

    assert pair_keys(np.array([3, 1]), np.array([1, 3]), 10).tolist() == [13, 13]
    assert graph_width(150, 8, 75) == 75
    assert graph_width(1_000_000, 8, 200) == 64 and graph_width(1_000_000, 100, 200) == 100


def test_embeddings_are_read_in_chunks_and_their_size_said_up_front(tmp_path):
    rng = np.random.default_rng(2)
    layout = {"pooled": (0, 24), "stats": (24, 40)}
    cache = EmbeddingCache(tmp_path, "k", 40, layout)
    shas = [f"{i + 1:064x}" for i in range(700)]
    features = rng.normal(size=(700, 40)).astype(np.float32)
    for start in range(0, 700, 64):
        cache.append(shas[start:start + 64], features[start:start + 64])
    wanted = shas[::-1][:650] + shas[:3]  # out of cache order, with repeats
    read = cache.reader(wanted)
    assert np.array_equal(read(0, len(wanted)), cache.vectors()[cache.rows(wanted)].astype(np.float32))
    assert np.array_equal(read(100, 300), cache.get(wanted[100:300]))
    with pytest.raises(KeyError):
        cache.reader(["f" * 64])

    def embed(start: int, stop: int) -> np.ndarray:
        return embedding_matrix(read(start, stop), layout)

    notes: list[str] = []
    small = build(embed, len(wanted), 40, 8, note=notes.append)
    assert notes == ["embeddings for search: 653 x 40 float32 = 0.1 MB"]
    assert small.vectors.dtype == np.float32 and small.graph.exact
    assert np.array_equal(small.dense(), embedding_matrix(cache.get(wanted), layout))
    large = build(embed, len(wanted), 40, 8, exact_limit=100, note=notes.append)
    assert notes[-1] == memory_note(653, 40, np.float16) == "embeddings for search: 653 x 40 float16 = 0.1 MB"
    assert isinstance(large, Neighbourhood) and large.vectors.dtype == np.float16 and not large.graph.exact
    assert large.unit() is large.vectors  # no float32 copy of the rows above the limit
    assert memory_note(1_000_000, 2304, np.float16) == "embeddings for search: 1,000,000 x 2,304 float16 = 4.6 GB"
    part = large.subset(np.arange(0, 653, 2))
    assert len(part) == 327 and np.array_equal(part.take(np.array([1])), large.take(np.array([2])))
