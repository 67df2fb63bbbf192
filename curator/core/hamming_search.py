"""Exact Hamming range search over 64-bit hashes, sub-quadratic: multi-index hashing (MIH) with a flat fallback.

`radius_search(queries, base, radius)` returns every (query, base) pair whose hashes differ in at most `radius` bits,
with the distance: the same arrays as faiss's brute-force flat index (every pair compared), order included.

Why it is exact (pigeonhole): the bits are cut into `m` disjoint substrings, and substring `i` is searched within
`r_i` bits, with sum(r_i + 1) > radius. If two hashes are within `radius` bits, their per-substring distances add up
to at most `radius`, so they cannot all exceed their r_i: the pair is found through at least one substring. Every
candidate is then verified on all 64 bits, so nothing farther than `radius` is returned. A pair that several
substrings can find is kept only from the first of them, so no pair is returned twice.

How: per substring, a direct-address table in CSR form (bucket starts and counts from a counting sort of the base's
substring values, 2^bits buckets) and the base hashes in bucket order. A query's substring is XORed with every flip
mask of weight <= r_i (1 + 21 + 210 masks for 21 bits within 2 bits), each key names one bucket, and the bucket's
hashes are compared with the query by a vectorised popcount. The plan (m, bits, r_i) is chosen per call by a cost
model (probes and expected candidates per query against uniform hashes; constants measured on the 2-core reference
machine, see bench/dedup_scale.py): at radius 8, 4 x 16 bits within 2/1/1/1 at 100k hashes, 22/21/21 bits within 2
each at 1M. faiss's exact flat index is used instead for bases under `MIN_MIH_BASE` hashes and wherever the model
expects it to be as fast: radii so large that the pigeonhole prunes little (radius >= 12 at 100k x 100k, >= 13 at
1M x 1M, >= 14 at 1M x 4M crop hashes).

Measured on the 2-core reference machine (bench/dedup_scale.py, uniform hashes, radius 8, one core): 1M x 1M in
13-15 s of CPU, 1M x 4M in 28 s; the flat index took 581 s of CPU (884 s wall on both cores) for 1M x 1M, and
would take ~2,300 s of CPU for 1M x 4M (23 s at 100k, x100).

Memory, besides the result (20 bytes a pair, which no exact method avoids): one table at a time, 2^bits x 16 bytes
while it is built (bits <= bit length of the base + 2, at most 24) plus 28 bytes a base row, and per flip mask about
40 bytes a query of a chunk (`QUERY_CHUNK`) and 50 bytes a candidate (at most `CANDIDATE_BUDGET` at once, or one
bucket's size if larger). The search's own allocations peak at ~175 MB for 1M x 1M and for 1M x 4M (tracemalloc);
the process's peak RSS was 310 MB and 370 MB. Skewed data (many equal hashes) makes more candidates, verified in
slices, not larger ones.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import comb

import numpy as np

#: Widest substring table: 2^24 buckets (about 300 MB while it is built).
MAX_BITS = 24
#: Queries probed together (each flip mask's arrays are this long), and most candidates verified at once.
QUERY_CHUNK = 1 << 20
CANDIDATE_BUDGET = 1 << 23
#: Cost model, nanoseconds of one core of the reference machine: one probe (key, bucket lookup, empty-bucket filter),
#: one candidate (expand, gather, XOR, popcount, compare), one base row added to a table; and one pair compared by
#: faiss's flat index (0.55 ns of CPU, wall time on its 2 cores). MIH runs on one core.
PROBE_NS = 13.0
CANDIDATE_NS = 14.0
TABLE_ROW_NS = 100.0
FLAT_PAIR_NS = 0.28
#: Below this many base hashes the flat index is used whatever the model says (it is fast there, and well tried).
MIN_MIH_BASE = 20_000
#: Plans whose tables need more flip masks than this per query are not considered.
MAX_PROBES = 20_000

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Plan:
    """Substrings searched: bit offsets (from the least significant bit), widths, and the radius within each."""

    shifts: tuple[int, ...]
    bits: tuple[int, ...]
    radii: tuple[int, ...]

    def probes(self) -> int:
        """Flip masks per query, over all substrings."""
        return sum(_ball(b, r) for b, r in zip(self.bits, self.radii))

    def candidates(self, n_base: int) -> float:
        """Expected candidates per query against `n_base` uniform random hashes."""
        return sum(_ball(b, r) * n_base / 2.0**b for b, r in zip(self.bits, self.radii))

    def seconds(self, n_queries: int, n_base: int) -> float:
        """The cost model's seconds for one search (the result's size aside)."""
        per_query = self.probes() * PROBE_NS + self.candidates(n_base) * CANDIDATE_NS
        return (n_queries * per_query + len(self.bits) * n_base * TABLE_ROW_NS) * 1e-9


def _ball(bits: int, radius: int) -> int:
    """Number of `bits`-bit words within `radius` bits of a given one."""
    return sum(comb(bits, k) for k in range(min(radius, bits) + 1))


def plan_for(radius: int, n_queries: int, n_base: int) -> Plan | None:
    """The cheapest exact MIH plan for `radius` by the cost model (None only if every plan needs too many probes).

    For m substrings the needed sum(r_i + 1) = radius + 1 is spread as evenly as possible, the wider substrings
    taking the larger radii. Tables are at most 2^(bit length of the base + 2) buckets, so that a small base does not
    get a large sparse table; the substrings then leave some bits unused, which keeps the pigeonhole (the distances
    of the substrings used add up to at most the full distance).
    """
    widest = min(MAX_BITS, max(8, int(n_base).bit_length() + 2))
    best = None
    for m in range(1, min(radius + 1, 64) + 1):
        used = min(64, m * widest)
        if used < m:
            break
        bits = [used // m + (1 if k < used % m else 0) for k in range(m)]
        need = radius + 1 - m
        radii = [need // m + (1 if k < need % m else 0) for k in range(m)]
        plan = Plan(tuple(sum(bits[:k]) for k in range(m)), tuple(bits), tuple(radii))
        if plan.probes() > MAX_PROBES:
            continue
        if best is None or plan.seconds(n_queries, n_base) < best.seconds(n_queries, n_base):
            best = plan
    return best


def flat_seconds(n_queries: int, n_base: int) -> float:
    """The cost model's seconds for faiss's flat index."""
    return n_queries * n_base * FLAT_PAIR_NS * 1e-9


def choose_plan(n_queries: int, n_base: int, radius: int) -> Plan | None:
    """The MIH plan to use, or None where the flat index is expected to be as fast (or the base is small)."""
    if n_base < MIN_MIH_BASE:
        return None
    plan = plan_for(radius, n_queries, n_base)
    if plan is None or plan.seconds(n_queries, n_base) >= flat_seconds(n_queries, n_base):
        return None
    return plan


_BYTE_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as uint8 (numpy's bitwise_count where numpy has it, else a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    as_bytes = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(-1, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=1, dtype=np.uint8).reshape(np.shape(x))


def flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-bit mask of weight <= `radius`, lightest first, as bucket-number offsets (XOR)."""
    masks = [0]
    for weight in range(1, min(radius, bits) + 1):
        masks.extend(sum(1 << b for b in combo) for combo in itertools.combinations(range(bits), weight))
    return np.array(masks, dtype=np.intp)


