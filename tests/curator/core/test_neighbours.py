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
    refine,
    reverse_neighbours,
    synthetic_embeddings,
)
from curator.core.rowfile import RowFile
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
    assert graph.exact and graph.ids.dtype == np.int32 and graph.sims.dtype == np.float32
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
    _, ids = store.index.search(normalise(x[:5]), 1)  # faiss reads the very same memory
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


def test_subset_of_many_rows_is_the_whole_graph_mapping_with_int32_ids():
    # more rows than one chunk of `Graph.subset`, so the chunked mapping must agree with a mapping done all at once
    from curator.core.neighbours import CHUNK, ID_TYPE

    rng = np.random.default_rng(3)
    n, k = CHUNK * 2 + 500, 6
    graph = knn(rng.standard_normal((n, 8)).astype(np.float32), k)
    assert graph.ids.dtype == ID_TYPE == np.int32
    rows = np.sort(rng.choice(n, size=n * 3 // 4, replace=False))
    sub = graph.subset(rows)
    position = np.full(n, -1)
    position[rows] = np.arange(len(rows))
    for row in rng.choice(len(rows), size=300, replace=False):
        kept = [position[j] for j in graph.ids[rows[row]] if position[j] >= 0]
        assert sub.ids[row].tolist() == kept + [-1] * (k - len(kept))
        assert np.isneginf(sub.sims[row, len(kept):]).all()
        assert np.array_equal(sub.sims[row, :len(kept)], graph.sims[rows[row]][position[graph.ids[rows[row]]] >= 0])
    assert sub.ids.dtype == np.int32 and sub.sims.dtype == np.float32 and sub.ids.shape == (len(rows), k)


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

    def events(kind: str, info: dict) -> None:
        if kind == "stage":
            notes.append(info["name"])

    small = build(embed, len(wanted), 40, 8, events=events)
    assert notes == ["neighbours (embeddings for search: 653 x 40 float32 = 0.1 MB)"]
    assert small.vectors.dtype == np.float32 and small.graph.exact
    assert np.array_equal(small.dense(), embedding_matrix(cache.get(wanted), layout))
    large = build(embed, len(wanted), 40, 8, exact_limit=100, events=events)
    assert notes[-1] == f"neighbours ({memory_note(653, 40, np.float16)})"
    assert memory_note(653, 40, np.float16) == "embeddings for search: 653 x 40 float16 = 0.1 MB"
    assert isinstance(large, Neighbourhood) and large.vectors.dtype == np.float16 and not large.graph.exact
    assert large.unit() is large.vectors  # no float32 copy of the rows above the limit
    assert memory_note(1_000_000, 2304, np.float16) == "embeddings for search: 1,000,000 x 2,304 float16 = 4.6 GB"
    part = large.subset(np.arange(0, 653, 2))
    assert len(part) == 327 and np.array_equal(part.take(np.array([1])), large.take(np.array([2])))


def degraded(x: np.ndarray, k: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact graph with `share` of its entries swapped for random other rows (exact cosines, nearest first), as
    a cheap first search would leave it."""
    rng = np.random.default_rng(seed)
    unit = normalise(x)
    ids, _ = brute_force(x, k)
    n = len(x)
    for row in range(n):
        for col in np.flatnonzero(rng.random(k) < share):
            other = int(rng.integers(0, n))
            if other != row and other not in ids[row]:
                ids[row, col] = other
    sims = np.einsum("nd,nkd->nk", unit, unit[ids])
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1).astype(np.float32)


def test_refinement_only_raises_recall_and_keeps_exact_cosines():
    x = synthetic_embeddings(400, dim=48, seed=5, per_artist=10)["vectors"].astype(np.float16)
    ids, sims = degraded(x.astype(np.float32), 8, 0.2, seed=0)
    exact_ids, exact_sims = brute_force(x.astype(np.float32), 8)
    unit = normalise(x)
    recalls = [pair_recall(Graph(ids, sims, False, ""), exact_ids)]
    for _ in range(3):
        before = ids.copy()
        assert refine(ids, sims, x, fanout=8, entrants=8) >= 0
        recalls.append(pair_recall(Graph(ids, sims, False, ""), exact_ids))
        # a row only ever trades a neighbour for a nearer one: its k-th cosine never falls
        assert (sims[:, -1] >= np.einsum("nd,nd->n", unit, unit[before[:, -1]]) - 1e-3).all()
    assert recalls[0] < 0.85 and recalls[1] >= 0.95 and recalls[-1] >= 0.98
    assert (np.diff(recalls) >= 0).all()
    # the cosines are exact (of the float16 rows), nearest first, with no row twice or itself
    half = normalise(x)
    assert np.allclose(sims, np.einsum("nd,nkd->nk", half, half[ids]), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all() and (ids != np.arange(400)[:, None]).all()
    assert all(len(set(row)) == 8 for row in ids.tolist())
    hit = ids == exact_ids
    assert np.allclose(sims[hit], exact_sims[hit], atol=2e-3)


def test_reverse_neighbours_are_the_rows_that_hold_a_row_nearest_first():
    heads = np.array([[1, 2], [2, 0], [1, -1], [1, 0]])
    assert reverse_neighbours(heads, 2).tolist() == [[1, 3], [0, 2], [1, 0], [-1, -1]]
    assert reverse_neighbours(heads, 1).tolist() == [[1], [0], [1], [-1]]


def test_refinement_leaves_an_exact_graph_as_it_is_and_is_deterministic():
    x = synthetic_embeddings(300, dim=32, seed=6, per_artist=10)["vectors"]
    exact = knn(x, 6)
    ids, sims = exact.ids.copy(), exact.sims.copy()
    assert refine(ids, sims, x, x[:, :8]) == 0
    assert np.array_equal(ids, exact.ids) and np.array_equal(sims, exact.sims)
    first = degraded(x, 6, 0.6, seed=1)
    runs = []
    for chunk, order in ((4096, None), (7, np.random.default_rng(0).permutation(300))):
        ids, sims = first[0].copy(), first[1].copy()
        changed = refine(ids, sims, x, x[:, :8], chunk=chunk, order=order)
        runs.append((changed, ids, sims))
    assert runs[0][0] > 0 and runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1]) and np.array_equal(runs[0][2], runs[1][2])


def test_spilled_rows_leave_memory_and_read_the_same(tmp_path):
    """Above the exact limit, `build(spill_dir=...)` moves the float16 rows to a nameless file (nothing left in the
    folder) that reads them back, with the same graph, and keeps the search's projections for the probe, subsets
    included."""
    from curator.core.neighbours import build, project, synthetic_embeddings

    x = synthetic_embeddings(3000, dim=64, seed=3)["vectors"]
    held = build(lambda a, b: x[a:b], 3000, 64, 16, exact_limit=1000)
    spilled = build(lambda a, b: x[a:b], 3000, 64, 16, exact_limit=1000, spill_dir=tmp_path)
    assert isinstance(spilled.vectors, RowFile) and spilled.store is None
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(np.asarray(spilled.vectors), held.vectors)
    assert np.array_equal(spilled.take(np.array([5, 2999, 5])), held.take(np.array([5, 2999, 5])))
    assert np.array_equal(spilled.subset(np.arange(10, 3000, 7)).dense(), held.subset(np.arange(10, 3000, 7)).dense())
    assert np.array_equal(spilled.graph.ids, held.graph.ids) and spilled.graph.projected is None
    projections = spilled.projections()
    reference = project(held.vectors, held.graph.projection)
    assert projections.dtype == np.float32 and projections.shape == reference.shape
    assert np.abs(projections - reference).max() < 2e-3  # float16 as the search kept them
    some = np.arange(0, 3000, 3)
    assert np.array_equal(spilled.subset(some).projections(), projections[some])
    assert held.projections() is not None and build(lambda a, b: x[a:b], 800, 64, 16).projections() is None
