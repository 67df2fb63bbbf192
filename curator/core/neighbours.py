"""One neighbour graph for a collection's embeddings, shared by the duplicate cascade and the mislabel stage.

`knn(vectors, k)` gives each row's k nearest OTHER rows by cosine, with exact cosines:
- up to `EXACT_LIMIT` rows, exactly (faiss's flat inner-product index: BLAS over blocks of queries and rows, so memory
  stays O(N k) beyond the vectors themselves);
- above it, a compressed index: the rows are projected to `REDUCED_DIM` (256) dimensions by the principal axes of a
  sample (uncentred, so that inner products, not distances from the mean, are what is kept), searched with an IVF
  index of 4-bit product codes (faiss fast-scan; `compressed_settings`), whose candidates are re-ranked first on the
  exact 256-dimensional projections and then re-scored EXACTLY on the full-width float16 unit rows (`UnitRows`: the
  rows live inside the faiss index that re-scores them, with a numpy view for everything else, so they are held
  once). The cosines returned are those of the float16 unit rows.
`EXACT_LIMIT` and the compressed index's settings were measured on synthetic "real-like" embeddings (class centres,
per-artist offsets and noise with a power-law spectrum, 2,304 wide, fitted to the nearest-neighbour cosines of
WikiArt's Lite0 embeddings, with planted near-copies: `synthetic_embeddings`) in bench/neighbours_scale.py.

Memory (N rows, D wide, k neighbours): up to `EXACT_LIMIT` the float32 rows (4 N D bytes) and a float32 copy for the
search; above it the float16 unit rows (2 N D bytes: 4.6 GB at 1,000,000 x 2,304), the 256-dimensional float16
projections (512 N bytes), the product codes (64 N bytes) and the graph (12 N k bytes: ids int64, cosines float32).
No float32 N x D copy is made above `EXACT_LIMIT`. Library code never changes faiss's (process-wide) thread count.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

#: Rows up to which the graph is exact (bench/neighbours_scale.py, one thread): exact search costs N^2 D (5.3 s of CPU
#: at 10k x 2,304 with k = 200, so about 21 s at 20k), the compressed one about 0.5 ms a row plus 5 s to build at
#: that size (about 15 s at 20k; 1.1 ms a row at 200k, where more lists are scanned). They cross near 15k; up to 20k
#: the exact graph costs seconds more and keeps every result exactly as it was.
EXACT_LIMIT = 20_000
#: Width of the projection the compressed index searches.
REDUCED_DIM = 256
#: Rows sampled to fit the projection (the IVF lists train on this many, or 16 rows per list if more).
FIT_SAMPLE = 20_000
#: Graph width used above `EXACT_LIMIT` at most: each row's neighbours cost 12 bytes (12 MB per million rows each).
COMPRESSED_K = 64
#: Rows per chunk when the full-width rows are read, converted or searched.
CHUNK = 8192


@dataclass(frozen=True)
class Graph:
    """Each row's nearest other rows, nearest first: `ids` (N, k) int64 (-1 where a row has fewer), `sims` (N, k)
    float32 exact cosines (-inf at -1), whether the search was `exact`, and how (`method`). `projection` is the
    (D, 256) matrix the compressed index searched with (None when exact), which the mislabel probe reuses."""

    ids: np.ndarray
    sims: np.ndarray
    exact: bool
    method: str
    projection: np.ndarray | None = None

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def first(self, k: int) -> Graph:
        """The same graph cut to each row's `k` nearest."""
        return replace(self, ids=self.ids[:, :k], sims=self.sims[:, :k])

    def subset(self, rows: np.ndarray) -> Graph:
        """The graph among `rows` only (row numbers of this graph), renumbered 0..len(rows)-1: each kept row's
        neighbours that are themselves kept, in order, -1 padded at the end. No search: a row whose neighbours were
        mostly left out keeps fewer."""
        rows = np.asarray(rows, dtype=np.int64)
        position = np.full(len(self.ids), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        ids = self.ids[rows]
        mapped = np.where(ids >= 0, position[np.maximum(ids, 0)], -1)
        order = np.argsort(mapped < 0, axis=1, kind="stable")
        mapped = np.take_along_axis(mapped, order, axis=1)
        sims = np.take_along_axis(self.sims[rows], order, axis=1)
        return replace(self, ids=mapped, sims=np.where(mapped >= 0, sims, -np.inf).astype(np.float32))


class UnitRows:
    """(N, D) unit rows stored once as float16, inside a faiss scalar-quantiser index (its fp16 codes are IEEE
    halves), so that the compressed search re-scores candidates on them in place; `rows` is a numpy view of the same
    memory (it keeps the index alive). Fill it with `put` (rows are L2-normalised on the way in)."""

    def __init__(self, n: int, dim: int):
        import faiss

        self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        size = n * dim * 2
        self.index.codes.resize(size)
        self.index.ntotal = n
        if size:
            buffer_type = type("_Codes", (ctypes.c_char * size,), {})
            buffer = buffer_type.from_address(int(self.index.codes.data()))
            buffer.owner = self.index
            self.rows = np.frombuffer(buffer, dtype=np.float16).reshape(n, dim)
        else:
            self.rows = np.zeros((0, dim), dtype=np.float16)
        self.rows.flags.writeable = True

    def put(self, start: int, block: np.ndarray) -> None:
        """Rows `start`.. from `block` (any float type), normalised."""
        self.rows[start:start + len(block)] = normalise(block)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes


@dataclass(frozen=True)
class Neighbourhood:
    """A collection's embeddings and their shared neighbour graph: what the duplicate cascade and the mislabel stage
    both read, built once (`curator clean`: `build`).

    `vectors` holds the gathered rows: up to `EXACT_LIMIT` the float32 embedding as given, above it a `UnitRows`'
    float16 unit rows. `rows` says which of them this neighbourhood covers, in order (None: all), so that the
    mislabel stage's subset (the kept rows) reads the same memory instead of a copy; `graph` is over those rows."""

    vectors: np.ndarray
    graph: Graph
    rows: np.ndarray | None = None
    store: UnitRows | None = None

    def __len__(self) -> int:
        return len(self.graph.ids)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def take(self, index: np.ndarray | slice) -> np.ndarray:
        """Rows of this neighbourhood (positions in it) as float32, as gathered (not re-normalised)."""
        source = index if self.rows is None else self.rows[index]
        return np.asarray(self.vectors[source], dtype=np.float32)

    def chunks(self, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 rows) over this neighbourhood, a chunk at a time."""
        for start in range(0, len(self), chunk):
            yield start, self.take(slice(start, min(len(self), start + chunk)))

    def dense(self) -> np.ndarray:
        """All rows as one float32 matrix, as gathered (meant for up to `EXACT_LIMIT` rows)."""
        return self.vectors.astype(np.float32, copy=False) if self.rows is None else self.take(slice(None))

    def unit(self) -> np.ndarray:
        """The unit rows the graph was searched on: float32 (normalised again) up to `EXACT_LIMIT`, the float16 rows
        themselves (no copy) above it when this is the whole collection."""
        if self.vectors.dtype == np.float16 and self.rows is None:
            return self.vectors
        return normalise(self.dense())

    def subset(self, index: np.ndarray) -> Neighbourhood:
        """The neighbourhood of some of its rows (positions, increasing), its graph mapped to them (no search)."""
        index = np.asarray(index, dtype=np.int64)
        rows = index if self.rows is None else self.rows[index]
        return replace(self, graph=self.graph.subset(index), rows=rows)


def build(read: Callable[[int, int], np.ndarray], n: int, dim: int, k: int, *, exact_limit: int = EXACT_LIMIT,
          seed: int = 0, note: Callable[[str], None] | None = None,
          progress: Callable[[int], None] | None = None) -> Neighbourhood:
    """Gather N rows (`read(start, stop)` gives float rows, e.g. the embedding of the cached features) chunk by
    chunk (`gather`), saying their size through `note` first, and search each row's k nearest other rows once."""
    dtype = np.float32 if n <= exact_limit else np.float16
    if note:
        note(memory_note(n, dim, dtype))
    held = gather(read, n, dim, exact_limit)
    graph = knn(held, k, exact_limit=exact_limit, seed=seed, progress=progress)
    if isinstance(held, UnitRows):
        return Neighbourhood(held.rows, graph, None, held)
    return Neighbourhood(held, graph)


def pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """One int64 per unordered row pair (min * n + max), to compare sets of pairs with numpy (`np.isin`)."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    return np.minimum(i, j) * n + np.maximum(i, j)


def normalise(block: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    x = np.asarray(block, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def graph_width(n: int, nearest: int, vote: int, exact_limit: int = EXACT_LIMIT) -> int:
    """How many neighbours per row the shared graph keeps for n rows: enough for the duplicate cascade (`nearest`)
    and the mislabel vote's candidates (`vote`); above `exact_limit` the vote's share is capped at `COMPRESSED_K`
    (memory and search time grow with it), so a row there votes with the valid voters among those."""
    return max(nearest, vote if n <= exact_limit else min(vote, COMPRESSED_K))


def memory_note(n: int, dim: int, dtype) -> str:
    """The line that says what the embeddings held for search cost, e.g. "embeddings for search: 1,000,000 x 2,304
    float16 = 4.6 GB"."""
    size = n * dim * np.dtype(dtype).itemsize
    amount = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    return f"embeddings for search: {n:,} x {dim:,} {np.dtype(dtype).name} = {amount}"


def gather(read: Callable[[int, int], np.ndarray], n: int, dim: int, exact_limit: int = EXACT_LIMIT,
           chunk: int = CHUNK) -> np.ndarray | UnitRows:
    """The rows `read(start, stop)` gives, built chunk by chunk: up to `exact_limit` rows a float32 matrix (as
    given), above it float16 unit rows in a `UnitRows` (never a float32 N x D copy)."""
    if n <= exact_limit:
        out = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, chunk):
            out[start:start + chunk] = read(start, min(n, start + chunk))
        return out
    store = UnitRows(n, dim)
    for start in range(0, n, chunk):
        store.put(start, read(start, min(n, start + chunk)))
    return store


