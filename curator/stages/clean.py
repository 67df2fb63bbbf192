"""`curator clean`: scan a folder, judge every file, embed every usable image once, then run the duplicate cascade
(`curator.stages.duplicates`) and the mislabel stage (`curator.stages.mislabels`), and write the manifest, settings.json
and report.html. Each stage is a function over frames and arrays; this module only orders them and does the I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from curator.core import manifest
from curator.core.errors import ManifestError, UsageError
from curator.core.hashing import Fingerprint, to_hex
from curator.core.images import (
    DEFAULT_MAX_BYTES,
    STATUS_OK,
    FileInfo,
    ReadPolicy,
    looks_like_image,
    scan,
)
from curator.core.neighbours import build as build_neighbourhood
from curator.core.neighbours import graph_width
from curator.core.ownership import MARKER, claim, marker_kind
from curator.core.paths import display, relative_text
from curator.core.progress import Event, advance, stage
from curator.core.runtime import Runtime, select_runtime
from curator.core.settings import QualitySettings
from curator.embedding.backbones import DEFAULT_BACKBONE, load_backbone
from curator.embedding.embed import (
    DEFAULT_BATCH_SIZE,
    EmbeddingCache,
    EmbedReport,
    cache_for,
    embed_files,
    embedding_matrix,
)
from curator.ingest.catalog import CATALOG_NAME, JOURNAL_NAME, PART_SUFFIX, read_catalog
from curator.stages.duplicates import DuplicateSettings, find_duplicates
from curator.stages.mislabels import MislabelSettings, apply_mislabels, vote_size
from curator.stages.quality import apply_quality
from curator.stages.report import write_report

DEFAULT_WORKSPACE = Path("curated")
#: Image statistics the decode workers measure (`curator.core.hashing.image_stats`), as manifest columns.
STATS = manifest.STATS_COLUMNS
#: The embedding pass: judges every file and fills the embedding cache, with `embed_files`'s arguments and its
#: `EmbedReport`: `curator.embedding.embed.embed_files` (this machine) or `curator.embedding.ray_embed.RayEmbedder` (a
#: Ray cluster).
Embedder = Callable[..., EmbedReport]


@dataclass(frozen=True)
class CleanSettings:
    """Everything that decides a clean run's output; written next to it as settings.json."""

    root: Path
    workspace: Path = DEFAULT_WORKSPACE
    group_pattern: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    follow_symlinks: bool = False
    duplicates: DuplicateSettings = field(default_factory=DuplicateSettings)
    mislabels: MislabelSettings = field(default_factory=MislabelSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)


@dataclass
class CleanResult:
    """The manifest and where it went, with what the embedding pass did."""

    manifest: pl.DataFrame
    manifest_path: Path
    embed: EmbedReport
    runtime: Runtime
    backbone_key: str
    timings: dict[str, float] = field(default_factory=dict)
    pairs: pl.DataFrame | None = None
    report_path: Path | None = None
    root: Path | None = None
    warnings: list[str] = field(default_factory=list)
    mislabels: dict = field(default_factory=dict)  # the mislabel stage's noise estimate and tier sizes


