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
The typical gap (`typical_gap`) is measured to each row's nearest neighbour that is neither linked to it by a hash
pair nor within `verify_radius` of it by crop-aligned pHash, i.e. to another image rather than a possible copy, so
that it stays that of the distinct images however many copies a collection holds; the thresholds a run used are
recorded in settings.json (`thresholds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import polars as pl

from curator.core.hashing import CROP_SCALES
from curator.core.neighbours import Graph, Neighbourhood, pair_keys
from curator.core.progress import Event, advance
from curator.core.rowfile import RowFile
from curator.core.settings import DuplicateSettings  # re-exported: defined in the light module the CLI imports

#: Formats ranked for keeping, least lossy first (the keeper rule's second key).
FORMAT_RANK = {"PNG": 0, "TIFF": 0, "BMP": 0, "PPM": 0, "WEBP": 1, "JPEG": 2, "GIF": 3}

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

    Exact and sub-quadratic: multi-index hashing (`curator.core.hamming_search`), with faiss's flat index for small
    bases and very large radii. Ordered by query, then base index. Measured in bench/dedup_scale.py.
    """
    from curator.core.hamming_search import radius_search

    return radius_search(queries, base, radius)


def phash_pairs(phash: np.ndarray, dhash: np.ndarray, crop: np.ndarray, settings: DuplicateSettings) -> pl.DataFrame:
    """Perceptual near-duplicates: full-frame pHash+dHash matches, and full-frame vs centre-crop pHash matches."""
    from curator.core.hashing import hamming

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
    from curator.core.hashing import hamming

    best = hamming(phash[i], phash[j])
    if crop.size:
        best = np.minimum(best, hamming(phash[i][:, None], crop[j]).min(axis=1))
        best = np.minimum(best, hamming(phash[j][:, None], crop[i]).min(axis=1))
    return best


def normalise(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def neighbours(unit: np.ndarray, k: int) -> Graph:
    """Each row's k nearest other rows by cosine: the shared graph of `curator.core.neighbours.knn` (exact up to its
    `EXACT_LIMIT` rows, a compressed index re-scored exactly above it)."""
    from curator.core.neighbours import knn

    return knn(unit, k)


@dataclass(frozen=True)
class Similarity:
    """Unit embeddings (float32, or the float16 unit rows of a large collection, held or in a file: `RowFile`), each
    row's nearest other rows (`ids`, -1 padded, and their cosines `sims`), and the collection's median
    nearest-neighbour gap."""

    unit: np.ndarray | RowFile
    sims: np.ndarray
    ids: np.ndarray
    gap: float

    def cosine(self, i: np.ndarray, j: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Cosines of the row pairs (i, j), a chunk of pairs at a time (float16 rows, held or spilled to a
        `curator.core.rowfile.RowFile`, are read and widened per chunk: about 300 MB of temporaries at 2,304 wide)."""
        if self.unit.dtype == np.float32:
            return (self.unit[i] * self.unit[j]).sum(axis=1)
        out = np.empty(len(i), dtype=np.float32)
        for start in range(0, len(i), chunk):
            a = self.unit[i[start:start + chunk]].astype(np.float32)
            out[start:start + chunk] = (a * self.unit[j[start:start + chunk]].astype(np.float32)).sum(axis=1)
        return out


#: Neighbours per row searched at least when `similarity` is given a matrix: the typical gap is read past a row's
#: copies (a painting with 8 copies has 8 neighbours that are not "typical"), so the search must reach beyond them.
GAP_NEIGHBOURS = 32


def similarity(embeddings: np.ndarray | Neighbourhood, k: int, linked: pl.DataFrame | None = None,
               phash: np.ndarray | None = None, crop: np.ndarray | None = None,
               copy_radius: int | None = None) -> Similarity:
    """Nearest neighbours of every row (its first k), and the collection's median nearest-neighbour gap (`typical_gap`):
    1 - cosine to the nearest other row that is not `linked` to it (pairs already found by hashes) and, when `phash`,
    `crop` and `copy_radius` are given, whose best crop-aligned pHash distance to it is above `copy_radius` (a row
    that could be a copy is not a typical neighbour). Both exclusions keep a collection full of copies from making its
    own copies look typical: with 8 copies of every painting, the nearest row not yet linked was mostly another copy,
    the gap fell about tenfold and the thresholds built on it rejected the copies themselves. `embeddings` is a matrix
    (searched here: `max(k, GAP_NEIGHBOURS)` neighbours a row when something is excluded, else k) or a
    `curator.core.neighbours.Neighbourhood` whose shared graph is used (all of it for the gap, its first k neighbours
    for the pairs)."""
    from curator.core.neighbours import Neighbourhood

    hashes = (phash, crop, copy_radius) if phash is not None and copy_radius is not None else None
    if isinstance(embeddings, Neighbourhood):
        unit = embeddings.unit()
        wide = embeddings.graph
    else:
        unit = normalise(embeddings)
        # without exclusions a row's nearest neighbour is its first: no need to search past k
        excluding = hashes is not None or (linked is not None and not linked.is_empty())
        wide = neighbours(unit, max(k, GAP_NEIGHBOURS) if excluding else k)
    graph = wide.first(k)
    gap = typical_gap(wide.ids, wide.sims, linked, hashes)
    return Similarity(unit, graph.sims, graph.ids, gap)


def typical_gap(ids: np.ndarray, sims: np.ndarray, linked: pl.DataFrame | None = None,
                hashes: tuple[np.ndarray, np.ndarray | None, int] | None = None) -> float:
    """Median over rows of 1 - cosine to the row's nearest neighbour (`ids`/`sims`: a neighbour graph, nearest first)
    that is neither `linked` to it nor, with `hashes` = (pHash, crop pHashes, radius), within `radius` bits of it by
    best crop-aligned pHash distance; rows without such a neighbour are left out (1.0 when none has one).
    Column by column over the rows still looking, so that it costs one check a row where nearest neighbours are
    ordinary, and never a check per (row, neighbour) of a wide graph."""
    n, width = ids.shape
    known = (np.unique(pair_keys(linked["i"].to_numpy(), linked["j"].to_numpy(), n))
             if linked is not None and not linked.is_empty() else np.zeros(0, dtype=np.int64))
    nearest = np.full(n, np.nan)
    looking = np.arange(n)
    for col in range(width):
        if not len(looking):
            break
        other = ids[looking, col].astype(np.int64)
        fine = other >= 0
        rows, other = looking[fine], other[fine]
        ok = np.ones(len(rows), dtype=bool)
        if len(known):
            keys = pair_keys(rows, other, n)
            at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
            ok &= known[at] != keys
        if hashes is not None and len(rows):
            phash, crop, radius = hashes
            ok &= best_phash_distance(phash, crop if crop is not None else np.zeros((len(phash), 0), np.uint64),
                                      rows, other) > radius
        nearest[rows[ok]] = sims[rows[ok], col]
        looking = np.setdiff1d(looking, rows[ok], assume_unique=True)
    finite = nearest[np.isfinite(nearest)]
    return float(np.median(1.0 - finite)) if len(finite) else 1.0


def thresholds(sim: Similarity | None, settings: DuplicateSettings) -> dict[str, float | None]:
    """The thresholds a run's embeddings set (None without embeddings): the typical nearest-neighbour gap, the
    cosine a hash pair needs (1 - `hash_gap_factor` x gap) and the embedding stage's (1 - `embed_relative` x gap)."""
    if sim is None:
        return {"typical_gap": None, "hash_pair_min_cosine": None, "embedding_min_cosine": None}
    return {"typical_gap": sim.gap, "hash_pair_min_cosine": 1.0 - settings.hash_gap_factor * sim.gap,
            "embedding_min_cosine": 1.0 - settings.embed_relative * sim.gap}


def verify_pairs(pairs: pl.DataFrame, colour: np.ndarray, sim: Similarity | None, min_cosine: float | None,
                 settings: DuplicateSettings) -> pl.DataFrame:
    """Keep the pairs whose colours agree and (when embeddings are given) whose cosine is at least `min_cosine`."""
    from curator.core.hashing import colour_agreement

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


#: Rows whose graph neighbours `embedding_pairs` screens at once.
EMBED_ROWS = 65536


def embedding_pairs(sim: Similarity, phash: np.ndarray, crop: np.ndarray, colour: np.ndarray,
                    settings: DuplicateSettings) -> pl.DataFrame:
    """Embedding near-duplicates among nearest neighbours above the relative threshold, verified by crop-aligned
    pHash and colour. The cosines are the graph's own (exact, see `curator.core.neighbours.Graph`): no row is read."""
    n = len(sim.unit)
    if n < 2:
        return empty_pairs()
    threshold = thresholds(sim, settings)["embedding_min_cosine"]
    keys, dists, cosines = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], [np.zeros(0, np.float32)]
    for start in range(0, n, EMBED_ROWS):  # candidates a block of rows at a time: at 1M x 64 they took 4.6 GB at once
        ids = sim.ids[start:start + EMBED_ROWS]
        rows = np.repeat(np.arange(start, start + len(ids)), ids.shape[1])
        cols, cos = ids.ravel().astype(np.int64), sim.sims[start:start + len(ids)].ravel()
        keep = (cols >= 0) & (cols != rows) & (cos >= threshold)
        rows, cols, cos = rows[keep], cols[keep], cos[keep]
        dist = best_phash_distance(phash, crop, rows, cols)
        near = dist <= settings.verify_radius
        keys.append(pair_keys(rows[near], cols[near], n))
        dists.append(dist[near].astype(np.int64))
        cosines.append(cos[near])
    unique, first = np.unique(np.concatenate(keys), return_index=True)  # a pair found from both of its rows: once
    rows, cols = unique // n, unique % n
    dist, cos = np.concatenate(dists)[first], np.concatenate(cosines)[first]
    pairs = _pairs_frame(rows, cols, "embedding", dist, cos,
                         detail=[f"cosine {c:.3f} (threshold {threshold:.3f}), best pHash distance {d}"
                                 for c, d in zip(cos, dist)])
    return verify_pairs(pairs, colour, None, None, settings)


def connected_clusters(n: int, i: np.ndarray, j: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """Connected components of the pairs (scipy): per row, the index of its component's first member by `rank`
    (lowest rank first; the smallest index when no rank is given), -1 for rows in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    by_rank = np.argsort(np.arange(n) if rank is None else rank, kind="stable")
    ordered = labels[by_rank]
    _, first = np.unique(ordered, return_index=True)
    representative = np.empty(count, dtype=np.int64)
    representative[ordered[first]] = by_rank[first]
    sizes = np.bincount(labels, minlength=count)
    return np.where(sizes[labels] > 1, representative[labels], -1)


def cluster_ids(members: np.ndarray, sha256: np.ndarray) -> list[str | None]:
    """Content-derived cluster ids: the first 16 hex digits of the sha256 of the member `members` names (the
    cluster's keeper), None for -1. Adding files elsewhere never renumbers a cluster."""
    return [None if m < 0 else sha256[m][:16] for m in members.tolist()]


def keeper_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted best-first by the keeper rule: most pixels, then least lossy format, then most bytes, then path."""
    return frame.with_columns(
        (pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64)).alias("_pixels"),
        pl.col("format").replace_strict(FORMAT_RANK, default=4, return_dtype=pl.Int32).alias("_format_rank"),
    ).sort(["_pixels", "_format_rank", "bytes", "path"], descending=[True, False, True, False]).drop(
        "_pixels", "_format_rank")


def _stage_columns(pairs: pl.DataFrame, stage: str, score: np.ndarray, rank: np.ndarray,
                   sha256: np.ndarray) -> dict[str, object]:
    members = connected_clusters(len(rank), pairs["i"].to_numpy(), pairs["j"].to_numpy(), rank)
    return {f"is_{stage}_issue": members >= 0, f"{stage}_score": score.astype(np.float32),
            f"{stage}_group": cluster_ids(members, sha256)}


def _best_per_row(n: int, pairs: pl.DataFrame, column: str, worst: float, higher_is_closer: bool) -> np.ndarray:
    best = np.full(n, worst, dtype=np.float64)
    if pairs.is_empty():
        return best
    values = pairs[column].fill_null(worst).to_numpy().astype(np.float64)
    for idx in (pairs["i"].to_numpy(), pairs["j"].to_numpy()):
        (np.maximum if higher_is_closer else np.minimum).at(best, idx, values)
    return best


def find_duplicates(frame: pl.DataFrame, embeddings: np.ndarray | Neighbourhood | None,
                    settings: DuplicateSettings = DuplicateSettings(),
                    events: Event | None = None, summary: dict | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Run the cascade over a manifest frame (fingerprint columns filled for ok rows) and the ok rows' embeddings
    (in the frame's order of ok rows: a matrix, a `curator.core.neighbours.Neighbourhood` whose shared graph is
    used, as `curator clean` passes it, or None to skip stage 3).

    Returns the frame with the duplicate columns and updated status/keep/reason, and every reported pair
    (`i`, `j` as row indices of `frame`, the stage and its evidence). Each of its three stages sends one `"advance"`
    through `events`. Cluster and group ids are the first 16 hex digits of the sha256 of the member the keeper rule
    ranks first. `summary`, when given, receives the thresholds the embedding evidence set (`thresholds`), for
    settings.json.
    """
    step = partial(advance, events)
    from curator.core.hashing import colour_vectors, from_hex

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
    sim = (similarity(embeddings, settings.embed_neighbours, pl.concat([exact, near]).select("i", "j"), phash, crop,
                      settings.verify_radius)
           if embeddings is not None and m > 1 else None)
    limits = thresholds(sim, settings)
    near = verify_pairs(near, colour, sim, limits["hash_pair_min_cosine"], settings)
    if summary is not None:
        summary.update({name: None if value is None else round(value, 6) for name, value in limits.items()})
    step(1)
    embedded = embedding_pairs(sim, phash, crop, colour, settings) if sim is not None else empty_pairs()
    step(1)
    rank = np.empty(m, dtype=np.int64)
    rank[keeper_order(ok.with_row_index("_ok"))["_ok"].to_numpy()] = np.arange(m)
    sha = np.asarray(ok["sha256"].to_list(), dtype=object)
    exact_members = connected_clusters(m, exact["i"].to_numpy(), exact["j"].to_numpy())
    columns = {
        **_stage_columns(exact, "exact", np.where(exact_members >= 0, 0.0, 1.0), rank, sha),
        **_stage_columns(near, "phash", _best_per_row(m, near, "phash_distance", 64.0, False) / 64.0, rank, sha),
        **_stage_columns(embedded, "embedding",
                         1.0 - np.clip(_best_per_row(m, embedded, "cosine", 0.0, True), 0.0, 1.0), rank, sha),
    }
    all_pairs = pl.concat([exact, near, embedded])
    cluster = cluster_ids(connected_clusters(m, all_pairs["i"].to_numpy(), all_pairs["j"].to_numpy(), rank), sha)
    global_pairs = all_pairs.with_columns(pl.Series("i", ok_rows[all_pairs["i"].to_numpy()]),
                                          pl.Series("j", ok_rows[all_pairs["j"].to_numpy()]))
    spread = []
    for name, values in columns.items():
        dtype = pl.Boolean if name.startswith("is_") else pl.String if name.endswith("_group") else pl.Float32
        spread.append(_spread(name, n, ok_rows, values, dtype, False if dtype == pl.Boolean else None))
    result = frame.drop("duplicate_of", strict=False).with_columns(_spread("cluster", n, ok_rows, cluster, pl.String),
                                                                   *spread)
    return resolve_clusters(result, global_pairs, settings), global_pairs


def _spread(name: str, n: int, rows: np.ndarray, values, dtype: pl.DataType, fill=None) -> pl.Series:
    """A column of `n` rows holding `values` at `rows` and `fill` elsewhere."""
    full = pl.Series(name, [fill] * n, dtype=dtype)
    if len(rows):
        full = full.scatter(rows, pl.Series(values, dtype=dtype))
    return full


def _proofs(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per reported pair (i < j, frame rows), the evidence a duplicate's reason cites: the first stage that found it."""
    first = pairs.unique(["i", "j"], keep="first", maintain_order=True)
    proof = [f"{stage}: {detail}" + (f", cosine {cos:.3f}" if stage == "phash" and cos is not None else "")
             for stage, detail, cos in zip(first["stage"].to_list(), first["detail"].to_list(),
                                           first["cosine"].to_list())]
    return first.select("i", "j").with_columns(pl.Series("_proof", proof, dtype=pl.String))


def resolve_clusters(frame: pl.DataFrame, pairs: pl.DataFrame, settings: DuplicateSettings) -> pl.DataFrame:
    """Per cluster, one keeper (the keeper rule) and the others `duplicate`; clusters whose members carry different
    labels are settled by `settings.conflicts` (drop: every member `conflict`; majority: members of a strict
    majority label go on as a cluster, the others `conflict`; keep: labels ignored). Vectorised over clusters."""
    members = keeper_order(frame.with_row_index("_row").filter(pl.col("cluster").is_not_null())).with_row_index(
        "_rank")
    if members.is_empty():
        return frame.with_columns(pl.lit(None, dtype=pl.String).alias("duplicate_of"))
    counts = members.group_by("cluster", "label").agg(pl.len().alias("_n")).sort(
        ["cluster", "_n", "label"], descending=[False, True, False], nulls_last=False)
    tops = counts.group_by("cluster", maintain_order=True).agg(
        pl.col("label").first().alias("_top"), pl.col("_n").first().alias("_n1"),
        pl.col("_n").slice(1, 1).first().fill_null(0).alias("_n2"))
    labels = members.group_by("cluster").agg(
        pl.col("label").drop_nulls().unique().sort().alias("_labels"))
    clusters = tops.join(labels, on="cluster").with_columns(
        (pl.col("_labels").list.len() > 1).alias("_conflict"),
        pl.col("_labels").list.join(" and ").alias("_names"),
        pl.when((pl.col("_n1") > pl.col("_n2")) & pl.lit(settings.conflicts == "majority"))
        .then(pl.col("_top")).otherwise(None).alias("_majority"))
    if settings.conflicts == "keep":
        clusters = clusters.with_columns(pl.lit(False).alias("_conflict"))
    members = members.join(clusters.select("cluster", "_conflict", "_names", "_majority"), on="cluster")
    members = members.with_columns(
        (pl.col("_conflict") & (pl.col("_majority").is_null() | (pl.col("label") != pl.col("_majority"))
                                 .fill_null(True))).alias("_refused"))
    eligible = members.filter(~pl.col("_refused"))
    keepers = eligible.sort("_rank").group_by("cluster", maintain_order=True).agg(
        pl.col("_row").first().alias("_keeper"), pl.col("path").first().alias("_keeper_path"))
    members = members.join(keepers, on="cluster", how="left").with_columns(
        pl.min_horizontal("_row", "_keeper").cast(pl.Int64).alias("i"),
        pl.max_horizontal("_row", "_keeper").cast(pl.Int64).alias("j"))
    members = members.join(_proofs(pairs), on=["i", "j"], how="left")
    is_duplicate = ~pl.col("_refused") & (pl.col("_row") != pl.col("_keeper"))
    verdicts = members.select(
        "_row",
        pl.when(pl.col("_refused")).then(pl.lit("conflict")).when(is_duplicate).then(pl.lit("duplicate"))
        .otherwise(None).alias("_status"),
        pl.when(pl.col("_refused")).then(
            pl.lit("the same image is filed under ") + pl.col("_names")
            + pl.when(pl.col("_majority").is_not_null()).then(pl.lit("; majority label is ") + pl.col("_majority"))
            .otherwise(pl.lit("; no member kept")))
        .when(is_duplicate).then(
            pl.lit("duplicate of ") + pl.col("_keeper_path")
            + pl.when(pl.col("_proof").is_not_null()).then(pl.lit(" (") + pl.col("_proof") + pl.lit(")"))
            .otherwise(pl.lit(" (same cluster)")))
        .otherwise(None).alias("_reason"),
        pl.when(is_duplicate).then(pl.col("_keeper_path")).otherwise(None).alias("duplicate_of"),
    )
    out = frame.with_row_index("_row").join(verdicts, on="_row", how="left").sort("_row")
    changed = pl.col("_status").is_not_null()
    return out.with_columns(
        pl.when(changed).then(pl.col("_status")).otherwise(pl.col("status")).alias("status"),
        pl.when(changed).then(pl.col("_reason")).otherwise(pl.col("reason")).alias("reason"),
        pl.when(changed).then(pl.lit(False)).otherwise(pl.col("keep")).alias("keep"),
    ).drop("_row", "_status", "_reason").select(*frame.columns, "duplicate_of")


