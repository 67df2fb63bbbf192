"""The duplicate cascade: exact, perceptual and embedding near-duplicates, merged into clusters with one keeper.

Every function here takes arrays or frames and returns arrays or frames; `find_duplicates` runs the cascade.

Stages and the evidence each needs (defaults measured in bench/dedup.py, see docs/BENCHMARKS.md):
1. exact: the same file bytes (sha256), or the same decoded pixels in another encoding (pixel sha256).
2. phash: full-frame pHashes within `phash_radius` bits and dHashes within `dhash_radius` (the second hash cuts
   the false pairs that flat, dark and monochrome images make); or one image's full-frame pHash within
   `crop_radius` of a centre-crop pHash of the other (a cropped copy).
3. embedding: cosine of the L2-normalised embeddings among each image's nearest neighbours, above a threshold
   relative to the collection's typical nearest-neighbour similarity (so it does not depend on the embedding's
   scale), and verified by the best crop-aligned pHash distance, so that two different paintings of the same motif
   by the same artist do not merge.
Every stage-2 and stage-3 pair must also pass two independent checks: its colour signatures agree (series painted
in one composition and several colours share grey-level hashes), and, for stage 2, its embedding cosine is at least
as high as a typical nearest neighbour's (1 - `hash_gap_factor` x the median nearest-neighbour gap), which rejects
hash collisions between paintings that look nothing alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from curator.hashing import CROP_SCALES
from curator.settings import DuplicateSettings  # re-exported: defined in the light module the CLI imports

#: Formats ranked for keeping, least lossy first (the keeper rule's second key).
FORMAT_RANK = {"PNG": 0, "TIFF": 0, "BMP": 0, "PPM": 0, "WEBP": 1, "JPEG": 2, "GIF": 3}
FLAT_INDEX_LIMIT = 200_000

PAIR_SCHEMA = {"i": pl.Int64, "j": pl.Int64, "stage": pl.String, "phash_distance": pl.Int32,
               "cosine": pl.Float32, "detail": pl.String}


def _pairs_frame(i, j, stage: str, phash_distance=None, cosine=None, detail: str | None = None) -> pl.DataFrame:
    n = len(i)
    return pl.DataFrame(
        {
            "i": np.asarray(i, dtype=np.int64),
            "j": np.asarray(j, dtype=np.int64),
            "stage": [stage] * n,
            "phash_distance": None if phash_distance is None else np.asarray(phash_distance, dtype=np.int32),
            "cosine": None if cosine is None else np.asarray(cosine, dtype=np.float32),
            "detail": [detail] * n if not isinstance(detail, list) else detail,
        },
        schema=PAIR_SCHEMA,
    )


def empty_pairs() -> pl.DataFrame:
    return pl.DataFrame(schema=PAIR_SCHEMA)


def shared_key_pairs(keys: list) -> tuple[list[int], list[int]]:
    """Row pairs (first row with a key, each later row with it) for every non-null key shared by several rows."""
    first: dict[object, int] = {}
    i, j = [], []
    for row, key in enumerate(keys):
        if key is None:
            continue
        if key in first:
            i.append(first[key])
            j.append(row)
        else:
            first[key] = row
    return i, j


def exact_pairs(keys: list[str | None], stage: str, detail: str) -> pl.DataFrame:
    """Pairs (first member, other member) of rows sharing a non-null key."""
    i, j = shared_key_pairs(keys)
    return _pairs_frame(i, j, stage, detail=detail)


def radius_pairs(queries: np.ndarray, base: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query, base) index pairs whose 64-bit hashes are within `radius` bits, with their distances.

    Exact and sub-quadratic: multi-index hashing (`curator.hamming_search`), with faiss's flat index for small bases
    and very large radii. Ordered by query, then base index. Measured in bench/dedup_scale.py.
    """
    from curator.hamming_search import radius_search

    return radius_search(queries, base, radius)


