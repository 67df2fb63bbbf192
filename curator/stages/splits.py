"""`curator split`: stratified, grouped, balanced splits with a certificate that no near-duplicate crosses them.

Rows are assigned in units: the union of a duplicate cluster and a group (artist), so that neither spans two splits.
Units go to folds with scikit-learn's StratifiedGroupKFold; folds go to splits in the ratios asked for. Afterwards
the leak certificate searches every split's embeddings and pHashes against the other splits; pairs above the
duplicate thresholds join one unit and the assignment is redone, until none is left.

Settings are checked where they enter (`SplitSettings`: one-line `UsageError`s), and the embedding cache is verified
before the certificate uses it: metadata that disagrees with the manifest, or kept rows whose cached vector is missing
or was dropped as non-finite, stop the split with a sentence saying to run `curator clean` again.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from curator.core import manifest
from curator.core.errors import ManifestError, UsageError
from curator.core.hashing import from_hex, to_bytes
from curator.embedding.embed import embedding_matrix, open_cache
from curator.stages.duplicates import DuplicateSettings, connected_clusters, radius_pairs, shared_key_pairs, similarity

SPLITS = ("train", "val", "test")
SPLITS_NAME = "splits.parquet"
REPORT_NAME = "split_report.json"


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

    def __post_init__(self) -> None:
        """Refuse settings that could only give a wrong split, in one sentence each (the CLI prints it, exit 2)."""
        ratios = tuple(self.ratios) if isinstance(self.ratios, (tuple, list)) else (self.ratios,)
        if (len(ratios) != 3 or not all(_is_number(r) and math.isfinite(r) and r > 0 for r in ratios)
                or abs(sum(ratios) - 1) > 1e-6):
            raise UsageError(f"--ratios must be three positive numbers summing to 1 (like 0.8,0.1,0.1); got "
                             f"{','.join(str(r) for r in ratios)}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))
        if not isinstance(self.balance, str) or not re.fullmatch(r"none|undersample|oversample|cap:[0-9]+",
                                                                  self.balance):
            raise UsageError(f"--balance must be none, undersample, oversample or cap:N with N a whole number of at "
                             f"least 1; got {self.balance!r}")
        if self.balance.startswith("cap:") and int(self.balance[4:]) < 1:
            raise UsageError(f"--balance cap:N needs N of at least 1 image per class; got {self.balance!r}")
        if self.group_pattern is not None:
            compile_group_pattern(self.group_pattern)
        if self.folds is not None and (not _is_whole(self.folds) or self.folds < 2):
            raise UsageError(f"--folds must be a whole number of at least 2; got {self.folds!r}")
        if not _is_whole(self.seed):
            raise UsageError(f"--seed must be a whole number; got {self.seed!r}")


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


def units_of(clusters: list[str | None], groups: list[str | None], extra_pairs: list[tuple[int, int]] = ()
             ) -> np.ndarray:
    """One unit id per row: rows sharing a duplicate cluster, a group or an extra pair share a unit."""
    n = len(clusters)
    i, j = [], []
    for keys in (clusters, groups):
        ki, kj = shared_key_pairs(keys)
        i += ki
        j += kj
    for a, b in extra_pairs:
        i.append(a)
        j.append(b)
    linked = connected_clusters(n, np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
    return np.where(linked >= 0, linked, np.arange(n))


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


def cross_split_pairs(unit_emb: np.ndarray | None, phash: np.ndarray, split: np.ndarray, cosine_threshold: float,
                      phash_radius: int) -> tuple[dict, list[tuple[int, int]]]:
    """The certificate: largest cross-split cosine and pHash closeness, and every pair above the thresholds."""
    import faiss

    pairs: set[tuple[int, int]] = set()
    max_cos, min_phash = -1.0, 64
    for name in np.unique(split):
        inside, outside = np.flatnonzero(split == name), np.flatnonzero(split != name)
        if len(inside) == 0 or len(outside) == 0:
            continue
        if unit_emb is not None:
            index = faiss.IndexFlatIP(unit_emb.shape[1])
            index.add(unit_emb[outside])
            sims, _ = index.search(unit_emb[inside], 1)
            max_cos = max(max_cos, float(sims.max()))
            lims, _, found = index.range_search(unit_emb[inside], cosine_threshold)
            q = np.repeat(inside, np.diff(lims).astype(np.int64))
            pairs |= {(min(a, b), max(a, b)) for a, b in zip(q.tolist(), outside[found].tolist())}
        binary = faiss.IndexBinaryFlat(64)
        binary.add(to_bytes(phash[outside]))
        nearest, _ = binary.search(to_bytes(phash[inside]), 1)
        min_phash = min(min_phash, int(nearest.min()))
        q, b, _ = radius_pairs(phash[inside], phash[outside], phash_radius)
        pairs |= {(min(a, c), max(a, c)) for a, c in zip(inside[q].tolist(), outside[b].tolist())}
    report = {"max_cross_split_cosine": round(max_cos, 4), "cosine_threshold": round(cosine_threshold, 4),
              "pairs_above_cosine_or_phash": len(pairs), "min_cross_split_phash_distance": min_phash,
              "phash_radius": phash_radius}
    return report, sorted(pairs)


def make_splits(workspace: Path, settings: SplitSettings | None = None,
                duplicates: DuplicateSettings | None = None) -> SplitResult:
    """Split the kept rows of the workspace's manifest and write splits.parquet and split_report.json.

    The leak certificate uses the duplicate thresholds of `duplicates` (the defaults of `curator clean`).
    """
    settings = settings or SplitSettings()
    duplicates = duplicates or DuplicateSettings()
    workspace = Path(workspace)
    df = manifest.read(workspace / manifest.MANIFEST_NAME)
    meta = manifest.read_metadata(workspace / manifest.MANIFEST_NAME)
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
    unit_emb, phash = _kept_vectors(workspace, meta, kept, warnings)
    sim = similarity(unit_emb, duplicates.embed_neighbours)
    threshold = 1.0 - duplicates.embed_relative * sim.gap

    clusters = kept["cluster"].to_list() if "cluster" in kept.columns else [None] * len(kept)
    if not settings.respect_groups:
        clusters, groups = [None] * len(kept), [None] * len(kept)
    extra: list[tuple[int, int]] = []
    rounds = []
    for _ in range(6):
        units = units_of(clusters, groups, extra)
        _check_classes(labels, units, settings)
        if settings.folds:
            assignment = assign_folds(labels, units, settings.folds, settings.seed)
        else:
            assignment = assign_splits(labels, units, settings.ratios, settings.seed)
        _check_every_class_everywhere(labels, units, assignment)
        certificate, leaks = cross_split_pairs(unit_emb, phash, np.asarray(assignment), threshold,
                                               duplicates.phash_radius)
        rounds.append(certificate)
        if not leaks or not settings.respect_groups:
            break
        extra += leaks
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
    report = {
        "settings": {**asdict(settings), "ratios": list(settings.ratios)},
        "rows": len(out),
        "groups": len({g for g in groups if g is not None}),
        "units": len(np.unique(units)),
        "proportions": {s: round(sum(c.values()) / len(out), 4) for s, c in counts.items()},
        "counts": counts,
        "certificate": rounds[-1],
        "certificate_rounds": rounds,
        "warnings": warnings,
    }
    path = manifest.write_atomic(out, workspace / SPLITS_NAME, {"split_report": report})
    manifest.write_json_atomic(report, workspace / REPORT_NAME)
    return SplitResult(out, path, report, warnings)


def _kept_vectors(workspace: Path, meta: dict, kept: pl.DataFrame,
                  warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The kept rows' unit embeddings and pHashes, from a verified cache: its metadata must agree with the manifest's
    record of the backbone (`open_cache`), and every kept row needs a finite cached vector, so the certificate is
    never computed from a damaged, dropped or misread one. The cache's own warnings join `warnings`."""
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
    return embedding_matrix(cache.get(shas), cache.layout), phash


def _check_classes(labels: np.ndarray, units: np.ndarray, settings: SplitSettings) -> None:
    needed = settings.folds or 3
    small = []
    for c in sorted(set(labels)):
        n_units = len(set(units[labels == c]))
        if n_units < needed:
            small.append(f"{c} ({int((labels == c).sum())} images in {n_units} groups)")
    if small:
        raise UsageError(f"every class needs at least {needed} separate groups to appear in every "
                         f"{'fold' if settings.folds else 'split'}; too small: {', '.join(small)}")


def _check_every_class_everywhere(labels: np.ndarray, units: np.ndarray, assignment: np.ndarray) -> None:
    missing = []
    for part in np.unique(assignment):
        for c in sorted(set(labels) - set(labels[assignment == part])):
            missing.append(f"{c} has no images in {part} ({len(set(units[labels == c]))} groups in all)")
    if missing:
        raise UsageError(f"not every class reaches every split: {'; '.join(missing)}; add images or artists to those "
                         f"classes, or change --ratios")