class _Table:
    """One substring's direct-address table: CSR bucket starts and counts, the base hashes and ids in bucket order."""

    def __init__(self, base: np.ndarray, shift: int, bits: int):
        self.shift, self.mask = np.uint64(shift), np.uint64((1 << bits) - 1)
        keys = self.key(base)
        order = np.argsort(keys, kind="stable")
        index_type = np.int32 if len(base) < 2**31 else np.int64
        self.ids = order.astype(index_type)
        self.hashes = base[order]
        del order
        counts = np.bincount(keys, minlength=1 << bits)
        del keys
        self.starts = np.zeros(1 << bits, dtype=index_type)
        np.cumsum(counts[:-1], out=self.starts[1:])
        # the per-probe gather reads counts only: int32 halves its memory traffic
        self.counts = counts.astype(index_type)

    def key(self, hashes: np.ndarray) -> np.ndarray:
        """The substring of each hash, as a bucket number."""
        return ((hashes >> self.shift) & self.mask).astype(np.intp)


def mih_search(queries: np.ndarray, base: np.ndarray, radius: int, plan: Plan) -> Pairs:
    """Multi-index hashing with `plan`: per substring, each flip mask in turn over queries sorted by that substring.

    Mask-major order over sorted keys keeps the bucket lookups and candidate gathers nearly sequential (XOR with a
    fixed mask leaves sorted keys in a few monotone runs): at 1M hashes a probe costs ~13 ns, a third of a cache miss.
    """
    if sum(r + 1 for r in plan.radii) <= radius:
        raise ValueError(f"plan {plan} cannot find every pair within {radius} bits")
    sub_masks = [np.uint64(((1 << b) - 1) << s) for s, b in zip(plan.shifts, plan.bits)]
    out_q, out_b, out_d = [], [], []
    for t, (shift, bits, r) in enumerate(zip(plan.shifts, plan.bits, plan.radii)):
        table = _Table(base, shift, bits)
        earlier = list(zip(sub_masks[:t], plan.radii[:t]))
        for lo in range(0, len(queries), QUERY_CHUNK):
            chunk = queries[lo:lo + QUERY_CHUNK]
            order = np.argsort(table.key(chunk), kind="stable")
            block = chunk[order]
            keys = table.key(block)
            for flip in flip_masks(bits, r):
                probe = keys ^ flip
                hit = np.flatnonzero(table.counts[probe])
                if not len(hit):
                    continue
                bucket = probe[hit]
                starts, counts = table.starts[bucket].astype(np.int64), table.counts[bucket].astype(np.int64)
                for a, z in _slices(counts, CANDIDATE_BUDGET):
                    q, b, d = _verify(block, table, starts[a:z], counts[a:z], hit[a:z], radius, earlier)
                    out_q.append(order[q] + lo)
                    out_b.append(b)
                    out_d.append(d)
        del table
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    q, b, d = np.concatenate(out_q).astype(np.int64, copy=False), np.concatenate(out_b), np.concatenate(out_d)
    # faiss's order (by query, then base index): the same arrays whichever method ran, so runs are reproducible
    order = np.lexsort((b, q))
    return q[order], b[order], d[order]