def phash_pairs(phash: np.ndarray, dhash: np.ndarray, crop: np.ndarray, settings: DuplicateSettings) -> pl.DataFrame:
    """Perceptual near-duplicates: full-frame pHash+dHash matches, and full-frame vs centre-crop pHash matches."""
    from curator.hashing import hamming

    n = len(phash)
    q, b, d = radius_pairs(phash, phash, settings.phash_radius)
    keep = q < b
    q, b, d = q[keep], b[keep], d[keep]
    dd = hamming(dhash[q], dhash[b])
    ok = dd <= settings.dhash_radius
    frames = [_pairs_frame(q[ok], b[ok], "phash", d[ok],
                           detail=[f"pHash distance {x}, dHash {y}" for x, y in zip(d[ok], dd[ok])])]
    if crop.size:
        scales = crop.shape[1]
        q, b, d = radius_pairs(phash, crop.reshape(-1), settings.crop_radius)
        owner = b // scales
        keep = q != owner
        q, owner, d = q[keep], owner[keep], d[keep]
        frames.append(_pairs_frame(np.minimum(q, owner), np.maximum(q, owner), "phash", d,
                                   detail=[f"crop-aligned pHash distance {x}" for x in d]))
    pairs = pl.concat(frames)
    if pairs.is_empty():
        return pairs
    return pairs.sort("phash_distance").unique(["i", "j"], keep="first", maintain_order=True).filter(
        pl.col("i") < n)


