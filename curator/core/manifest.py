"""The manifest: one Parquet row per file, the contract between every stage. Its columns are defined here only.

Stages add column groups; a manifest is valid when every core column is present with its type, and every other
column it carries is one defined here, with its type. Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from curator.core.atomic import atomic_path
from curator.core.errors import ManifestError
from curator.core.settings import QUALITY_CHECKS

SCHEMA_VERSION = 4  # 4: cluster and *_group ids are content-derived strings (3: row numbers)
MANIFEST_NAME = "manifest.parquet"
STATUSES = ("ok", "corrupt", "ignored", "duplicate", "conflict", "outlier", "low_quality")


@dataclass(frozen=True)
class Column:
    dtype: pl.DataType
    meaning: str


CORE: dict[str, Column] = {
    "id": Column(pl.String, "stable row id: the first 16 hex digits of sha256 of `path`"),
    "path": Column(pl.String, "file path relative to the scanned root, POSIX separators"),
    "label": Column(pl.String, "class: the first folder below the root; null for files at the root"),
    "group": Column(pl.String, "group for leak-free splits (e.g. artist) from --group-pattern; null if none"),
    "sha256": Column(pl.String, "sha256 of the file's bytes; null when the file was not read (not an image, not a "
                                "regular file, a link leaving the root, over --max-bytes) or could not be"),
    "bytes": Column(pl.Int64, "file size in bytes"),
    "width": Column(pl.Int32, "width in pixels after EXIF orientation; null when not an image"),
    "height": Column(pl.Int32, "height in pixels after EXIF orientation; null when not an image"),
    "format": Column(pl.String, "decoder's format name (JPEG, PNG, ...); null when not an image"),
    "mode": Column(pl.String, "Pillow mode as stored in the file (RGB, CMYK, I;16, P, ...)"),
    "status": Column(pl.String, f"one of {', '.join(STATUSES)}"),
    "reason": Column(pl.String, "why the status is not ok, in a sentence; null when ok"),
    "keep": Column(pl.Boolean, "whether the row goes on to training (status ok)"),
    "pixel_sha256": Column(pl.String, "sha256 of the decoded RGB pixels: equal for lossless re-encodes; null unless ok"),
    "phash": Column(pl.String, "64-bit perceptual hash (imagehash pHash), 16 hex digits; null unless ok"),
    "dhash": Column(pl.String, "64-bit difference hash (imagehash dHash), 16 hex digits; null unless ok"),
    "crop_phash": Column(pl.List(pl.String), "pHashes of centre crops at hashing.CROP_SCALES; null unless ok"),
    "colour": Column(pl.String, "4x4 opponent-chroma signature (hashing.colour_signature), hex; null unless ok"),
}

# Column groups added by later stages. They are validated for type whenever present.
OPTIONAL: dict[str, Column] = {
    # curator.core.paths: names that are not valid UTF-8, stored losslessly
    "path_escaped": Column(pl.Boolean, "true when the file name is not valid UTF-8 and `path` holds it with \\xNN "
                                       "escapes (paths.from_text reads it back); false or absent otherwise"),
    # curator.ingest.catalog: provenance from OUT/catalog.parquet when the cleaned root was filled by `curator ingest`
    "source": Column(pl.String, "where the image came from (wikiart, pixiv, folder, artgan, parquet)"),
    "source_id": Column(pl.String, "the image's id at its source (WikiArt contentId, Pixiv id_pN, CSV path, ...)"),
    "source_id_escaped": Column(pl.Boolean, "true when source_id is a file name that is not valid UTF-8, stored "
                                            "escaped like `path` (curator.core.paths)"),
    # curator.core.hashing.image_stats, measured by the decode workers (null unless the image was decoded)
    "brightness": Column(pl.Float32, "mean grey level in [0, 1]"),
    "sharpness": Column(pl.Float32, "variance of the grey Laplacian at 256 px on the long side (low: blurry or flat)"),
    "entropy": Column(pl.Float32, "grey-histogram entropy in bits (0: blank, 8 at most)"),
    # curator.stages.quality: scores in [0, 1], lower is worse; thresholds relative to the collection (settings.json)
    **{f"is_{name}_issue": Column(pl.Boolean, f"flagged by the {name.replace('_', ' ')} image-quality check")
       for name in QUALITY_CHECKS},
    **{f"{name}_score": Column(pl.Float32, f"{name.replace('_', ' ')} check: tail probability of the robust z-score "
                                           f"on the bad side (1: fine, near 0: flagged); null when not decoded")
       for name in QUALITY_CHECKS},
    # curator.stages.duplicates: one group per stage (exact, phash, embedding); scores in [0, 1], lower is worse
    "is_exact_issue": Column(pl.Boolean, "same bytes or same decoded pixels as another ok row"),
    "exact_score": Column(pl.Float32, "0 when the row has an exact copy, else 1"),
    "exact_group": Column(pl.String, "id of the row's exact-copy group (16 hex digits of its keeper's sha256); "
                                        "null if none"),
    "is_phash_issue": Column(pl.Boolean, "a perceptual near-duplicate (pHash+dHash, or crop-aligned pHash)"),
    "phash_score": Column(pl.Float32, "smallest pHash distance to a paired row / 64; 1 when unpaired"),
    "phash_group": Column(pl.String, "id of the row's perceptual group (16 hex digits of its keeper's sha256); "
                                        "null if none"),
    "is_embedding_issue": Column(pl.Boolean, "an embedding near-duplicate, verified by crop-aligned pHash"),
    "embedding_score": Column(pl.Float32, "1 - highest cosine to a paired row; 1 when unpaired"),
    "embedding_group": Column(pl.String, "id of the row's embedding group (16 hex digits of its keeper's sha256); "
                                        "null if none"),
    "cluster": Column(pl.String, "id of the union of all the row's duplicate pairs: the first 16 hex digits of the "
                                  "sha256 of the member the keeper rule ranks first, so adding files elsewhere "
                                  "never renumbers it; null if alone"),
    "duplicate_of": Column(pl.String, "path of the cluster's keeper, for rows that are not kept as duplicates"),
    # curator.stages.mislabels
    "mislabel_score": Column(pl.Float32, "probability that the label is wrong (0..1, higher is worse); null unless "
                                         "the row was kept and labelled when scored"),
    "suggested_label": Column(pl.String, "the class the evidence favours most after the given one"),
    "is_mislabel_issue": Column(pl.Boolean, "flagged as possibly mislabelled, in either tier (see mislabel_tier)"),
    "mislabel_tier": Column(pl.String, "outlier (every witness contradicts the label: removed by default, or kept "
                                       "with status outlier under --flag-only, or relabelled), review (unusual for "
                                       "its label, witnesses disagree: kept, status unchanged) or null"),
    "mislabel_group_share": Column(pl.Float32, "share of the same group's (artist's) other works filed under the "
                                               "row's label; null when the row has no group or is alone in it"),
    "mislabel_margin": Column(pl.Float32, "the smallest preference, among the probe, the other-artist neighbours and "
                                          "the group, for the suggested label over the given one (-1..1; > "
                                          "outlier_margin for every witness in the outlier tier)"),
    "original_label": Column(pl.String, "the label before --relabel changed it; null otherwise"),
    "mislabel_neighbours": Column(pl.List(pl.String), "for flagged rows: the 3 nearest images of the suggested class"),
    # curator.stages.splits (splits.parquet: the kept rows only)
    "split": Column(pl.String, "train, val or test"),
    "weight": Column(pl.Float32, "sampling weight from --balance: >1 oversampled, 0 left out by undersampling or a cap"),
    "fold": Column(pl.Int32, "cross-validation fold (with --folds K) instead of split"),
}

COLUMNS: dict[str, Column] = {**CORE, **OPTIONAL}


def schema() -> dict[str, pl.DataType]:
    """The core columns and their polars types, in order."""
    return {name: col.dtype for name, col in CORE.items()}


def file_paths(frame: pl.DataFrame, root: Path) -> list[Path]:
    """The files a frame's `path` column names under `root`, escaped names (`path_escaped`) read back losslessly."""
    from curator.core.paths import source_path

    escaped = frame["path_escaped"].to_list() if "path_escaped" in frame.columns else [False] * len(frame)
    return [source_path(root, text, flag) for text, flag in zip(frame["path"].to_list(), escaped, strict=True)]


