"""`curator split`: stratified, grouped, balanced splits with a certificate that no near-duplicate crosses them.

Rows are assigned in units: the union of a duplicate cluster and a group (artist), so that neither spans two splits.
Units are placed greedily (`assign_parts`): units of several rows first, largest first, each where its classes are
least filled against their targets; then the one-row units, vectorised per class; then a repair pass gives a class
missing from a split its smallest unit from the split that has most of it. Folds are the same placement with equal
ratios. This is a greedy placement of its own, not scikit-learn's StratifiedGroupKFold.

The leak certificate (`leak_candidates`, `certify`) looks for pairs across splits above the duplicate thresholds
`curator clean` ran with (read from the workspace's settings.json): cosine at least 1 - `embed_relative` x the
collection's median nearest-neighbour gap, or pHashes within `phash_radius` bits. Which pairs are above the thresholds
does not depend on the split, so they are found once: exactly (faiss's flat index) up to the exact limit of
`curator.core.neighbours`, and above it through the compressed neighbour graph, every candidate re-scored exactly and
every row whose graph neighbours are all above the threshold searched again exactly; pHash pairs by the exact
multi-index search. Leaking pairs join one unit and the placement is redone, for at most `MAX_ROUNDS` rounds. If
pairs still cross after them, nothing is written: `LeakError` (exit 1) says how many, unless the caller allows leaks
(`SplitSettings.allow_leaks`, `curator split --allow-leaks`), which writes the split with a warning.

Settings are checked where they enter (`SplitSettings`: one-line `UsageError`s), and the embedding cache is verified
before the certificate uses it: metadata that disagrees with the manifest, or kept rows whose cached vector is missing
or was dropped as non-finite, stop the split with a sentence saying to run `curator clean` again.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import polars as pl

from curator.core import manifest
from curator.core.errors import AtelierError, ManifestError, SettingsError, UsageError
from curator.core.hashing import from_hex, to_bytes
from curator.core.neighbours import (
    CHUNK,
    EXACT_LIMIT,
    Graph,
    Neighbourhood,
    UnitRows,
    gather,
    knn,
    normalise,
    pair_keys,
)
from curator.embedding.embed import embedding_matrix, open_cache
from curator.stages.duplicates import (
    DuplicateSettings,
    connected_clusters,
    radius_pairs,
    similarity,
    thresholds,
)

SPLITS = ("train", "val", "test")
SPLITS_NAME = "splits.parquet"
REPORT_NAME = "split_report.json"
#: Where `curator clean` records the settings it ran with, the duplicate thresholds among them.
SETTINGS_NAME = "settings.json"
#: Placements tried: after each, the leaking pairs join one unit and the placement is redone.
MAX_ROUNDS = 6
#: Neighbours per row the certificate reads from the graph above the exact limit; a row whose neighbours are all above
#: the threshold may have more, and is searched again exactly.
LEAK_K = 16
#: Candidates within this much below the threshold are re-scored too, so that the float16 rows' rounding in the graph's
#: cosines cannot hide a pair.
RESCORE_MARGIN = 0.01
#: The DuplicateSettings fields the certificate needs from settings.json.
CERTIFICATE_FIELDS = ("phash_radius", "embed_relative", "embed_neighbours")


class LeakError(AtelierError):
    """Near-duplicate pairs still cross the splits after `MAX_ROUNDS` placements; nothing was written (exit 1)."""


@dataclass(frozen=True)
class SplitSettings:
    """What decides a split; written into split_report.json."""

    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    balance: str = "none"
    balance_all: bool = False
    group_pattern: str | None = None
    folds: int | None = None
    seed: int = 0
    use_groups: bool = True  # False: only duplicate clusters are kept together (e.g. one artist vs the rest)
    respect_groups: bool = True  # False only to show what the certificate catches
    allow_leaks: bool = False  # True: write the split even if pairs still cross it after the rounds (with a warning)

    def __post_init__(self) -> None:
        """Refuse settings that could only give a wrong split, in one sentence each (the CLI prints it, exit 2)."""
        ratios = tuple(self.ratios) if isinstance(self.ratios, (tuple, list)) else (self.ratios,)
        if (len(ratios) != 3 or not all(_is_number(r) and math.isfinite(r) and r > 0 for r in ratios)
                or abs(sum(ratios) - 1) > 1e-6):
            raise SettingsError(f"--ratios must be three positive numbers summing to 1 (like 0.8,0.1,0.1); got "
                                f"{','.join(str(r) for r in ratios)}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))
        if not isinstance(self.balance, str) or not re.fullmatch(r"none|undersample|oversample|cap:[0-9]+",
                                                                  self.balance):
            raise SettingsError(f"--balance must be none, undersample, oversample or cap:N with N a whole number of at "
                                f"least 1; got {self.balance!r}")
        if self.balance.startswith("cap:") and int(self.balance[4:]) < 1:
            raise SettingsError(f"--balance cap:N needs N of at least 1 image per class; got {self.balance!r}")
        if self.group_pattern is not None:
            compile_group_pattern(self.group_pattern)
        if self.folds is not None and (not _is_whole(self.folds) or self.folds < 2):
            raise SettingsError(f"--folds must be a whole number of at least 2; got {self.folds!r}")
        if not _is_whole(self.seed):
            raise SettingsError(f"--seed must be a whole number; got {self.seed!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def compile_group_pattern(pattern: str) -> re.Pattern:
    """The --group-pattern regex, or a `UsageError` saying why it is not one."""
    if not isinstance(pattern, str) or not pattern:
        raise UsageError(f"--group-pattern must be a non-empty regular expression; got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--group-pattern {pattern!r} is not a valid regular expression: {exc}") from None


@dataclass
class SplitResult:
    """The split rows, where they were written, the report, and warnings for the user (also in the report)."""

    frame: pl.DataFrame
    path: Path
    report: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def units_of(clusters: list[str | None], groups: list[str | None],
             extra_pairs: np.ndarray | list[tuple[int, int]] = ()) -> np.ndarray:
    """One unit id per row: rows sharing a duplicate cluster, a group or an extra pair (rows i, j) share a unit."""
    n = len(clusters)
    links = [_shared_key_links(clusters), _shared_key_links(groups),
             np.asarray(extra_pairs, dtype=np.int64).reshape(-1, 2)]
    i, j = np.concatenate(links).T
    linked = connected_clusters(n, i, j)
    return np.where(linked >= 0, linked, np.arange(n))


def _shared_key_links(keys: list) -> np.ndarray:
    """(pairs, 2) rows: each row with a non-null key linked to the first row with the same key (vectorised)."""
    frame = pl.DataFrame({"key": pl.Series(keys, dtype=pl.String)}).with_row_index("row").drop_nulls("key")
    first = frame.group_by("key").agg(pl.col("row").min().alias("first"))
    links = frame.join(first, on="key").filter(pl.col("row") != pl.col("first"))
    return np.stack([links["first"].to_numpy().astype(np.int64), links["row"].to_numpy().astype(np.int64)], axis=1)


def assign_parts(labels: np.ndarray, units: np.ndarray, ratios: list[float], seed: int) -> np.ndarray:
    """A part index per row, stratified by label, no unit in two parts.

    Greedy, largest units first: each unit goes where its classes are least filled relative to their targets.
    Then a repair pass: a class missing from a part gets that class's smallest unit from the part that has most of it.
    """
    classes, y = np.unique(labels, return_inverse=True)
    n_classes = len(classes)
    target = np.outer(np.asarray(ratios), np.bincount(y, minlength=n_classes))  # (parts, classes)
    have = np.zeros_like(target)
    unit_ids, unit_of_row = np.unique(units, return_inverse=True)
    content = np.zeros((len(unit_ids), n_classes))
    np.add.at(content, (unit_of_row, y), 1)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(unit_ids)), -content.sum(axis=1)))
    part_of_unit = np.zeros(len(unit_ids), dtype=np.int64)
    sizes = content.sum(axis=1)
    for u in order[sizes[order] > 1]:
        weights = content[u] / content[u].sum()
        fill = ((have + content[u]) / np.maximum(target, 1e-9)) @ weights
        best = int(np.argmin(fill))
        part_of_unit[u] = best
        have[best] += content[u]
    _place_singletons(order[sizes[order] == 1], content, have, target, part_of_unit)
    for _ in range(len(unit_ids)):
        holes = np.argwhere((have == 0) & (target > 0))
        if len(holes) == 0:
            break
        part, c = holes[0]
        donors = [u for u in np.flatnonzero(content[:, c] > 0)
                  if have[part_of_unit[u], c] - content[u, c] > 0]
        if not donors:
            break
        u = min(donors, key=lambda d: (content[d].sum(), d))
        have[part_of_unit[u]] -= content[u]
        part_of_unit[u] = part
        have[part] += content[u]
    return part_of_unit[unit_of_row]


def _place_singletons(singles: np.ndarray, content: np.ndarray, have: np.ndarray, target: np.ndarray,
                      part_of_unit: np.ndarray) -> None:
    """The greedy placement of one-row units, vectorised per class (the same result as placing them one by one, in
    `singles` order): each goes to the part whose next slot, (have + 1) / target, is lowest, so the k-th row of a
    class takes the k-th smallest of all parts' slot values (ties to the lower part, as argmin does)."""
    if len(singles) == 0:
        return
    n_parts = have.shape[0]
    single_class = content[singles].argmax(axis=1)
    for c in np.unique(single_class):
        members = singles[single_class == c]
        steps = np.arange(1, len(members) + 1)
        values = (have[:, c][:, None] + steps[None, :]) / np.maximum(target[:, c], 1e-9)[:, None]
        parts = np.repeat(np.arange(n_parts), len(members))
        chosen = parts[np.lexsort((parts, values.ravel()))[:len(members)]]
        part_of_unit[members] = chosen
        have[:, c] += np.bincount(chosen, minlength=n_parts)