def best_phash_distance(phash: np.ndarray, crop: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Smallest pHash distance between two images over full frames and each one's centre crops against the other."""
    from curator.hashing import hamming

    best = hamming(phash[i], phash[j])
    if crop.size:
        best = np.minimum(best, hamming(phash[i][:, None], crop[j]).min(axis=1))
        best = np.minimum(best, hamming(phash[j][:, None], crop[i]).min(axis=1))
    return best


def normalise(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def neighbours(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine, for unit-length rows: exact (IndexFlatIP) up to 200k rows, HNSW
    beyond, re-scored exactly."""
    import faiss

    x = np.ascontiguousarray(unit, dtype=np.float32)
    n, dim = x.shape
    k = min(k + 1, n)
    if n <= FLAT_INDEX_LIMIT:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * k)
    index.add(x)
    sims, ids = index.search(x, k)
    return sims, ids


@dataclass(frozen=True)
class Similarity:
    """Unit embeddings, each row's nearest neighbours, and the collection's median nearest-neighbour gap."""

    unit: np.ndarray
    sims: np.ndarray
    ids: np.ndarray
    gap: float

    def cosine(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return (self.unit[i] * self.unit[j]).sum(axis=1)


def similarity(embeddings: np.ndarray, k: int, linked: pl.DataFrame | None = None) -> Similarity:
    """Nearest neighbours of every row, and the median of 1 - cosine to the nearest other row that is not `linked`
    to it (pairs already found by hashes), so that a collection full of copies does not make its own copies look
    typical."""
    unit = normalise(embeddings)
    sims, ids = neighbours(unit, k)
    n = len(unit)
    excluded = ids == np.arange(n)[:, None]
    if linked is not None and not linked.is_empty():
        pairs = set(zip(linked["i"].to_list(), linked["j"].to_list()))
        rows = np.repeat(np.arange(n), ids.shape[1]).tolist()
        flat = [(min(r, c), max(r, c)) in pairs for r, c in zip(rows, ids.ravel().tolist())]
        excluded |= np.array(flat, dtype=bool).reshape(ids.shape)
    nearest = np.where(excluded | (ids < 0), -np.inf, sims).max(axis=1)
    finite = nearest[np.isfinite(nearest)]
    gap = float(np.median(1.0 - finite)) if len(finite) else 1.0
    return Similarity(unit, sims, ids, gap)


def verify_pairs(pairs: pl.DataFrame, colour: np.ndarray, sim: Similarity | None, min_cosine: float | None,
                 settings: DuplicateSettings) -> pl.DataFrame:
    """Keep the pairs whose colours agree and (when embeddings are given) whose cosine is at least `min_cosine`."""
    from curator.hashing import colour_agreement

    if pairs.is_empty():
        return pairs
    i, j = pairs["i"].to_numpy(), pairs["j"].to_numpy()
    ok = colour_agreement(colour[i], colour[j], settings.grey_norm) >= settings.colour_min
    if sim is not None:
        cosine = sim.cosine(i, j)
        if min_cosine is not None:
            ok &= cosine >= min_cosine
        pairs = pairs.with_columns(pl.Series("cosine", cosine, dtype=pl.Float32))
    return pairs.filter(pl.Series(ok))


def embedding_pairs(sim: Similarity, phash: np.ndarray, crop: np.ndarray, colour: np.ndarray,
                    settings: DuplicateSettings) -> pl.DataFrame:
    """Embedding near-duplicates among nearest neighbours above the relative threshold, verified by crop-aligned
    pHash and colour."""
    n = len(sim.unit)
    if n < 2:
        return empty_pairs()
    threshold = 1.0 - settings.embed_relative * sim.gap
    rows = np.repeat(np.arange(n), sim.ids.shape[1])
    cols, cos = sim.ids.ravel(), sim.sims.ravel()
    keep = (cols >= 0) & (cols != rows) & (cos >= threshold)
    lo, hi = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    unique = np.unique(np.stack([lo, hi], axis=1), axis=0) if len(lo) else np.zeros((0, 2), dtype=np.int64)
    rows, cols = unique[:, 0], unique[:, 1]
    dist = best_phash_distance(phash, crop, rows, cols) if len(rows) else np.zeros(0, dtype=np.int64)
    ok = dist <= settings.verify_radius
    rows, cols, dist = rows[ok], cols[ok], dist[ok]
    cos = sim.cosine(rows, cols)
    pairs = _pairs_frame(rows, cols, "embedding", dist, cos,
                         detail=[f"cosine {c:.3f} (threshold {threshold:.3f}), best pHash distance {d}"
                                 for c, d in zip(cos, dist)])
    return verify_pairs(pairs, colour, None, None, settings)


def connected_clusters(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over pairs: a cluster id per row (the smallest member's index), -1 for rows in no pair."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(x) for x in range(n)], dtype=np.int64)
    sizes = np.bincount(roots, minlength=n)
    return np.where(sizes[roots] > 1, roots, -1)


def keeper_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted best-first by the keeper rule: most pixels, then least lossy format, then most bytes, then path."""
    return frame.with_columns(
        (pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64)).alias("_pixels"),
        pl.col("format").replace_strict(FORMAT_RANK, default=4, return_dtype=pl.Int32).alias("_format_rank"),
    ).sort(["_pixels", "_format_rank", "bytes", "path"], descending=[True, False, True, False]).drop(
        "_pixels", "_format_rank")


def _stage_columns(n: int, pairs: pl.DataFrame, stage: str, score: np.ndarray) -> dict[str, np.ndarray]:
    groups = connected_clusters(n, pairs["i"].to_numpy(), pairs["j"].to_numpy())
    return {f"is_{stage}_issue": groups >= 0, f"{stage}_score": score.astype(np.float32),
            f"{stage}_group": groups}


def _best_per_row(n: int, pairs: pl.DataFrame, column: str, worst: float, higher_is_closer: bool) -> np.ndarray:
    best = np.full(n, worst, dtype=np.float64)
    if pairs.is_empty():
        return best
    values = pairs[column].fill_null(worst).to_numpy().astype(np.float64)
    for idx in (pairs["i"].to_numpy(), pairs["j"].to_numpy()):
        (np.maximum if higher_is_closer else np.minimum).at(best, idx, values)
    return best


def find_duplicates(frame: pl.DataFrame, embeddings: np.ndarray | None,
                    settings: DuplicateSettings = DuplicateSettings(),
                    progress: Callable[[int], None] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Run the cascade over a manifest frame (fingerprint columns filled for ok rows) and the ok rows' embeddings
    (in the frame's order of ok rows, or None to skip stage 3).

    Returns the frame with the duplicate columns and updated status/keep/reason, and every reported pair
    (`i`, `j` as row indices of `frame`, the stage and its evidence). `progress` is called once per stage.
    """
    step = progress or (lambda n: None)
    from curator.hashing import colour_vectors, from_hex

    ok_rows = np.flatnonzero(frame["status"].to_numpy() == "ok")
    ok = frame[ok_rows]
    n = len(frame)
    m = len(ok)
    pairs = [exact_pairs(ok["sha256"].to_list(), "exact", "identical bytes"),
             exact_pairs(ok["pixel_sha256"].to_list(), "exact", "identical pixels, other encoding")]
    exact = pl.concat(pairs).unique(["i", "j"], keep="first", maintain_order=True)
    step(1)
    phash = from_hex(ok["phash"].to_list())
    dhash = from_hex(ok["dhash"].to_list())
    crop = (np.array([[int(h, 16) for h in hs] for hs in ok["crop_phash"].to_list()], dtype=np.uint64) if m
            else np.zeros((0, len(CROP_SCALES)), dtype=np.uint64))
    colour = colour_vectors(ok["colour"].to_list())
    near = phash_pairs(phash, dhash, crop, settings) if m else empty_pairs()
    sim = (similarity(embeddings, settings.embed_neighbours, pl.concat([exact, near]).select("i", "j"))
           if embeddings is not None and m > 1 else None)
    near = verify_pairs(near, colour, sim, 1.0 - settings.hash_gap_factor * sim.gap if sim else None, settings)
    step(1)
    embedded = embedding_pairs(sim, phash, crop, colour, settings) if sim is not None else empty_pairs()
    step(1)
    columns = {
        **_stage_columns(m, exact, "exact", np.where(connected_clusters(m, exact["i"].to_numpy(),
                                                                         exact["j"].to_numpy()) >= 0, 0.0, 1.0)),
        **_stage_columns(m, near, "phash", _best_per_row(m, near, "phash_distance", 64.0, False) / 64.0),
        **_stage_columns(m, embedded, "embedding",
                         1.0 - np.clip(_best_per_row(m, embedded, "cosine", 0.0, True), 0.0, 1.0)),
    }
    all_pairs = pl.concat([exact, near, embedded])
    cluster = connected_clusters(m, all_pairs["i"].to_numpy(), all_pairs["j"].to_numpy())

    # map ok-row indices back to frame rows; group ids become frame row indices
    def spread(values: np.ndarray, fill, convert) -> list:
        full = [fill] * n
        for row, value in zip(ok_rows.tolist(), values.tolist()):
            full[row] = convert(value)
        return full

    def as_group(value: int):
        return int(ok_rows[value]) if value >= 0 else None

    out = {}
    for name, values in columns.items():
        if name.startswith("is_"):
            out[name] = spread(values, False, bool)
        elif name.endswith("_group"):
            out[name] = spread(values, None, as_group)
        else:
            out[name] = spread(values, None, float)
    cluster_full = spread(cluster, None, as_group)

    status = frame["status"].to_list()
    reason = frame["reason"].to_list()
    keep = frame["keep"].to_list()
    duplicate_of: list[str | None] = [None] * n
    global_pairs = all_pairs.with_columns(pl.Series("i", ok_rows[all_pairs["i"].to_numpy()]),
                                          pl.Series("j", ok_rows[all_pairs["j"].to_numpy()]))
    evidence: dict[tuple[int, int], str] = {}
    for row in global_pairs.iter_rows(named=True):
        detail = row["detail"]
        if row["stage"] == "phash" and row["cosine"] is not None:
            detail += f", cosine {row['cosine']:.3f}"
        evidence.setdefault((row["i"], row["j"]), f"{row['stage']}: {detail}")
    with_cluster = frame.with_row_index("_row").with_columns(pl.Series("_cluster", cluster_full, dtype=pl.Int64))
    for members in with_cluster.filter(pl.col("_cluster").is_not_null()).partition_by("_cluster"):
        ranked = keeper_order(members)
        labels = sorted({x for x in ranked["label"].to_list() if x is not None})
        rows = ranked["_row"].to_list()
        keeper = rows[0]
        if len(labels) > 1 and settings.conflicts != "keep":
            counts = ranked.group_by("label").len().sort(["len", "label"], descending=[True, False])
            top = counts.rows()
            majority = top[0][0] if settings.conflicts == "majority" and (len(top) < 2 or top[0][1] > top[1][1]) \
                else None
            for r, label in zip(rows, ranked["label"].to_list()):
                if majority is not None and label == majority:
                    continue
                status[r], keep[r] = "conflict", False
                reason[r] = (f"the same image is filed under {' and '.join(labels)}"
                             + (f"; majority label is {majority}" if majority else "; no member kept"))
            if majority is None:
                continue
            keeper = next(r for r, label in zip(rows, ranked["label"].to_list()) if label == majority)
            rows = [r for r, label in zip(rows, ranked["label"].to_list()) if label == majority]
        keeper_path = frame["path"][keeper]
        for r in rows:
            if r == keeper:
                continue
            status[r], keep[r] = "duplicate", False
            duplicate_of[r] = keeper_path
            proof = evidence.get((min(r, keeper), max(r, keeper)))
            reason[r] = f"duplicate of {keeper_path}" + (f" ({proof})" if proof else " (same cluster)")
    result = frame.with_columns(
        pl.Series("status", status, dtype=pl.String),
        pl.Series("reason", reason, dtype=pl.String),
        pl.Series("keep", keep, dtype=pl.Boolean),
        pl.Series("cluster", cluster_full, dtype=pl.Int32),
        pl.Series("duplicate_of", duplicate_of, dtype=pl.String),
        *[pl.Series(name, values, dtype=pl.Boolean if name.startswith("is_") else
                    pl.Int32 if name.endswith("_group") else pl.Float32) for name, values in out.items()],
    )
    return result, global_pairs
