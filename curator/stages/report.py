"""`report.html`: every problem `curator clean` found, as a page a person reads at a glance. Offline and
self-contained: thumbnails are small WebP files in `thumbs/` beside the page, made by the same safe loader.

A summary line and a table of contents; counts per status and per class; then sections, worst first: duplicate
clusters and label conflicts as rows of thumbnails (keeper marked, with the evidence); likely mislabelled images
(flagged image marked) beside their nearest images of the suggested class; corrupt and ignored files with their
reasons. Each section shows its first `SHOWN` entries and links all of them as a Parquet table in `report/`, and
thumbnails are made only for what is shown, so the page of a million-file run is as small and quick as a small
one's. The HTML comes from `templates/report.html` (jinja2, autoescaped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from curator.core.atomic import atomic_path
from curator.core.images import write_thumbnail
from curator.core.paths import source_path
from curator.core.settings import QUALITY_CHECKS
from curator.stages.mislabels import estimate_text

SHOWN = 200
THUMB_SIDE = 128
MAP_POINTS = 5000
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")
TABLES = "report"
STATUSES = ("ok", "corrupt", "ignored", "duplicate", "conflict", "outlier", "low_quality")
QUALITY = QUALITY_CHECKS
_TABLE_COLUMNS = ("path", "label", "status", "keep", "reason")


@dataclass
class Section:
    """One section of the page: its shown rows (dicts the template reads) and the total it links as Parquet."""

    anchor: str
    title: str
    total: int
    table: str
    order: str = ""
    rows: list[dict] = field(default_factory=list)
    note: str = ""  # a paragraph under the heading


class _Thumbs:
    """Thumbnails of shown rows only, each made once per run (`thumbs/<row id>.webp`)."""

    def __init__(self, root: Path, folder: Path):
        self.root, self.folder = root, folder
        self.made: dict[str, str | None] = {}
        self.rows: dict[str, dict] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def item(self, row: dict, css: str, caption: str, score: float = 0.0) -> dict:
        """A shown image: its thumbnail (made once) and what the page's filters, sorting and lightbox read."""
        if row["id"] not in self.made:
            target = self.folder / f"{row['id']}.webp"
            source = source_path(self.root, row["path"], row.get("path_escaped"))
            made = write_thumbnail(source, target, THUMB_SIDE)
            self.made[row["id"]] = f"thumbs/{target.name}" if made else None
            self.rows[row["id"]] = _row_fields(row, source)
        return {"css": css, "url": self.made[row["id"]], "path": row["path"], "caption": caption, "id": row["id"],
                "label": row["label"] or "", "status": row["status"], "score": round(float(score), 4)}


def _row_fields(row: dict, source: Path) -> dict:
    """The manifest row as the lightbox shows it (fingerprints left out), with the source image's file URL."""
    try:
        url = source.resolve().as_uri()
    except (OSError, ValueError, UnicodeError):
        url = None
    skip = {"phash", "dhash", "crop_phash", "colour", "pixel_sha256", "id", "path_escaped"}
    fields = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
              if k not in skip and not k.startswith("_") and v is not None}
    return {**fields, "source_url": url}


def _write_table(frame: pl.DataFrame, workspace: Path, name: str) -> str:
    """Write a section's full table as `report/<name>.parquet`; returns its URL relative to the page."""
    folder = workspace / TABLES
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{name}.parquet") as tmp, open(tmp, "wb") as fh:
        frame.write_parquet(fh)
    return f"{TABLES}/{name}.parquet"


def _counts(frame: pl.DataFrame) -> tuple[list[dict], dict]:
    per = frame.group_by("label").agg(
        pl.len().alias("files"), *[(pl.col("status") == s).sum().alias(s) for s in STATUSES],
        pl.col("keep").sum().alias("kept")).sort("label", nulls_last=True)
    rows = [{**row, "label": row["label"] or "(root)"} for row in per.iter_rows(named=True)]
    total = {"files": len(frame), **{s: int((frame["status"] == s).sum()) for s in STATUSES},
             "kept": int(frame["keep"].sum())}
    return rows, total