def _slices(counts: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive [a, z) ranges of `counts` summing to at most `budget` each (or one item, if it alone is more)."""
    ends = np.cumsum(counts)
    if ends[-1] <= budget:
        return [(0, len(counts))]
    bounds, a = [], 0
    while a < len(counts):
        before = int(ends[a - 1]) if a else 0
        z = max(a + 1, int(np.searchsorted(ends, before + budget, side="right")))
        bounds.append((a, z))
        a = z
    return bounds


def _verify(block: np.ndarray, table: _Table, starts: np.ndarray, counts: np.ndarray, owner: np.ndarray,
            radius: int, earlier: list[tuple[np.uint64, int]]) -> Pairs:
    """Pairs within `radius` between each owner query (a row of `block`) and every hash of its probed bucket.

    A pair that an earlier substring also finds (its distance on that substring within that substring's radius) is
    dropped here, so that each pair comes out exactly once.
    """
    total = int(counts.sum())
    pos = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    pos += np.arange(total, dtype=np.int64)
    q = np.repeat(owner, counts)
    x = table.hashes[pos]
    x ^= block[q]
    keep = np.flatnonzero(popcount64(x) <= radius)
    q, pos, x = q[keep], pos[keep], x[keep]
    if earlier:
        first = np.ones(len(x), dtype=bool)
        for mask, r in earlier:
            first &= popcount64(x & mask) > r
        q, pos, x = q[first], pos[first], x[first]
    return q, table.ids[pos].astype(np.int64), popcount64(x).astype(np.int32)


def flat_search(queries: np.ndarray, base: np.ndarray, radius: int) -> Pairs:
    """faiss's flat binary index: compares every pair (all cores through OpenMP). Exact and quadratic."""
    import faiss

    from curator.core.hashing import to_bytes

    index = faiss.IndexBinaryFlat(64)
    index.add(to_bytes(base))
    # faiss's binary range search keeps distances strictly below the radius
    lims, dist, ids = index.range_search(to_bytes(queries), radius + 1)
    q = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims).astype(np.int64))
    return q, ids.astype(np.int64), dist.astype(np.int32)


def radius_search(queries: np.ndarray, base: np.ndarray, radius: int, method: str = "auto") -> Pairs:
    """All (query index, base index, distance) whose 64-bit hashes are within `radius` bits, by query then base index.

    `method`: `auto` (MIH where the cost model expects it to beat the flat index), `mih` (multi-index hashing with the
    cheapest plan, whatever the size or radius) or `flat` (faiss, every pair). All are exact.
    """
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or not 0 <= radius <= 64:
        raise ValueError(f"radius must be a whole number of bits between 0 and 64; got {radius!r}")
    if method not in ("auto", "mih", "flat"):
        raise ValueError(f"method must be auto, mih or flat; got {method!r}")
    radius = int(radius)
    queries = np.ascontiguousarray(queries, dtype=np.uint64).reshape(-1)
    base = np.ascontiguousarray(base, dtype=np.uint64).reshape(-1)
    if len(queries) == 0 or len(base) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    if method == "auto":
        plan = choose_plan(len(queries), len(base), radius)
    elif method == "mih":
        plan = plan_for(radius, len(queries), len(base))
    else:
        plan = None
    if plan is None:
        return flat_search(queries, base, radius)
    return mih_search(queries, base, radius, plan)