def row_id(path: str) -> str:
    """Stable id for a row from its relative path."""
    return hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]


def validate(df: pl.DataFrame, source: str = "manifest") -> pl.DataFrame:
    """Return `df` if it satisfies the contract, else raise `ManifestError` saying exactly what is wrong."""
    missing = [name for name in CORE if name not in df.columns]
    if missing:
        raise ManifestError(
            f"{source} is missing column(s) {', '.join(missing)}; it was written by an older or other tool: "
            f"run `curator clean` again"
        )
    unknown = [name for name in df.columns if name not in COLUMNS]
    if unknown:
        raise ManifestError(f"{source} has unknown column(s) {', '.join(unknown)}; expected only {', '.join(COLUMNS)}")
    wrong = [
        f"{name} is {df.schema[name]}, expected {COLUMNS[name].dtype}"
        for name in df.columns
        if df.schema[name] != COLUMNS[name].dtype and df.schema[name] != pl.Null
    ]
    if wrong:
        raise ManifestError(f"{source} has wrong column types: {'; '.join(wrong)}")
    bad_status = df.filter(~pl.col("status").is_in(STATUSES))["status"].unique().to_list()
    if bad_status:
        raise ManifestError(f"{source} has unknown status value(s) {bad_status}; expected {', '.join(STATUSES)}")
    if df["path"].null_count() or df["path"].is_duplicated().any():
        raise ManifestError(f"{source} has null or repeated paths; every file must be exactly one row")
    return df