def summary_line(frame: pl.DataFrame) -> str:
    """"150 files: 141 kept; 9 removed (3 duplicates, 6 likely mislabelled); 0 corrupt, 0 ignored"."""
    count = {s: int((frame["status"] == s).sum()) for s in STATUSES}
    kept = int(frame["keep"].sum())
    removed = {"duplicates": count["duplicate"], "label conflicts": count["conflict"],
               "likely mislabelled": count["outlier"], "low quality": count["low_quality"]}
    detail = ", ".join(f"{n:,} {what}" for what, n in removed.items() if n)
    flagged = (int(frame["is_mislabel_issue"].fill_null(False).sum()) - count["outlier"]
               if "is_mislabel_issue" in frame.columns else 0)
    issues = [f"is_{name}_issue" for name in QUALITY if f"is_{name}_issue" in frame.columns]
    quality = int(frame.select(pl.any_horizontal(issues) & pl.col("keep")).to_series().sum()) if issues else 0
    return (f"{len(frame):,} files: {kept:,} kept; {sum(removed.values()):,} removed"
            + (f" ({detail})" if detail else "") + (f"; {flagged:,} flagged but kept" if flagged > 0 else "")
            + (f"; {quality:,} kept with an image-quality issue" if quality else "")
            + f"; {count['corrupt']:,} corrupt, {count['ignored']:,} ignored")


def _clusters(frame: pl.DataFrame, workspace: Path, thumbs: _Thumbs) -> Section:
    if "cluster" not in frame.columns:
        return Section("clusters", "Duplicate clusters and label conflicts", 0, "")
    clustered = frame.filter(pl.col("cluster").is_not_null())
    ordered = clustered.group_by("cluster").agg(
        (pl.col("status") == "conflict").any().alias("conflict"), pl.len().alias("n"),
        pl.col("label").drop_nulls().unique().sort().alias("labels"),
    ).sort(["conflict", "n", "cluster"], descending=[True, True, False])
    table = _write_table(clustered.select("cluster", *_TABLE_COLUMNS, "duplicate_of").sort("cluster", "path"),
                         workspace, "clusters")
    section = Section("clusters", "Duplicate clusters and label conflicts", len(ordered), table,
                      "conflicts first, then the largest")
    shown = ordered.head(SHOWN)
    members = clustered.filter(pl.col("cluster").is_in(shown["cluster"].implode())).sort(
        "keep", "path", descending=[True, False])
    by_cluster = {key[0]: part for key, part in zip(*_partitions(members, "cluster"))}
    for rank, (cluster, conflict, size, labels) in enumerate(shown.iter_rows()):
        score = len(shown) - rank
        items = [thumbs.item(row, "keeper" if row["keep"] else "dropped",
                             ("kept" if row["keep"] else row["reason"] or row["status"]) + f" [{row['label']}]",
                             score)
                 for row in by_cluster[cluster].iter_rows(named=True)]
        title = f"label conflict: {' vs '.join(labels)}" if conflict else f"{size} copies"
        section.rows.append({"title": title, "items": items, "score": score, "path": items[0]["path"]})
    return section


def _partitions(frame: pl.DataFrame, column: str) -> tuple[list, list[pl.DataFrame]]:
    parts = frame.partition_by(column, as_dict=True, maintain_order=True)
    return list(parts.keys()), list(parts.values())


def _mislabels(frame: pl.DataFrame, workspace: Path, thumbs: _Thumbs, estimate: dict) -> list[Section]:
    """The mislabel stage's two tiers as two sections: outliers (every witness against the label: removed, or kept
    with status outlier, or relabelled) and the rows kept for review; each image with its evidence, the heading
    with the collection's estimated noise rate."""
    if "is_mislabel_issue" not in frame.columns:
        return []
    flagged = frame.filter(pl.col("is_mislabel_issue").fill_null(False)).sort("mislabel_score", descending=True)
    tier = (pl.col("mislabel_tier") if "mislabel_tier" in frame.columns
            else pl.when(pl.col("status") == "outlier").then(pl.lit("outlier")).otherwise(pl.lit("review")))
    flagged = flagged.with_columns(tier.alias("_tier"))
    note = _estimate_note(estimate)
    return [_mislabel_section(flagged.filter(pl.col("_tier") == "outlier"), frame, workspace, thumbs, "mislabels",
                              "Likely mislabelled: every witness disagrees with the label", note),
            _mislabel_section(flagged.filter(pl.col("_tier") != "outlier"), frame, workspace, thumbs,
                              "mislabels-review", "Kept for review: unusual for their label", "")]


def _estimate_note(estimate: dict) -> str:
    """"Estimated 0.4% of labels wrong (90% interval 0.2-0.7%), from 3,030 judged images." (`estimate_text`, the
    words of the CLI's summary too)."""
    said = estimate_text({**estimate, "reliable": True}) if estimate else None
    if not said:
        return ""
    note = f"{said[0].upper()}{said[1:]}, from {estimate.get('judged', 0):,} judged images."
    return note + ("" if estimate.get("reliable", True) else
                   " Too few images to trust it: nothing was removed, the would-be outliers are kept for review.")