def compile_group_pattern(pattern: str | None) -> re.Pattern | None:
    """The --group-pattern regex, checked: its first capture group (or whole match) on a file name is the group."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--group-pattern {pattern!r} is not a valid regular expression: {exc}") from None


def group_of(name: str, pattern: re.Pattern | None) -> str | None:
    if pattern is None:
        return None
    match = pattern.search(name)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def build_manifest(root: Path, infos: Sequence[FileInfo], fingerprints: Sequence[Fingerprint | None],
                   group_pattern: re.Pattern | None = None) -> pl.DataFrame:
    """The stage-1 manifest frame for `infos` and their fingerprints (paths under `root`), in the order given.

    Names that are not valid UTF-8 are stored escaped (`curator.core.paths`), with `path_escaped` set."""
    rows = []
    for info, prints in zip(infos, fingerprints, strict=True):
        rel, escaped = relative_text(info.path, root)
        parts = rel.split("/")
        rows.append(
            {
                "id": manifest.row_id(rel),
                "path": rel,
                "path_escaped": escaped,
                "label": parts[0] if len(parts) > 1 else None,
                "group": group_of(parts[-1], group_pattern),
                "sha256": info.sha256,
                "bytes": info.bytes,
                "width": info.width,
                "height": info.height,
                "format": info.format,
                "mode": info.mode,
                "status": info.status,
                "reason": info.reason,
                "keep": info.status == STATUS_OK,
                "pixel_sha256": prints.pixel_sha256 if prints else None,
                "phash": to_hex(prints.phash) if prints else None,
                "dhash": to_hex(prints.dhash) if prints else None,
                "crop_phash": [to_hex(h) for h in prints.crop_phash] if prints else None,
                "colour": prints.colour.hex() if prints else None,
                **dict(zip(STATS, prints.stats if prints and prints.stats else (None,) * len(STATS))),
            }
        )
    schema = {**manifest.schema(), "path_escaped": pl.Boolean, **{name: pl.Float32 for name in STATS}}
    return manifest.validate(pl.DataFrame(rows, schema=schema))


def without_features(frame: pl.DataFrame, missing: Sequence[str]) -> pl.DataFrame:
    """Ok rows whose image has no usable feature vector (the model gave NaN or inf for it, so the cache refused it)
    become corrupt rows saying so, rather than rows the later stages would compute from garbage."""
    if not missing:
        return frame
    hit = (pl.col("status") == STATUS_OK) & pl.col("sha256").is_in(list(missing))
    return frame.with_columns(
        pl.when(hit).then(pl.lit("corrupt")).otherwise(pl.col("status")).alias("status"),
        pl.when(hit).then(pl.lit("the model gave non-finite features (NaN or inf) for this image"))
        .otherwise(pl.col("reason")).alias("reason"),
        pl.when(hit).then(False).otherwise(pl.col("keep")).alias("keep"),
    )


def unmatched_groups(frame: pl.DataFrame, pattern: re.Pattern | None) -> str | None:
    """A warning counting the ok rows whose file name --group-pattern did not match (their group is null)."""
    if pattern is None:
        return None
    missed = frame.filter((pl.col("status") == STATUS_OK) & pl.col("group").is_null())
    if missed.is_empty():
        return None
    example = missed["path"][0].rsplit("/", 1)[-1]
    return (f"--group-pattern {pattern.pattern!r} matched no group in {len(missed)} of "
            f"{int((frame['status'] == STATUS_OK).sum())} image names (e.g. {example!r}); those rows have no group")


def with_provenance(frame: pl.DataFrame, catalog: pl.DataFrame, prefer_pattern: bool = False) -> pl.DataFrame:
    """Provenance from an ingest's catalog, by path: `source`, `source_id`, and the artist as `group` (unless a
    --group-pattern was given, which then wins)."""
    ok = catalog.filter((pl.col("status") == "ok") & pl.col("path").is_not_null()).unique("path", keep="last")
    provenance = ["source", "source_id", *(["source_id_escaped"] if "source_id_escaped" in catalog.columns else [])]
    joined = frame.join(ok.select("path", pl.col("group").alias("_cat_group"), *provenance), on="path", how="left")
    group = (pl.coalesce("group", "_cat_group") if prefer_pattern else pl.coalesce("_cat_group", "group"))
    joined = joined.with_columns(group.alias("group")).drop("_cat_group")
    return manifest.validate(joined.select([*frame.columns, *provenance]))


def _known_verdicts(root: Path, workspace: Path) -> dict[str, tuple[FileInfo, Fingerprint | None]]:
    """Verdicts and fingerprints from the workspace's previous manifest, by content hash, so that unchanged files
    are not decoded again."""
    try:
        previous = manifest.read_fingerprints(workspace / manifest.MANIFEST_NAME)
    except ManifestError:
        return {}
    known = {}
    for row in previous.filter(pl.col("sha256").is_not_null()).iter_rows(named=True):
        status = row["status"] if row["status"] in ("ok", "corrupt", "ignored") else STATUS_OK
        info = FileInfo(
            root / row["path"], row["sha256"], row["bytes"], row["width"], row["height"], row["format"],
            row["mode"], status, row["reason"] if status != STATUS_OK else None,
        )
        prints = None
        if row["phash"] is not None:
            if row.get("brightness") is None:
                continue  # measured before image statistics existed: decode it once more
            prints = Fingerprint(row["pixel_sha256"], int(row["phash"], 16), int(row["dhash"], 16),
                                 tuple(int(h, 16) for h in row["crop_phash"]), bytes.fromhex(row["colour"]),
                                 tuple(row[name] for name in STATS))
        known[row["sha256"]] = (info, prints)
    return known


def _atelier_own(path: Path, root: Path, ingested: bool) -> bool:
    """Files atelier itself keeps in a root it filled (`curator ingest`'s catalog, journal, marker and the part files
    of a killed run): bookkeeping, not data, so they get no row."""
    if path.parent == root and path.name == MARKER and marker_kind(root) is not None:
        return True
    if not ingested:
        return False
    if path.parent == root and path.name in (CATALOG_NAME, JOURNAL_NAME):
        return True
    return path.name.startswith(".") and path.name.endswith(PART_SUFFIX) and path.parent.parent in (root, root.parent)


def check_settings(settings: CleanSettings) -> None:
    """Refuse settings no run could honour, in one sentence each, before anything is read or written."""
    if not isinstance(settings.batch_size, int) or settings.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {settings.batch_size!r}")
    if settings.workers is not None and (not isinstance(settings.workers, int) or settings.workers < 0):
        raise UsageError(f"--workers must be 0 (decode in the main process) or more, got {settings.workers!r}")
    ReadPolicy(None, settings.max_bytes)


def is_workspace(folder: Path) -> bool:
    """True for an unmarked folder that an earlier atelier made a workspace of (its manifest carries atelier's
    metadata), so that it is adopted rather than refused."""
    try:
        return "schema_version" in manifest.read_metadata(Path(folder) / manifest.MANIFEST_NAME)
    except ManifestError:
        return False


@dataclass
class LaterStages:
    """What `later_stages` gives `clean`: the judged frame (not yet validated as a manifest), the duplicate pairs, the
    mislabel stage's warnings, seconds per stage, the image-quality thresholds as sentences, and the gathered
    embeddings of the ok rows (`vectors`, row `ok_rows` of the frame each; None when no row is ok) for the report's
    map, and the mislabel stage's summary (`mislabels`: its noise estimate with the interval, and the tiers'
    sizes), and the thresholds the duplicate cascade's embedding evidence set (`duplicates`: the typical
    nearest-neighbour gap and the cosines it gives, `curator.stages.duplicates.thresholds`)."""

    frame: pl.DataFrame
    pairs: pl.DataFrame | None
    warnings: list[str]
    timings: dict[str, float]
    quality: dict[str, str]
    vectors: np.ndarray | None
    ok_rows: np.ndarray
    mislabels: dict
    duplicates: dict = field(default_factory=dict)


def later_stages(frame: pl.DataFrame, cache: EmbeddingCache, layout: dict[str, tuple[int, int]],
                 settings: CleanSettings, cache_dir: Path, events: Event | None = None) -> LaterStages:
    """Everything `curator clean` does after the embedding pass, on the stage-1 frame and the embedding cache it
    filled: image quality, ok rows without usable features turned corrupt, one neighbour graph over the ok rows'
    embeddings (read from `cache` a chunk at a time, `layout` saying which feature parts make the embedding), the
    duplicate cascade, and the mislabel stage (its scores cached under `cache_dir`). A function of its own so that
    bench/scale.py measures this very code on synthetic workspaces of up to a million rows."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    frame, quality_thresholds = apply_quality(frame, settings.quality)
    frame = without_features(frame, cache.missing(frame.filter(pl.col("status") == STATUS_OK)["sha256"].to_list()))
    timings["quality"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok = (frame["status"] == STATUS_OK).to_numpy()
    ok_shas = frame.filter(pl.Series(ok))["sha256"].to_list()
    space = None
    if ok_shas:
        # one neighbour graph for both later stages, over the ok rows' embeddings read a chunk at a time; the
        # progress line says up front what the rows held for the search take
        read = cache.reader(ok_shas)
        width = graph_width(len(ok_shas), settings.duplicates.embed_neighbours,
                            vote_size(len(ok_shas), settings.mislabels)[1])
        cache_dir.mkdir(parents=True, exist_ok=True)
        space = build_neighbourhood(lambda start, stop: embedding_matrix(read(start, stop), layout), len(ok_shas),
                                    embedding_matrix(read(0, 1), layout).shape[1], width,
                                    events=events, spill_dir=cache_dir)
    timings["neighbours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage(events, "duplicates (exact, phash, embedding)", 3)
    found: dict = {}
    frame, pairs = find_duplicates(frame, space, settings.duplicates, events, summary=found)
    timings["duplicates"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage(events, "mislabels (probe + neighbours)", 1)
    # kept rows are a subset of the ok rows: the mislabel stage reads the same rows and the same graph, mapped
    kept = (frame["keep"] & frame["label"].is_not_null()).to_numpy()
    kept_space = space.subset(np.flatnonzero(kept[ok])) if space is not None and kept.any() else None
    vectors = space.vectors if space is not None else None  # the report's map reads them (no copy)
    space = None  # the ok rows' graph is not needed any more
    estimate: dict = {}
    frame, warnings = apply_mislabels(frame, kept_space, settings.mislabels, cache_dir=cache_dir, summary=estimate)
    advance(events)
    timings["mislabels"] = time.perf_counter() - t0
    return LaterStages(frame, pairs, list(warnings), timings, quality_thresholds, vectors, np.flatnonzero(ok),
                       estimate, found)


def clean(settings: CleanSettings, events: Event | None = None, embedder: Embedder = embed_files) -> CleanResult:
    """Run stage 1 on `settings.root` and write `manifest.parquet` and `settings.json` into the workspace.

    `embedder` does the embedding pass (`embed_files` here, or `curator.embedding.ray_embed.RayEmbedder` on a Ray
    cluster); the later stages run here, on the arrays it leaves in the cache."""
    root = Path(settings.root)
    if not root.exists():
        raise UsageError(f"root folder {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"root {root} is not a folder")
    root = root.resolve()
    workspace = Path(settings.workspace).resolve()
    check_settings(settings)
    pattern = compile_group_pattern(settings.group_pattern)
    runtime = select_runtime(settings.device, settings.dtype)
    policy = ReadPolicy(root, settings.max_bytes, settings.follow_symlinks)
    if workspace == root:
        raise UsageError(f"--out {display(str(workspace))} is the folder being cleaned; the workspace must be a folder "
                         f"of its own (e.g. --out {display(str(root.parent / 'curated'))})")
    claim(workspace, "workspace", "--out", adopt=is_workspace(workspace))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    catalog = read_catalog(root)
    paths = [p for p in scan(root, exclude=[workspace], follow_symlinks=settings.follow_symlinks)
             if not _atelier_own(p, root, catalog is not None)]
    timings["scan"] = time.perf_counter() - t0
    if not paths:
        raise UsageError(f"root folder {root} is empty: no files to clean")
    if not any(looks_like_image(p) for p in paths):
        raise UsageError(f"no image files under {root} ({len(paths)} files, none of them an image)")

    t0 = time.perf_counter()
    backbone = load_backbone(settings.backbone, settings.weights)
    timings["load_backbone"] = time.perf_counter() - t0
    cache = cache_for(workspace, backbone)
    stage(events, "integrity + embeddings", len(paths))
    report = embedder(
        paths, backbone, cache, runtime, batch_size=settings.batch_size, workers=settings.workers,
        known=_known_verdicts(root, workspace), events=events, policy=policy,
    )
    timings["integrity_and_embeddings"] = report.seconds
    timings["model"] = report.model_seconds
    frame = build_manifest(root, report.infos, report.fingerprints, pattern)
    if catalog is not None:
        frame = with_provenance(frame, catalog, prefer_pattern=pattern is not None)
    later = later_stages(frame, cache, backbone.feature_layout, settings, workspace / "cache" / backbone.key,
                         events)
    frame = later.frame
    timings.update(later.timings)
    unmatched = unmatched_groups(frame, pattern)
    warnings = [*cache.warnings, *([unmatched] if unmatched else []), *later.warnings]
    frame = manifest.validate(frame)
    meta = {"root": str(root), "backbone": backbone.name, "backbone_key": backbone.key,
            "weights": backbone.weights_origin, "feature_layout": backbone.feature_layout}
    path = manifest.write_atomic(frame, workspace / manifest.MANIFEST_NAME, meta)
    t0 = time.perf_counter()
    report_path = write_report(frame, root, workspace, later.vectors, later.ok_rows, quality=later.quality,
                               mislabels=later.mislabels)
    timings["report"] = time.perf_counter() - t0
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
    resolved["duplicates"] = {**asdict(settings.duplicates), "thresholds": later.duplicates}
    resolved["mislabels"] = {**asdict(settings.mislabels), "estimate": later.mislabels}
    resolved["quality"] = {**asdict(settings.quality), "thresholds": later.quality}
    resolved.update(root=str(root), workspace=str(workspace), device_resolved=runtime.device,
                    dtype_resolved=runtime.dtype, dtype_reason=runtime.reason, backbone_key=backbone.key,
                    weights_origin=backbone.weights_origin)
    manifest.write_json_atomic(resolved, workspace / "settings.json")
    return CleanResult(frame, path, report, runtime, backbone.key, timings, later.pairs, report_path, root,
                       warnings, later.mislabels)