def without_self(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search results for `rows` without each row itself (wherever it came), cut to k, -1 padded (-inf cosines)."""
    own = (ids == np.asarray(rows)[:, None]) | (ids < 0)
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    ids, sims = np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)
    bad = np.take_along_axis(own, order, axis=1)
    if ids.shape[1] < k:
        pad = ((0, 0), (0, k - ids.shape[1]))
        ids, sims, bad = np.pad(ids, pad), np.pad(sims, pad), np.pad(bad, pad, constant_values=True)
    return np.where(bad, -1, ids).astype(np.int64), np.where(bad, -np.inf, sims).astype(np.float32)


def knn(vectors: np.ndarray | UnitRows, k: int, *, exact_limit: int = EXACT_LIMIT, seed: int = 0,
        chunk: int = CHUNK, progress: Callable[[int], None] | None = None, **compressed) -> Graph:
    """Each row's k nearest other rows by cosine (see the module docstring): exact up to `exact_limit` rows,
    compressed above it (`compressed` passes settings to `compressed_knn`). `vectors`: any (N, D) float rows, or a
    `UnitRows` (which the compressed search re-scores on in place; a plain array above the limit is first copied
    into one, as float16). `progress` is called with the number of rows searched after each chunk."""
    rows = vectors.rows if isinstance(vectors, UnitRows) else vectors
    n = len(rows)
    k = max(0, min(k, n - 1))
    if n <= exact_limit or k == 0:
        return exact_knn(rows, k, chunk=chunk, progress=progress)
    if not isinstance(vectors, UnitRows):
        store = UnitRows(n, rows.shape[1])
        for start in range(0, n, chunk):
            store.put(start, rows[start:start + chunk])
        vectors = store
    return compressed_knn(vectors, k, seed=seed, chunk=chunk, progress=progress, **compressed)


def exact_knn(vectors: np.ndarray, k: int, chunk: int = CHUNK,
              progress: Callable[[int], None] | None = None) -> Graph:
    """Exact k nearest other rows (faiss flat inner product on the L2-normalised rows, queried in chunks)."""
    import faiss

    unit = normalise(vectors)
    n = len(unit)
    if k == 0 or n < 2:
        return Graph(np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32), True, "exact (flat)")
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    ids = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s, i = index.search(unit[start:stop], min(k + 1, n))
        ids[start:stop], sims[start:stop] = without_self(i, s, np.arange(start, stop), k)
        if progress:
            progress(stop - start)
    return Graph(ids, sims, True, "exact (flat)")


def fit_projection(rows: np.ndarray, dims: int = REDUCED_DIM, sample: int = FIT_SAMPLE, seed: int = 0,
                   chunk: int = CHUNK) -> np.ndarray:
    """(D, dims) float32: the leading eigenvectors of the uncentred second moment of a random sample of rows (the
    subspace that keeps inner products best), read in chunks."""
    n, dim = rows.shape
    dims = min(dims, dim)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False))
    moment = np.zeros((dim, dim), dtype=np.float64)
    for start in range(0, len(pick), chunk):
        block = normalise(rows[pick[start:start + chunk]])
        moment += block.T @ block
    _, vectors = np.linalg.eigh(moment)
    return np.ascontiguousarray(vectors[:, ::-1][:, :dims], dtype=np.float32)


def project(rows: np.ndarray, projection: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """(N, dims) float32 projections of the unit rows, read in chunks."""
    out = np.empty((len(rows), projection.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        out[start:start + chunk] = normalise(rows[start:start + chunk]) @ projection
    return out


def compressed_settings(n: int) -> dict:
    """The compressed index's settings for N rows, measured on real-like rows (bench/neighbours_scale.py): lists of
    about 256 rows (a power of two); an eighth of them probed per row, but no more than about 32k rows scanned (the
    scan is what grows with N); product codes of 128 4-bit subspaces; candidates re-ranked on 12 x k reduced, then
    3 x k full-width rows. Measured: at 100k, recall@8 0.991 with 8 x k and 2 x k (0.996 with 12 x k and 3 x k),
    0.967 with 64 subspaces; at 200k, 0.968 probing a sixteenth of the lists, 0.976 an eighth (8 x k, 2 x k), 0.990
    with these settings (1.1 ms of CPU a row, build included)."""
    lists = 2 ** max(4, round(math.log2(max(n, 1) / 256)))
    probe = max(min(lists // 8, 32768 * lists // max(n, 1)), min(lists, 8))
    return {"lists": lists, "probe": probe, "reduced_factor": 12, "full_factor": 3, "subspaces": 128}


def compressed_knn(store: UnitRows, k: int, *, seed: int = 0, chunk: int = CHUNK,
                   progress: Callable[[int], None] | None = None, lists: int | None = None,
                   probe: int | None = None, reduced_factor: float | None = None,
                   full_factor: float | None = None, subspaces: int | None = None, dims: int = REDUCED_DIM) -> Graph:
    """k nearest other rows through the compressed index (module docstring), re-scored exactly on `store`."""
    import faiss

    rows = store.rows
    n, dim = rows.shape
    chosen = compressed_settings(n)
    lists = lists or chosen["lists"]
    probe = min(lists, probe or chosen["probe"])
    projection = fit_projection(rows, dims, seed=seed, chunk=chunk)
    dims = projection.shape[1]
    transform = faiss.LinearTransform(dim, dims, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(projection.T).ravel(), transform.A)
    transform.is_trained = True

    quantiser = faiss.IndexFlatIP(dims)
    subspaces = max(1, min(subspaces or chosen["subspaces"], dims // 2))
    while dims % subspaces:
        subspaces -= 1
    ivf = faiss.IndexIVFPQFastScan(quantiser, dims, lists, subspaces, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 5  # fewer training points than faiss's default asks for are fine here
    ivf.cp.niter = 10
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    reduced = faiss.IndexRefine(ivf, faiss.IndexScalarQuantizer(dims, faiss.ScalarQuantizer.QT_fp16,
                                                                 faiss.METRIC_INNER_PRODUCT))
    pick = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(n, max(FIT_SAMPLE, 16 * lists)),
                                                            replace=False))
    reduced.train(project(rows[pick], projection, chunk))
    for start in range(0, n, chunk):
        reduced.add(project(rows[start:start + chunk], projection, chunk))
    base = faiss.IndexPreTransform(transform, reduced)
    full = faiss.IndexRefine(base, store.index)
    ivf.nprobe = probe
    reduced.k_factor = float(reduced_factor or chosen["reduced_factor"])
    full.k_factor = float(full_factor or chosen["full_factor"])

    ids = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s, i = full.search(normalise(rows[start:stop]), k + 1)
        ids[start:stop], sims[start:stop] = without_self(i, s, np.arange(start, stop), k)
        if progress:
            progress(stop - start)
    method = (f"compressed (PCA {dims} + IVF{lists} fast-scan PQ{subspaces}x4, nprobe {probe}, re-scored on "
              f"{int(reduced.k_factor * full.k_factor)}k then {int(full.k_factor)}k candidates)")
    return Graph(ids, sims, False, method, projection)


def pair_recall(found: Graph, reference_ids: np.ndarray, rows: np.ndarray | None = None, k: int | None = None) -> float:
    """Share of the reference's (row, neighbour) pairs among each row's first k that `found` has among its first k
    (`rows`: the graph rows the reference rows are, when the reference covers a sample)."""
    k = k or reference_ids.shape[1]
    ids = found.ids if rows is None else found.ids[rows]
    ref = reference_ids[:, :k]
    hits = (ids[:, :k, None] == ref[:, None, :]) & (ref[:, None, :] >= 0)
    return float(hits.any(axis=1).sum() / max((ref >= 0).sum(), 1))


def exact_reference(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = CHUNK) -> np.ndarray:
    """Exact k nearest other rows of the rows `queries` against all N (flat, base read in chunks): (len(queries), k)
    ids, for measuring recall at sizes where the exact graph would be too slow."""
    n = len(vectors)
    q = normalise(vectors[queries])
    best_s = np.full((len(queries), k + 1), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k + 1), -1, dtype=np.int64)
    for start in range(0, n, chunk):
        block = normalise(vectors[start:start + chunk])
        s = q @ block.T
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(block)), s.shape)], axis=1)
        top = np.argpartition(-s_all, k, axis=1)[:, :k + 1]
        best_s = np.take_along_axis(s_all, top, axis=1)
        best_i = np.take_along_axis(i_all, top, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_i = np.take_along_axis(best_i, order, axis=1)
    best_s = np.take_along_axis(best_s, order, axis=1)
    own = best_i == queries[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(best_i, order, axis=1)


def synthetic_embeddings(n: int, dim: int = 2304, seed: int = 0, classes: int = 11, per_artist: int = 40,
                         duplicate_share: float = 0.01, chunk: int = CHUNK,
                         out: UnitRows | np.ndarray | None = None) -> dict:
    """"Real-like" unit embeddings for tests and benchmarks, written chunk by chunk into `out` (a `UnitRows`, a
    float array, or a new float32 array): a shared mean direction, class centres, per-artist offsets and per-image
    noise, all with a power-law spectrum (variance of axis i ~ i^-0.9), scaled so that the cosines to the 1st, 8th
    and 40th nearest neighbour and between random pairs come out near those of Lite0 embeddings of WikiArt (0.79,
    0.75, 0.72 and 0.57 on wikiart-dev); and planted near-copies (another row plus 4-30% noise), `duplicate_share`
    of the rows. Returns {"vectors", "labels", "groups", "planted": (copies, 2) array of (original, copy) rows}."""
    rng = np.random.default_rng(seed)
    std = np.arange(1, dim + 1, dtype=np.float64) ** -0.45
    std = (std / np.sqrt((std ** 2).sum())).astype(np.float32)
    mean = rng.normal(size=dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    artists = max(classes, n // per_artist)
    class_of_artist = rng.integers(0, classes, artists)
    centres = rng.normal(size=(classes, dim)).astype(np.float32) * std * 0.4
    offsets = rng.normal(size=(artists, dim)).astype(np.float32) * std * 0.5
    groups = rng.integers(0, artists, n)
    copies = int(n * duplicate_share)
    chosen = rng.permutation(n)[:2 * copies]
    planted = np.stack([chosen[:copies], chosen[copies:]], axis=1)
    groups[planted[:, 1]] = groups[planted[:, 0]]
    labels = class_of_artist[groups]
    if out is None:
        out = np.empty((n, dim), dtype=np.float32)
    rows = out.rows if isinstance(out, UnitRows) else out
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        noise = np.random.default_rng([seed, start]).standard_normal((stop - start, dim), dtype=np.float32)
        rows[start:stop] = normalise(mean + centres[labels[start:stop]] + offsets[groups[start:stop]]
                                     + noise * std * 0.7)
    for start in range(0, copies, chunk):
        pairs = planted[start:start + chunk]
        scale = rng.uniform(0.04, 0.3, (len(pairs), 1)).astype(np.float32)
        noise = rng.standard_normal((len(pairs), dim), dtype=np.float32)
        rows[pairs[:, 1]] = normalise(rows[pairs[:, 0]].astype(np.float32) + noise * std * scale)
    return {"vectors": out, "labels": labels, "groups": groups, "planted": planted}