def _mislabel_section(rows: pl.DataFrame, frame: pl.DataFrame, workspace: Path, thumbs: _Thumbs, anchor: str,
                      title: str, note: str) -> Section:
    columns = [c for c in ("original_label", "suggested_label", "mislabel_score", "mislabel_tier",
                           "mislabel_group_share", "mislabel_margin", "mislabel_neighbours") if c in frame.columns]
    table = _write_table(rows.select(*_TABLE_COLUMNS, *columns), workspace, anchor.replace("-", "_"))
    section = Section(anchor, title, len(rows), table, "worst first", note=note)
    shown = rows.head(SHOWN)
    wanted = {p for ps in shown["mislabel_neighbours"].to_list() for p in ps or []} \
        if "mislabel_neighbours" in shown.columns else set()
    by_path = {r["path"]: r for r in frame.filter(pl.col("path").is_in(list(wanted))).iter_rows(named=True)}
    for row in shown.iter_rows(named=True):
        given = row.get("original_label") or row["label"]
        caption = f"filed as {given}, suggested {row['suggested_label']} (score {row['mislabel_score']:.2f})"
        score = row["mislabel_score"] or 0.0
        items = [thumbs.item(row, "flagged" + (" dropped" if not row["keep"] else ""), caption, score)]
        items += [thumbs.item(by_path[p], "", f"nearest {row['suggested_label']}", score)
                  for p in row.get("mislabel_neighbours") or [] if p in by_path]
        section.rows.append({"items": items, "reason": row["reason"] or "", "score": score, "path": row["path"]})
    return section


def _quality(frame: pl.DataFrame, workspace: Path, thumbs: _Thumbs, thresholds: dict[str, str]) -> Section | None:
    issues = [name for name in QUALITY if f"is_{name}_issue" in frame.columns]
    if not issues:
        return None
    worst = pl.min_horizontal([pl.when(pl.col(f"is_{n}_issue")).then(pl.col(f"{n}_score")) for n in issues])
    which = pl.concat_str([pl.when(pl.col(f"is_{n}_issue")).then(pl.lit(n.replace("_", " "))) for n in issues],
                          separator=", ", ignore_nulls=True)
    flagged = frame.filter(pl.any_horizontal([f"is_{n}_issue" for n in issues])).with_columns(
        worst.alias("_worst"), which.alias("_which")).sort("_worst", "path")
    table = _write_table(flagged.select(*_TABLE_COLUMNS, pl.col("_which").alias("issues"),
                                        *[c for n in issues for c in (f"{n}_score",)],
                                        *[c for c in ("brightness", "sharpness", "entropy", "width", "height")
                                          if c in frame.columns]), workspace, "quality")
    order = "worst first; thresholds follow the collection: " + "; ".join(
        f"{n.replace('_', ' ')}: {thresholds[n]}" for n in issues if n in thresholds)
    section = Section("quality", "Image-quality issues", len(flagged), table, order)
    for row in flagged.head(SHOWN).iter_rows(named=True):
        score = 1.0 - (row["_worst"] or 0.0)
        item = thumbs.item(row, "flagged", f"{row['_which']} (score {row['_worst']:.3f})", score)
        section.rows.append({"items": [item], "score": score, "path": row["path"]})
    return section


def _files(frame: pl.DataFrame, workspace: Path, status: str, title: str) -> Section:
    rows = frame.filter(pl.col("status") == status).sort("path")
    table = _write_table(rows.select(*_TABLE_COLUMNS), workspace, status)
    section = Section(status, title, len(rows), table)
    section.rows = [{"text": r["path"], "reason": r["reason"] or "", "items": [], "label": r["label"] or "",
                     "status": status, "score": 0, "path": r["path"]}
                    for r in rows.head(SHOWN).select("path", "reason", "label").iter_rows(named=True)]
    return section


def _histogram(values: np.ndarray, title: str, log: bool = False, bins: int = 24) -> dict:
    """A small inline SVG bar chart of `values` (log-spaced bins when `log`), with its range on the axis."""
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    width, height = 260, 110
    if len(values) == 0:
        return {"title": f"{title}: no data", "svg": ""}
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(values, edges)
    bar = width / bins
    top = max(int(counts.max()), 1)
    rects = "".join(f'<rect x="{i * bar:.1f}" y="{90 - 85 * c / top:.1f}" width="{bar - 1:.1f}" '
                    f'height="{85 * c / top:.1f}" fill="#4a7bb7"><title>{edges[i]:.3g}-{edges[i + 1]:.3g}: {c}'
                    f'</title></rect>' for i, c in enumerate(counts.tolist()))
    axis = (f'<text x="0" y="{height - 4}" font-size="10">{lo:.3g}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">{hi:.3g}</text>')
    return {"title": f"{title} (n={len(values):,}, median {np.median(values):.3g})",
            "svg": f'<svg width="{width}" height="{height}" role="img">{rects}{axis}</svg>'}


