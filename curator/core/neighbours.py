"""One neighbour graph for a collection's embeddings, shared by the duplicate cascade and the mislabel stage.

`knn(vectors, k)` gives each row's k nearest OTHER rows by cosine, with exact cosines:
- up to `EXACT_LIMIT` rows, exactly (faiss's flat inner-product index: BLAS over blocks of queries and rows, so memory
  stays O(N k) beyond the vectors themselves);
- above it, a compressed index: the rows are projected to `REDUCED_DIM` (256) dimensions by the principal axes of a
  sample (uncentred, so that inner products, not distances from the mean, are what is kept), searched with an IVF
  index of 4-bit product codes (faiss fast-scan; `compressed_settings`), whose candidates are re-ranked first on the
  256-dimensional projections (float16) and then re-scored EXACTLY on the full-width float16 unit rows (`UnitRows`:
  the rows live inside the faiss index that re-scores them, with a numpy view for everything else, so they are
  held once); rows are searched in the order of their IVF list, so that rows searched together share candidates.
  A cheap first pass (few candidates re-scored) is then refined (`refine`, NN-descent style): each row looks at its
  neighbours' neighbours and its reverse neighbours, ranks them on the projections and re-scores the best few
  exactly, keeping what is nearer. Re-scoring full-width rows is what the search costs on a CPU (memory reads of
  4.6 KB a candidate); a first pass that re-scores few candidates plus one round of refinement costs less than
  re-scoring many (`compressed_settings` has the measurements). The cosines returned are those of the float16 unit
  rows.
`EXACT_LIMIT` and the compressed index's settings were measured on synthetic "real-like" embeddings (class centres,
per-artist offsets and noise with a power-law spectrum, 2,304 wide, fitted to the nearest-neighbour cosines of
WikiArt's Lite0 embeddings, with planted near-copies: `synthetic_embeddings`) in bench/neighbours_scale.py.

Memory (N rows, D wide, k neighbours): up to `EXACT_LIMIT` the float32 rows (4 N D bytes) and a float32 copy for the
search; above it the float16 unit rows (2 N D bytes: 4.6 GB at 1,000,000 x 2,304), the 256-dimensional float16
projections (512 N bytes), the product codes (64 N bytes), the graph (8 N k bytes: ids int32, cosines float32) and,
while refining, each row's first and reverse neighbours (64 N bytes). No float32 N x D copy is made above
`EXACT_LIMIT`. Library code never changes faiss's (process-wide) thread count.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from curator.core.progress import Event, advance, stage
from curator.core.rowfile import RowFile

#: Rows up to which the graph is exact (bench/neighbours_scale.py, one thread): exact search costs N^2 D (5.3 s of CPU
#: at 10k x 2,304 with k = 200, so about 21 s at 20k), the compressed one about 0.5 ms a row plus 5 s to build at
#: that size (about 15 s at 20k; 1.1 ms a row at 200k, where more lists are scanned). They cross near 15k; up to 20k
#: the exact graph costs seconds more and keeps every result exactly as it was.
EXACT_LIMIT = 20_000
#: Width of the projection the compressed index searches.
REDUCED_DIM = 256
#: Rows sampled to fit the projection (the IVF lists train on this many, or 16 rows per list if more).
FIT_SAMPLE = 20_000
#: Graph width used above `EXACT_LIMIT` at most: each row's neighbours cost 8 bytes (8 MB per million rows each).
COMPRESSED_K = 64
#: Rows per chunk when the full-width rows are read, converted or searched.
CHUNK = 8192
#: Rounds of neighbour-of-neighbour refinement after the compressed search (`refine`).
REFINE_ROUNDS = 1
#: Neighbours whose own neighbours a row considers in a refinement round (fanout^2 candidates a row).
REFINE_FANOUT = 8
#: Candidates a row re-scores exactly (on the full-width rows) in a refinement round, the nearest on the projection.
REFINE_ENTRANTS = 8
#: Rows per chunk in a refinement round (each reads fanout^2 projected and `entrants` full-width rows a row).
REFINE_CHUNK = 1024
#: The graph's row ids: int32 (row numbers up to 2^31 - 1), half the memory of int64 (256 MB saved at 1M x 64).
ID_TYPE = np.int32


@dataclass(frozen=True)
class Graph:
    """Each row's nearest other rows, nearest first: `ids` (N, k) int32 (`ID_TYPE`; -1 where a row has fewer),
    `sims` (N, k) float32 exact cosines (-inf at -1), whether the search was `exact`, and how (`method`).
    `projection` is the (D, 256) matrix the compressed index searched with (None when exact), which the mislabel
    probe reuses; `projected` the searched rows' (N, 256) float16 projections through it, row for row with the rows
    given to the search (`build` moves them to the `Neighbourhood`, which indexes them like its rows)."""

    ids: np.ndarray
    sims: np.ndarray
    exact: bool
    method: str
    projection: np.ndarray | None = None
    projected: np.ndarray | None = None

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def first(self, k: int) -> Graph:
        """The same graph cut to each row's `k` nearest."""
        return replace(self, ids=self.ids[:, :k], sims=self.sims[:, :k])

    def subset(self, rows: np.ndarray) -> Graph:
        """The graph among `rows` only (row numbers of this graph), renumbered 0..len(rows)-1: each kept row's
        neighbours that are themselves kept, in order, -1 padded at the end. No search: a row whose neighbours were
        mostly left out keeps fewer. Built a chunk of rows at a time, so that it holds no more than the new graph
        beside this one (at 1M rows the temporaries of a whole-graph mapping were about 2 GB)."""
        rows = np.asarray(rows, dtype=np.int64)
        position = np.full(len(self.ids), -1, dtype=ID_TYPE)
        position[rows] = np.arange(len(rows))
        out_ids = np.empty((len(rows), self.k), dtype=ID_TYPE)
        out_sims = np.empty((len(rows), self.k), dtype=np.float32)
        for start in range(0, len(rows), CHUNK):
            part = rows[start:start + CHUNK]
            ids = self.ids[part]
            mapped = np.where(ids >= 0, position[np.maximum(ids, 0)], -1)
            order = np.argsort(mapped < 0, axis=1, kind="stable")
            mapped = np.take_along_axis(mapped, order, axis=1)
            sims = np.take_along_axis(self.sims[part], order, axis=1)
            out_ids[start:start + len(part)] = mapped
            out_sims[start:start + len(part)] = np.where(mapped >= 0, sims, -np.inf)
        return replace(self, ids=out_ids, sims=out_sims, projected=None)


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
    float16 unit rows (or, built with a `spill_dir`, the same rows in a file, read a few at a time: a
    `curator.core.rowfile.RowFile`).
    `rows` says which of them this neighbourhood covers, in order (None: all), so that the mislabel stage's subset
    (the kept rows) reads the same memory instead of a copy; `graph` is over those rows. `projected`: the compressed
    search's float16 projections of all the gathered rows (None when exact), indexed like `vectors`."""

    vectors: np.ndarray | RowFile
    graph: Graph
    rows: np.ndarray | None = None
    store: UnitRows | None = None
    projected: np.ndarray | None = None

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

    def projections(self, chunk: int = CHUNK) -> np.ndarray | None:
        """This neighbourhood's rows through the compressed search's projection, float32 (N, 256), read from the
        projections the search kept (None when it kept none), so that no full-width row is read again."""
        if self.projected is None:
            return None
        out = np.empty((len(self), self.projected.shape[1]), dtype=np.float32)
        for start in range(0, len(self), chunk):
            index = slice(start, min(len(self), start + chunk))
            out[index] = self.projected[index if self.rows is None else self.rows[index]]
        return out

    def dense(self) -> np.ndarray:
        """All rows as one float32 matrix, as gathered (meant for up to `EXACT_LIMIT` rows)."""
        return np.asarray(self.vectors, dtype=np.float32) if self.rows is None else self.take(slice(None))

    def unit(self) -> np.ndarray | RowFile:
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
          seed: int = 0, events: Event | None = None, spill_dir: Path | None = None) -> Neighbourhood:
    """Gather N rows (`read(start, stop)` gives float rows, e.g. the embedding of the cached features) chunk by
    chunk (`gather`), and search each row's k nearest other rows once. Through `events` (`curator.core.progress`):
    a `"stage"` named for what the rows held for the search take (`memory_note`), up front, then the rows searched.

    Above `exact_limit`, with `spill_dir`, the float16 rows leave memory once the graph is built, for a nameless
    file there (`curator.core.rowfile.RowFile`): the stages after the search read few of them (the mislabel probe
    reads the search's kept projections instead), so at a million rows the 4.6 GB they held is not carried through
    the duplicate and mislabel stages."""
    dtype = np.float32 if n <= exact_limit else np.float16
    stage(events, f"neighbours ({memory_note(n, dim, dtype)})", n)
    held = gather(read, n, dim, exact_limit)
    graph = knn(held, k, exact_limit=exact_limit, seed=seed, events=events)
    projected, graph = graph.projected, replace(graph, projected=None)
    if not isinstance(held, UnitRows):
        return Neighbourhood(held, graph)
    if spill_dir is None:
        return Neighbourhood(held.rows, graph, None, held, projected)
    return Neighbourhood(RowFile.write(held.rows, spill_dir), graph, None, None, projected)


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
    return np.where(bad, -1, ids).astype(ID_TYPE), np.where(bad, -np.inf, sims).astype(np.float32)