def assign_splits(labels: np.ndarray, units: np.ndarray, ratios: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """train/val/test per row in about the given ratios, stratified, no unit in two splits."""
    return np.array(SPLITS)[assign_parts(labels, units, list(ratios), seed)]


def assign_folds(labels: np.ndarray, units: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold per row (0..k-1), stratified by label, no unit in two folds."""
    return assign_parts(labels, units, [1.0 / k] * k, seed)


def balance_weights(labels: np.ndarray, split: np.ndarray, mode: str, balance_all: bool,
                    seed: int) -> np.ndarray:
    """Sampling weight per row: oversampling repeats a class (weight > 1), undersampling or a cap leaves rows out
    (weight 0). Only train rows unless `balance_all`."""
    weight = np.ones(len(labels))
    if mode == "none":
        return weight
    rng = np.random.default_rng(seed)
    for name in (SPLITS if balance_all else ("train",)):
        rows = np.flatnonzero(split == name)
        classes, counts = np.unique(labels[rows], return_counts=True)
        if mode == "oversample":
            for c, count in zip(classes, counts):
                weight[rows[labels[rows] == c]] = counts.max() / count
            continue
        limit = counts.min() if mode == "undersample" else int(mode.split(":")[1])
        for c in classes:
            members = rows[labels[rows] == c]
            if len(members) > limit:
                weight[rng.permutation(members)[limit:]] = 0.0
    return weight


@dataclass(frozen=True)
class LeakCandidates:
    """Every pair the certificate could call a leak, whatever the split: pairs (i < j, rows) with cosine at least
    `threshold` and their cosines, and pHash pairs within `radius` bits and their distances. Found once
    (`leak_candidates`); each placement is then checked by `certify` without another search.

    `unit` keeps the float32 unit rows when the search was exact, for the largest cross-split cosine below the
    threshold (a flat search per split); above the exact limit `graph` (each row's nearest rows) gives it instead,
    among those neighbours."""

    threshold: float
    radius: int
    phash: np.ndarray
    cos_pairs: np.ndarray
    cosines: np.ndarray
    hash_pairs: np.ndarray
    distances: np.ndarray
    exact: bool
    method: str
    unit: np.ndarray | None = None
    graph: Graph | None = None


def leak_candidates(vectors: np.ndarray | Neighbourhood | None, phash: np.ndarray, cosine_threshold: float,
                    phash_radius: int, *, exact_limit: int = EXACT_LIMIT, k: int = LEAK_K,
                    seed: int = 0) -> LeakCandidates:
    """All pairs above the duplicate thresholds (see `LeakCandidates`).

    `vectors`: the rows' embeddings (any float rows, normalised here), a `Neighbourhood` over them (its graph is
    used above `exact_limit` when it has at least `k` neighbours a row), or None (pHashes only). Up to `exact_limit`
    rows every pair is compared (faiss range search); above it the compressed graph's candidates are re-scored
    exactly, and rows whose `k` neighbours are all above the threshold are searched exactly against every row."""
    phash = np.asarray(phash, dtype=np.uint64)
    q, b, d = radius_pairs(phash, phash, phash_radius)
    keep = q < b
    hash_pairs = np.stack([q[keep], b[keep]], axis=1).astype(np.int64)
    distances = d[keep].astype(np.int64)
    common = {"threshold": float(cosine_threshold), "radius": int(phash_radius), "phash": phash,
              "hash_pairs": hash_pairs, "distances": distances}
    n = len(phash)
    if vectors is None:
        return LeakCandidates(cos_pairs=np.zeros((0, 2), np.int64), cosines=np.zeros(0, np.float32), exact=True,
                              method="pHash only (no embeddings)", **common)
    if n <= exact_limit:
        unit = vectors.unit() if isinstance(vectors, Neighbourhood) else normalise(vectors)
        unit = np.ascontiguousarray(unit, dtype=np.float32)
        pairs, cosines = _exact_pairs_above(unit, cosine_threshold)
        return LeakCandidates(cos_pairs=pairs, cosines=cosines, exact=True, method="exact (flat)", unit=unit,
                              **common)
    rows, graph = _rows_and_graph(vectors, k, exact_limit, seed)
    pairs, cosines = _graph_pairs_above(rows, graph, cosine_threshold)
    return LeakCandidates(cos_pairs=pairs, cosines=cosines, exact=False,
                          method=f"neighbour graph, {graph.k} a row, re-scored exactly: {graph.method}", graph=graph,
                          **common)


def _exact_pairs_above(unit: np.ndarray, threshold: float, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of unit rows with cosine >= threshold, and the cosines (faiss range search, in chunks)."""
    import faiss

    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    found_i, found_j, found_c = [], [], []
    for start in range(0, len(unit), chunk):
        lims, sims, ids = index.range_search(unit[start:start + chunk], float(threshold))
        rows = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = rows < ids
        found_i.append(rows[keep])
        found_j.append(ids[keep].astype(np.int64))
        found_c.append(sims[keep].astype(np.float32))
    return _sorted_pairs(np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_c))


def _rows_and_graph(vectors: np.ndarray | Neighbourhood, k: int, exact_limit: int,
                    seed: int) -> tuple[Callable[[np.ndarray | slice], np.ndarray], Graph]:
    """Above the exact limit: a reader of float32 unit rows by position, and the compressed graph with k neighbours
    a row (the neighbourhood's own when it is wide enough, else a search of the same float16 unit rows)."""
    if isinstance(vectors, Neighbourhood):
        space = vectors
        graph = space.graph.first(k) if space.graph.k >= min(k, len(space) - 1) else None
        if graph is None:
            held = space.store if space.store is not None and space.rows is None else _unit_rows(space.take, len(space),
                                                                                                 space.dim)
            graph = knn(held, k, exact_limit=exact_limit, seed=seed)
        return (lambda index: normalise(space.take(index))), graph
    store = _unit_rows(lambda index: vectors[index], len(vectors), vectors.shape[1])
    graph = knn(store, k, exact_limit=exact_limit, seed=seed)
    return (lambda index: normalise(store.rows[index])), graph


def _unit_rows(take: Callable[[slice], np.ndarray], n: int, dim: int) -> UnitRows:
    """The rows `take(slice)` gives, as float16 unit rows (a chunk at a time, no float32 copy of all of them)."""
    store = UnitRows(n, dim)
    for start in range(0, n, CHUNK):
        store.put(start, take(slice(start, min(n, start + CHUNK))))
    return store


def _graph_pairs_above(rows: Callable[[np.ndarray | slice], np.ndarray], graph: Graph,
                       threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs above the threshold from the graph's candidates, re-scored exactly; a row whose every neighbour is
    (nearly) above the threshold, or that has none, may have more of them than the graph holds, and is compared
    with every row."""
    n = len(graph.ids)
    near = graph.ids >= 0
    candidate = near & (graph.sims >= threshold - RESCORE_MARGIN)
    i = np.broadcast_to(np.arange(n)[:, None], graph.ids.shape)[candidate]
    j = graph.ids[candidate]
    full = (candidate | ~near).all(axis=1)
    extra_i, extra_j = _rows_against_all(rows, np.flatnonzero(full), n, threshold)
    keys = np.unique(pair_keys(np.concatenate([i, extra_i]), np.concatenate([j, extra_j]), n))
    i, j = keys // n, keys % n
    cosines = _pair_cosines(rows, i, j)
    keep = cosines >= threshold
    return _sorted_pairs(i[keep], j[keep], cosines[keep])


def _rows_against_all(rows: Callable[[np.ndarray | slice], np.ndarray], queries: np.ndarray, n: int,
                      threshold: float, chunk: int = CHUNK, query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (query row, other row) with cosine >= threshold - RESCORE_MARGIN: the queries against every row, a
    block of queries by a chunk of rows at a time (len(queries) x N x D multiply-adds; 32 MB of cosines at once)."""
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if len(queries) == 0:
        return found_i[0], found_j[0]
    for q_start in range(0, len(queries), query_chunk):
        part = queries[q_start:q_start + query_chunk]
        q = rows(part)
        for start in range(0, n, chunk):
            block = rows(slice(start, min(n, start + chunk)))
            a, b = np.nonzero(q @ block.T >= threshold - RESCORE_MARGIN)
            other = start + b
            keep = other != part[a]
            found_i.append(part[a][keep])
            found_j.append(other[keep])
    return np.concatenate(found_i), np.concatenate(found_j)


def _pair_cosines(rows: Callable[[np.ndarray | slice], np.ndarray], i: np.ndarray, j: np.ndarray,
                  chunk: int = 65536) -> np.ndarray:
    """Exact cosines of the unit rows of the pairs (i, j), a chunk of pairs at a time."""
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), chunk):
        stop = start + chunk
        out[start:stop] = (rows(i[start:stop]) * rows(j[start:stop])).sum(axis=1)
    return out