def image_statistics(frame: pl.DataFrame) -> list[dict]:
    """Histograms of what the manifest knows about each decoded image: size, aspect ratio, file size, and the
    image-quality scores when the frame has them."""
    images = frame.filter(pl.col("width").is_not_null() & pl.col("height").is_not_null())
    w = images["width"].to_numpy().astype(np.float64)
    h = images["height"].to_numpy().astype(np.float64)
    charts = [_histogram(w * h / 1e6, "megapixels", log=True), _histogram(w / np.maximum(h, 1), "aspect (w/h)",
                                                                          log=True),
              _histogram(images["bytes"].to_numpy().astype(np.float64) / 1e6, "file size (MB)", log=True)]
    for column, title in (("brightness_score", "brightness"), ("blurry_score", "sharpness score")):
        if column in frame.columns:
            charts.append(_histogram(images[column].to_numpy().astype(np.float64), title))
    return charts


def collection_map(frame: pl.DataFrame, embeddings: np.ndarray | None, rows: np.ndarray | None,
                   thumbs: dict[str, str | None], classes: list[str], limit: int = MAP_POINTS,
                   seed: int = 0) -> dict | None:
    """A 2-D projection (PCA on a sample: every row with a problem first, then a random share of the rest, at most
    `limit`) of the embeddings of frame rows `rows`, scaled to [0, 1], with each point's label, status, path and
    thumbnail when it has one. None without embeddings."""
    if embeddings is None or rows is None or len(rows) < 3:
        return None
    from sklearn.utils.extmath import randomized_svd

    status = frame["status"].to_numpy()[rows]
    flagged = (frame["is_mislabel_issue"].fill_null(False).to_numpy()[rows] if "is_mislabel_issue" in frame.columns
               else np.zeros(len(rows), dtype=bool))
    problem = (status != "ok") | flagged
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(problem)), rng.permutation(np.flatnonzero(~problem))])
    take = np.sort(order[:limit])
    x = np.asarray(embeddings[take], dtype=np.float32)
    x -= x.mean(axis=0)
    u, sigma, _ = randomized_svd(x, 2, random_state=seed)
    xy = u * sigma
    lo, hi = np.percentile(xy, 1, axis=0), np.percentile(xy, 99, axis=0)
    xy = np.clip((xy - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    picked = frame[rows[take]]
    index = {c: i for i, c in enumerate(classes)}
    return {"x": np.round(xy[:, 0], 4).tolist(), "y": np.round(xy[:, 1], 4).tolist(),
            "label": [index.get(c, -1) for c in picked["label"].to_list()],
            "status": ["flagged" if f and s == "ok" else s for f, s in zip(flagged[take].tolist(), status[take])],
            "path": picked["path"].to_list(), "thumb": [thumbs.get(i) for i in picked["id"].to_list()],
            "note": f"PCA of the embeddings of {len(take):,} of {len(rows):,} decoded images"
                    + (" (every image with a problem, and a random sample of the rest)." if len(take) < len(rows)
                       else ".")}


def write_report(frame: pl.DataFrame, root: Path, workspace: Path, embeddings: np.ndarray | None = None,
                 embedding_rows: np.ndarray | None = None, quality: dict[str, str] | None = None,
                 mislabels: dict | None = None) -> Path:
    """Write `workspace/report.html`, its thumbnails and its `report/*.parquet` tables for a cleaned manifest
    frame; returns the page's path. `embeddings` (one row per frame row in `embedding_rows`) draw the map;
    `quality` holds the image-quality thresholds as sentences (`curator.stages.quality.apply_quality`);
    `mislabels` the mislabel stage's estimate of the collection's noise rate (`MislabelResult.summary`)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    root, workspace = Path(root), Path(workspace)
    thumbs = _Thumbs(root, workspace / "thumbs")
    sections = [_clusters(frame, workspace, thumbs), *_mislabels(frame, workspace, thumbs, mislabels or {}),
                _quality(frame, workspace, thumbs, quality or {}),
                _files(frame, workspace, "corrupt", "Corrupt files"),
                _files(frame, workspace, "ignored", "Ignored files")]
    counts, total = _counts(frame)
    classes = sorted(x for x in frame["label"].unique().to_list() if x is not None)
    points = collection_map(frame, embeddings, embedding_rows, thumbs.made, classes, MAP_POINTS)
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html"]))
    page = env.get_template("report.html").render(
        root=str(root), summary=summary_line(frame), statuses=STATUSES, counts=counts, total=total,
        sections=[s for s in sections if s is not None], classes=classes,
        colours=[PALETTE[i % len(PALETTE)] for i in range(len(classes))], rows=thumbs.rows,
        points=points, map_note=points["note"] if points else "", histograms=image_statistics(frame))
    path = workspace / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