def write_atomic(df: pl.DataFrame, path: Path, metadata: dict | None = None) -> Path:
    """Write `df` as Parquet to `path` via a temp file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kv = {"atelier": json.dumps({"schema_version": SCHEMA_VERSION, **(metadata or {})}, sort_keys=True)}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: polars refuses non-UTF-8 path names
        df.write_parquet(fh, metadata=kv)
    return path


def write_json_atomic(data: dict, path: Path) -> Path:
    """Write `data` as pretty JSON via a temp file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_metadata(path: Path) -> dict:
    """The atelier metadata stored in a manifest's Parquet footer (schema version, backbone key, ...)."""
    try:
        with open(path, "rb") as fh:
            kv = pl.read_parquet_metadata(fh)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    try:
        return json.loads(kv.get("atelier", "{}"))
    except json.JSONDecodeError:
        raise ManifestError(f"{path} has unreadable atelier metadata; run `curator clean` again") from None


#: Earlier versions whose verdict and fingerprint columns mean what this version's do, so that a rerun after an
#: upgrade reuses them instead of decoding every file again (version 3 differs only in its cluster ids).
FINGERPRINT_VERSIONS = (3, SCHEMA_VERSION)
FINGERPRINT_COLUMNS = ("path", "sha256", "status", "reason", "bytes", "width", "height", "format", "mode",
                       "pixel_sha256", "phash", "dhash", "crop_phash", "colour")
#: Read with them when present (a version-3 manifest has none: its rows are decoded once more to measure them).
STATS_COLUMNS = ("brightness", "sharpness", "entropy")


def read_fingerprints(path: Path) -> pl.DataFrame:
    """The verdict and fingerprint columns (`FINGERPRINT_COLUMNS`) of a manifest of this or a compatible earlier
    version (`FINGERPRINT_VERSIONS`); a `ManifestError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}")
    if read_metadata(path).get("schema_version") not in FINGERPRINT_VERSIONS:
        raise ManifestError(f"{path} has another manifest schema version")
    try:
        with open(path, "rb") as fh:
            present = pl.read_parquet_schema(fh)
            fh.seek(0)
            df = pl.read_parquet(fh, columns=[*FINGERPRINT_COLUMNS, *(c for c in STATS_COLUMNS if c in present)])
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    wrong = [name for name in df.columns if df.schema[name] not in (COLUMNS[name].dtype, pl.Null)]
    if wrong:
        raise ManifestError(f"{path} has wrong column types: {', '.join(wrong)}")
    return df


def read(path: Path) -> pl.DataFrame:
    """Read and validate a manifest; a missing file or another schema version is a `ManifestError` saying what to run."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}; run `curator clean ROOT --out {path.parent}` first")
    meta = read_metadata(path)
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has manifest schema version {version}, this atelier reads version {SCHEMA_VERSION}; "
            f"run `curator clean` again"
        )
    try:
        with open(path, "rb") as fh:
            df = pl.read_parquet(fh)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    return validate(df, str(path))