def _sorted_pairs(i: np.ndarray, j: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pairs, 2) int64 with i < j, ordered by (i, j), and their values in the same order."""
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    order = np.lexsort((hi, lo))
    return np.stack([lo[order], hi[order]], axis=1).reshape(-1, 2), np.asarray(values)[order]


def certify(candidates: LeakCandidates, split: np.ndarray) -> tuple[dict, np.ndarray]:
    """The certificate of one placement: the largest cross-split cosine, the smallest cross-split pHash distance, and
    every candidate pair whose rows are in different splits ((pairs, 2) array, i < j, sorted), vectorised."""
    split = np.asarray(split)
    c = candidates
    cos_cross = split[c.cos_pairs[:, 0]] != split[c.cos_pairs[:, 1]]
    hash_cross = split[c.hash_pairs[:, 0]] != split[c.hash_pairs[:, 1]]
    n = len(split)
    keys = np.unique(np.concatenate([pair_keys(*c.cos_pairs[cos_cross].T, n), pair_keys(*c.hash_pairs[hash_cross].T, n)]))
    leaks = np.stack([keys // n, keys % n], axis=1).reshape(-1, 2)
    if cos_cross.any():  # every pair above the threshold is a candidate, so the largest is among them
        max_cos = float(c.cosines[cos_cross].max())
    elif c.unit is not None:
        max_cos = _nearest_cross_cosine(c.unit, split)
    elif c.graph is not None:
        rows = np.broadcast_to(np.arange(n)[:, None], c.graph.ids.shape)
        other = (c.graph.ids >= 0) & (split[rows] != split[np.maximum(c.graph.ids, 0)])
        max_cos = float(np.where(other, c.graph.sims, -1.0).max(initial=-1.0))
    else:
        max_cos = -1.0
    phash_exact = True
    if hash_cross.any():  # likewise every pair within the radius is a candidate
        min_phash = int(c.distances[hash_cross].min())
    elif c.exact:
        min_phash = _nearest_cross_phash(c.phash, split)
    else:  # the flat pHash search is quadratic: above the exact limit only "more than the radius" is known
        min_phash, phash_exact = c.radius + 1, False
    report = {"max_cross_split_cosine": round(max_cos, 4), "cosine_threshold": round(c.threshold, 4),
              "pairs_above_cosine_or_phash": len(leaks), "min_cross_split_phash_distance": min_phash,
              "min_cross_split_phash_distance_exact": phash_exact, "phash_radius": c.radius, "search": c.method}
    return report, leaks


def _nearest_cross_cosine(unit: np.ndarray, split: np.ndarray) -> float:
    """The largest cosine between rows of different splits (faiss flat search of each split against the rest)."""
    import faiss

    best = -1.0
    for name in np.unique(split):
        inside, outside = np.flatnonzero(split == name), np.flatnonzero(split != name)
        if len(inside) and len(outside):
            index = faiss.IndexFlatIP(unit.shape[1])
            index.add(unit[outside])
            sims, _ = index.search(unit[inside], 1)
            best = max(best, float(sims.max()))
    return best


def _nearest_cross_phash(phash: np.ndarray, split: np.ndarray) -> int:
    """The smallest pHash distance between rows of different splits (faiss binary flat search), 64 if none."""
    import faiss

    best = 64
    for name in np.unique(split):
        inside, outside = np.flatnonzero(split == name), np.flatnonzero(split != name)
        if len(inside) and len(outside):
            index = faiss.IndexBinaryFlat(64)
            index.add(to_bytes(phash[outside]))
            nearest, _ = index.search(to_bytes(phash[inside]), 1)
            best = min(best, int(nearest.min()))
    return best


def cross_split_pairs(vectors: np.ndarray | Neighbourhood | None, phash: np.ndarray, split: np.ndarray,
                      cosine_threshold: float, phash_radius: int, *, exact_limit: int = EXACT_LIMIT,
                      k: int = LEAK_K) -> tuple[dict, list[tuple[int, int]]]:
    """The certificate of one split: `leak_candidates` then `certify` (see them); the leaking pairs as (i, j)
    tuples, i < j, sorted."""
    report, leaks = certify(leak_candidates(vectors, phash, cosine_threshold, phash_radius, exact_limit=exact_limit,
                                            k=k), split)
    return report, [tuple(pair) for pair in leaks.tolist()]


def recorded_duplicates(workspace: Path) -> DuplicateSettings:
    """The duplicate thresholds `curator clean` ran with, from the workspace's settings.json; a missing or damaged
    record is a `ManifestError` saying to run `curator clean` again (the certificate never falls back on defaults)."""
    path = Path(workspace) / SETTINGS_NAME
    again = "run `curator clean` again to record them"
    if not path.is_file():
        raise ManifestError(f"{path} is missing, so the duplicate thresholds `curator clean` ran with are unknown; "
                            f"{again}")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["duplicates"]
        defaults = DuplicateSettings()
        known = {f.name for f in fields(DuplicateSettings)}
        values = {name: value for name, value in recorded.items() if name in known}
        for name in CERTIFICATE_FIELDS:
            value, default = values[name], getattr(defaults, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    isinstance(default, int) and not isinstance(value, int)):
                raise TypeError(name)
        settings = DuplicateSettings(**values)
        if settings.embed_neighbours < 1:
            raise ValueError("embed_neighbours")
        return settings
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ManifestError(f"{path} does not hold readable duplicate thresholds ({', '.join(CERTIFICATE_FIELDS)}); "
                            f"{again}") from None


def make_splits(workspace: Path, settings: SplitSettings | None = None,
                duplicates: DuplicateSettings | None = None) -> SplitResult:
    """Split the kept rows of the workspace's manifest and write splits.parquet and split_report.json.

    The leak certificate uses the duplicate thresholds `curator clean` recorded in the workspace's settings.json
    (`recorded_duplicates`), or `duplicates` when given. If pairs still cross the splits after `MAX_ROUNDS`
    placements, `LeakError` is raised and nothing is written, unless `settings.allow_leaks` (or `respect_groups` is
    off, whose single placement is meant to show the leaks): then the split is written and a warning says how many.
    """
    settings = settings or SplitSettings()
    workspace = Path(workspace)
    df = manifest.read(workspace / manifest.MANIFEST_NAME)
    meta = manifest.read_metadata(workspace / manifest.MANIFEST_NAME)
    thresholds_from = "given" if duplicates is not None else SETTINGS_NAME
    duplicates = duplicates or recorded_duplicates(workspace)
    kept = df.filter(pl.col("keep") & pl.col("label").is_not_null()).sort("path")
    if kept.is_empty():
        raise UsageError(f"{workspace} has no kept, labelled images to split; run `curator clean` on a class-folder "
                         f"tree")
    labels = np.array(kept["label"].to_list(), dtype=object)
    warnings: list[str] = []
    if settings.group_pattern:
        pattern = compile_group_pattern(settings.group_pattern)
        groups = [(m.group(1) if pattern.groups else m.group(0)) if (m := pattern.search(p.rsplit("/", 1)[-1]))
                  else None for p in kept["path"].to_list()]
        if unmatched := sum(g is None for g in groups):
            warnings.append(f"--group-pattern {pattern.pattern!r} matched no group in {unmatched} of {len(groups)} "
                            f"file names; those rows are kept together only with their duplicates")
    else:
        groups = kept["group"].to_list()
    if not settings.use_groups:
        groups = [None] * len(kept)
    space, phash = _kept_space(workspace, meta, kept, warnings, duplicates.embed_neighbours, settings.seed)
    sim = similarity(space, duplicates.embed_neighbours)
    threshold = thresholds(sim, duplicates)["embedding_min_cosine"]
    candidates = leak_candidates(space, phash, threshold, duplicates.phash_radius, seed=settings.seed)
    space = sim = None  # the rows and the graph are not needed any more

    clusters = kept["cluster"].to_list() if "cluster" in kept.columns else [None] * len(kept)
    if not settings.respect_groups:
        clusters, groups = [None] * len(kept), [None] * len(kept)
    extra = np.zeros((0, 2), dtype=np.int64)
    rounds = []
    for _ in range(MAX_ROUNDS):
        units = units_of(clusters, groups, extra)
        _check_classes(labels, units, settings)
        if settings.folds:
            assignment = assign_folds(labels, units, settings.folds, settings.seed)
        else:
            assignment = assign_splits(labels, units, settings.ratios, settings.seed)
        _check_every_class_everywhere(labels, units, assignment)
        certificate, leaks = certify(candidates, np.asarray(assignment))
        rounds.append({**certificate, "thresholds_from": thresholds_from})
        if len(leaks) == 0 or not settings.respect_groups:
            break
        extra = np.concatenate([extra, leaks])
    if len(leaks):
        where = "folds" if settings.folds else "splits"
        if settings.respect_groups and not settings.allow_leaks:
            raise LeakError(
                f"{len(leaks)} near-duplicate pairs still cross the {where} after {len(rounds)} rounds (e.g. "
                f"{kept['path'][int(leaks[0][0])]} and {kept['path'][int(leaks[0][1])]}); nothing written: try "
                f"another --seed, remove one image of each such pair, or pass --allow-leaks to write the {where} "
                f"anyway (split_report.json then lists the pairs)")
        warnings.append(f"{len(leaks)} near-duplicate pairs cross the {where} (written anyway: "
                        f"{'--allow-leaks' if settings.respect_groups else 'groups and clusters not respected'}); "
                        f"split_report.json lists them")
    if settings.folds:
        out = kept.with_columns(pl.Series("fold", assignment, dtype=pl.Int32))
        split_names = [str(f) for f in range(settings.folds)]
        column = "fold"
    else:
        weight = balance_weights(labels, assignment, settings.balance, settings.balance_all, settings.seed)
        out = kept.with_columns(pl.Series("split", assignment, dtype=pl.String),
                                pl.Series("weight", weight, dtype=pl.Float32))
        split_names = list(SPLITS)
        column = "split"
    counts = {s: dict(out.filter(pl.col(column).cast(pl.String) == s).group_by("label").len().sort("label").rows())
              for s in split_names}
    paths = kept["path"]
    report = {
        "settings": {**asdict(settings), "ratios": list(settings.ratios)},
        "rows": len(out),
        "groups": len({g for g in groups if g is not None}),
        "units": len(np.unique(units)),
        "proportions": {s: round(sum(c.values()) / len(out), 4) for s, c in counts.items()},
        "counts": counts,
        "duplicate_thresholds": {name: getattr(duplicates, name) for name in CERTIFICATE_FIELDS},
        "certificate": rounds[-1],
        "certificate_rounds": rounds,
        "leaks": [[paths[int(i)], paths[int(j)]] for i, j in leaks[:1000]],
        "warnings": warnings,
    }
    path = manifest.write_atomic(out, workspace / SPLITS_NAME, {"split_report": report})
    manifest.write_json_atomic(report, workspace / REPORT_NAME)
    return SplitResult(out, path, report, warnings)


def _kept_space(workspace: Path, meta: dict, kept: pl.DataFrame, warnings: list[str], nearest: int,
                seed: int) -> tuple[Neighbourhood, np.ndarray]:
    """The kept rows' embeddings with their neighbour graph (`nearest` a row up to the exact limit, `LEAK_K` or more
    above it, where the certificate reads it), and their pHashes, from a verified cache: its metadata must agree with
    the manifest's record of the backbone (`open_cache`), and every kept row needs a finite cached vector, so the
    certificate is never computed from a damaged, dropped or misread one. Rows are read a chunk at a time (float16
    unit rows above the exact limit, never a float32 copy of all). The cache's own warnings join `warnings`."""
    source = workspace / manifest.MANIFEST_NAME
    layout = meta.get("feature_layout")
    cache = open_cache(workspace, meta.get("backbone_key"), layout if isinstance(layout, dict) and layout else None)
    warnings.extend(cache.warnings)
    shas, hashes = kept["sha256"].to_list(), kept["phash"].to_list()
    if any(v is None for v in shas) or any(v is None for v in hashes):
        raise ManifestError(f"{source} has kept rows without sha256 or phash; run `curator clean` again")
    try:
        missing = cache.missing(shas)
        phash = from_hex(hashes)
    except (ValueError, OverflowError, TypeError):
        raise ManifestError(f"{source} has kept rows whose sha256 or phash is not hexadecimal; run `curator clean` "
                            f"again") from None
    if missing:
        raise UsageError(f"{len(missing)} of the {len(shas)} kept images have no usable cached embedding (never "
                         f"computed, or dropped as damaged, e.g. sha256 {missing[0][:12]}); run `curator clean` "
                         f"again to compute them")
    read = cache.reader(shas)
    layout = cache.layout
    n = len(shas)
    held = gather(lambda start, stop: embedding_matrix(read(start, stop), layout), n,
                  embedding_matrix(read(0, 1), layout).shape[1])
    if not isinstance(held, UnitRows):
        return Neighbourhood(held, knn(held, nearest)), phash
    graph = knn(held, max(nearest, LEAK_K), seed=seed)
    return Neighbourhood(held.rows, graph, None, held), phash


def _check_classes(labels: np.ndarray, units: np.ndarray, settings: SplitSettings) -> None:
    """Refuse, naming them, classes with fewer units than splits (or folds): they cannot reach every one."""
    needed = settings.folds or 3
    small = []
    for c in sorted(set(labels)):
        n_units = len(np.unique(units[labels == c]))
        if n_units < needed:
            small.append(f"{c} ({int((labels == c).sum())} images in {n_units} groups)")
    if small:
        raise UsageError(f"every class needs at least {needed} separate groups to appear in every "
                         f"{'fold' if settings.folds else 'split'}; too small: {', '.join(small)}")


def _check_every_class_everywhere(labels: np.ndarray, units: np.ndarray, assignment: np.ndarray) -> None:
    """Refuse a placement that left a class out of a split (or fold), naming each such class and split."""
    missing = []
    for part in np.unique(assignment):
        for c in sorted(set(labels) - set(labels[assignment == part])):
            missing.append(f"{c} has no images in {part} ({len(np.unique(units[labels == c]))} groups in all)")
    if missing:
        raise UsageError(f"not every class reaches every split: {'; '.join(missing)}; add images or artists to those "
                         f"classes, or change --ratios")