def knn(vectors: np.ndarray | UnitRows, k: int, *, exact_limit: int = EXACT_LIMIT, seed: int = 0,
        chunk: int = CHUNK, events: Event | None = None, **compressed) -> Graph:
    """Each row's k nearest other rows by cosine (see the module docstring): exact up to `exact_limit` rows,
    compressed above it (`compressed` passes settings to `compressed_knn`). `vectors`: any (N, D) float rows, or a
    `UnitRows` (which the compressed search re-scores on in place; a plain array above the limit is first copied
    into one, as float16). Each chunk searched sends an `"advance"` of its rows through `events`."""
    rows = vectors.rows if isinstance(vectors, UnitRows) else vectors
    n = len(rows)
    k = max(0, min(k, n - 1))
    if n <= exact_limit or k == 0:
        return exact_knn(rows, k, chunk=chunk, events=events)
    if not isinstance(vectors, UnitRows):
        store = UnitRows(n, rows.shape[1])
        for start in range(0, n, chunk):
            store.put(start, rows[start:start + chunk])
        vectors = store
    return compressed_knn(vectors, k, seed=seed, chunk=chunk, events=events, **compressed)


def exact_knn(vectors: np.ndarray, k: int, chunk: int = CHUNK,
              events: Event | None = None) -> Graph:
    """Exact k nearest other rows (faiss flat inner product on the L2-normalised rows, queried in chunks)."""
    import faiss

    unit = normalise(vectors)
    n = len(unit)
    if k == 0 or n < 2:
        return Graph(np.full((n, k), -1, ID_TYPE), np.full((n, k), -np.inf, np.float32), True, "exact (flat)")
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    ids = np.empty((n, k), dtype=ID_TYPE)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s, i = index.search(unit[start:stop], min(k + 1, n))
        ids[start:stop], sims[start:stop] = without_self(i, s, np.arange(start, stop), k)
        advance(events, stop - start)
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
    scan is what grows with N); product codes of 128 4-bit subspaces; candidates re-ranked on 4 x k projections,
    then k full-width rows re-scored, then `rounds` of refinement (`refine`). Measured at 100k with k = 64
    (recall@8 against exact, CPU seconds with the build): 0.9485 after the first pass (77 s), 0.9926 after one
    round (+37 s), 0.9971 after two; with 2 x k projections and half the probes 0.894, 0.985 after one round. At
    200k: 0.982 in 214 s; at 1M: 609 s for the first pass (build included) and 282 s for the round. The earlier
    settings (12 x k then 3 x k re-scored, no refinement) gave 0.996 at 100k in 90 s and 0.990 at 200k in 225 s,
    but 0.891 at 1M in 1,359 s: re-scoring 36 x k and 3 x k candidates a row was what cost."""
    lists = 2 ** max(4, round(math.log2(max(n, 1) / 256)))
    probe = max(min(lists // 8, 32768 * lists // max(n, 1)), min(lists, 8))
    return {"lists": lists, "probe": probe, "reduced_factor": 4, "full_factor": 1, "subspaces": 128,
            "rounds": REFINE_ROUNDS}


def compressed_knn(store: UnitRows, k: int, *, seed: int = 0, chunk: int = CHUNK,
                   events: Event | None = None, lists: int | None = None,
                   probe: int | None = None, reduced_factor: float | None = None,
                   full_factor: float | None = None, subspaces: int | None = None, dims: int = REDUCED_DIM,
                   rounds: int | None = None) -> Graph:
    """k nearest other rows through the compressed index (module docstring), re-scored exactly on `store`, then
    refined (`refine`, `rounds` times). Rows are searched in the order of their IVF list, so that rows searched
    together share candidates (memory reads are what the re-scoring costs)."""
    import faiss

    rows = store.rows
    n, dim = rows.shape
    chosen = compressed_settings(n)
    lists = lists or chosen["lists"]
    probe = min(lists, probe or chosen["probe"])
    rounds = chosen["rounds"] if rounds is None else rounds
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
    pick = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(n, max(FIT_SAMPLE, 16 * lists)),
                                                            replace=False))
    ivf.train(project(rows[pick], projection, chunk))
    # the 256-dimensional projections, held once as float16 (the refinement reads them through `projected.rows`)
    projected = UnitRows(n, dims)
    for start in range(0, n, chunk):
        block = project(rows[start:start + chunk], projection, chunk)
        ivf.add(block)
        projected.rows[start:start + len(block)] = block
    reduced = faiss.IndexRefine(ivf, projected.index)
    base = faiss.IndexPreTransform(transform, reduced)
    full = faiss.IndexRefine(base, store.index)
    ivf.nprobe = probe
    reduced.k_factor = float(reduced_factor or chosen["reduced_factor"])
    full.k_factor = float(full_factor or chosen["full_factor"])

    ids = np.empty((n, k), dtype=ID_TYPE)
    sims = np.empty((n, k), dtype=np.float32)
    order = list_order(ivf, n)
    for start in range(0, n, chunk):
        batch = order[start:start + chunk]
        s, i = full.search(normalise(rows[batch]), k + 1)
        ids[batch], sims[batch] = without_self(i, s, batch, k)
        advance(events, len(batch))
    for _ in range(rounds):
        refine(ids, sims, rows, projected.rows, order=order)
    method = (f"compressed (PCA {dims} + IVF{lists} fast-scan PQ{subspaces}x4, nprobe {probe}, re-scored on "
              f"{int(reduced.k_factor * full.k_factor)}k then {int(full.k_factor)}k candidates, "
              f"{rounds} refinement round{'s' if rounds != 1 else ''})")
    return Graph(ids, sims, False, method, projection, projected.rows)


def list_order(ivf, n: int) -> np.ndarray:
    """All row numbers, grouped by the IVF list they were added to (rows near each other in embedding space come
    together)."""
    import faiss

    invlists = ivf.invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
             for lst in range(ivf.nlist) if invlists.list_size(lst)]
    order = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    if len(order) != n or not np.array_equal(np.sort(order), np.arange(n)):
        return np.arange(n, dtype=np.int64)
    return order


def refine(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray, reduced: np.ndarray | None = None, *,
           fanout: int = REFINE_FANOUT, entrants: int = REFINE_ENTRANTS, order: np.ndarray | None = None,
           chunk: int = REFINE_CHUNK) -> int:
    """One round of neighbour-of-neighbour refinement (NN-descent), in place. A row's candidates are the rows that
    hold it among their first `fanout` neighbours (reverse neighbours, up to `fanout`, nearest first) and the first
    `fanout` neighbours of its first `fanout` neighbours and of those reverse neighbours, less what it holds
    already; the `entrants` of them nearest on `reduced` (e.g. the 256-dimensional projections; `rows` themselves
    when None) are scored exactly on the unit `rows`, and the row keeps its k nearest of old and new by exact
    cosine. It only ever raises recall: a row loses a neighbour only to a nearer one. Rows go in `order` (default:
    by number) a chunk at a time, every chunk reading the neighbour lists as they were before the round, so the
    result depends neither on the chunk size nor on the order. Returns how many neighbours were replaced."""
    n, k = ids.shape
    if n < 2 or k == 0:
        return 0
    fanout = min(fanout, k)
    heads = ids[:, :fanout].copy()
    linked = np.concatenate([heads, reverse_neighbours(heads, fanout)], axis=1)
    reduced = rows if reduced is None else reduced
    order = np.arange(n, dtype=np.int64) if order is None else order
    batches = [order[start:start + chunk] for start in range(0, n, chunk)]

    def one(batch: np.ndarray) -> int:
        return _refine_rows(ids, sims, rows, reduced, heads, linked, batch, entrants)

    # chunks touch only their own rows and read the lists as they were, so threads (numpy lets go of the GIL for
    # the gathers and products that cost) give the same result as one after another
    with ThreadPoolExecutor(max_workers=max(1, min(len(batches), _threads()))) as pool:
        return sum(pool.map(one, batches))


def _threads() -> int:
    """How many threads faiss uses in this process (read, never set)."""
    import faiss

    return max(1, faiss.omp_get_max_threads())


def reverse_neighbours(heads: np.ndarray, width: int) -> np.ndarray:
    """(N, width): for each row, the rows that hold it in `heads` (their first neighbours), those that hold it
    nearest first (then by row number), -1 padded."""
    n, fanout = heads.shape
    src = np.repeat(np.arange(n, dtype=ID_TYPE), fanout)
    rank = np.tile(np.arange(fanout), n)
    dst = heads.ravel()
    valid = dst >= 0
    src, rank, dst = src[valid], rank[valid], dst[valid]
    order = np.lexsort((src, rank, dst))
    src, dst = src[order], dst[order]
    first = np.searchsorted(dst, dst, side="left")
    position = np.arange(len(dst)) - first
    keep = position < width
    out = np.full((n, width), -1, dtype=heads.dtype)
    out[dst[keep], position[keep]] = src[keep]
    return out


def _refine_rows(ids: np.ndarray, sims: np.ndarray, rows: np.ndarray, reduced: np.ndarray, heads: np.ndarray,
                 linked: np.ndarray, batch: np.ndarray, entrants: int) -> int:
    """`refine` for the rows `batch`; how many neighbours changed."""
    near = linked[batch]
    fanout = heads.shape[1]
    cand = np.where(near[:, :, None] >= 0, heads[np.maximum(near, 0)], -1).reshape(len(batch), -1)
    cand = np.sort(np.concatenate([cand, near[:, fanout:]], axis=1), axis=1)
    held = ids[batch]
    fresh = (cand >= 0) & (cand != batch[:, None]) & ~(cand[:, :, None] == held[:, None, :]).any(axis=2)
    fresh[:, 1:] &= cand[:, 1:] != cand[:, :-1]
    if not fresh.any():
        return 0
    # only the fresh candidates are read and scored on `reduced` (most of a row's neighbours' neighbours are held
    # already, and reading and converting float16 rows is what this costs)
    query = np.asarray(reduced[batch], dtype=np.float32)
    at_row, at_col = np.nonzero(fresh)
    picked = np.asarray(reduced[cand[at_row, at_col]], dtype=np.float32)
    score = np.full(cand.shape, -np.inf, dtype=np.float32)
    score[at_row, at_col] = np.einsum("ij,ij->i", picked, query[at_row])
    take = min(entrants, score.shape[1])
    best = np.argpartition(-score, take - 1, axis=1)[:, :take] if take < score.shape[1] else \
        np.broadcast_to(np.arange(score.shape[1]), score.shape)
    new = np.take_along_axis(cand, best, axis=1)
    valid = np.take_along_axis(fresh, best, axis=1)
    # cosines of the unit query with the candidates, each divided by its own norm (no normalised copy is made)
    unit_query = normalise(rows[batch])
    full = np.asarray(rows[np.maximum(new, 0)], dtype=np.float32)
    dots = np.matmul(full, unit_query[:, :, None])[:, :, 0]
    cosines = dots / np.maximum(np.sqrt(np.einsum("btd,btd->bt", full, full)), 1e-12)
    all_ids = np.concatenate([held, np.where(valid, new, -1)], axis=1)
    all_sims = np.concatenate([sims[batch], np.where(valid, cosines, -np.inf).astype(np.float32)], axis=1)
    keep = np.argsort(-all_sims, axis=1, kind="stable")[:, :ids.shape[1]]
    out_ids = np.take_along_axis(all_ids, keep, axis=1)
    out_sims = np.take_along_axis(all_sims, keep, axis=1)
    out_ids[np.isneginf(out_sims)] = -1
    changed = int((keep >= held.shape[1]).sum())
    ids[batch], sims[batch] = out_ids, out_sims
    return changed


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
