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

import polars as pl

from curator.atomic import atomic_path
from curator.images import write_thumbnail
from curator.paths import source_path

SHOWN = 200
THUMB_SIDE = 128
TABLES = "report"
STATUSES = ("ok", "corrupt", "ignored", "duplicate", "conflict", "outlier")
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


class _Thumbs:
    """Thumbnails of shown rows only, each made once per run (`thumbs/<row id>.webp`)."""

    def __init__(self, root: Path, folder: Path):
        self.root, self.folder = root, folder
        self.made: dict[str, str | None] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def item(self, row: dict, css: str, caption: str) -> dict:
        if row["id"] not in self.made:
            target = self.folder / f"{row['id']}.webp"
            source = source_path(self.root, row["path"], row.get("path_escaped"))
            made = write_thumbnail(source, target, THUMB_SIDE)
            self.made[row["id"]] = f"thumbs/{target.name}" if made else None
        return {"css": css, "url": self.made[row["id"]], "path": row["path"], "caption": caption}


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
               "likely mislabelled": count["outlier"]}
    detail = ", ".join(f"{n:,} {what}" for what, n in removed.items() if n)
    flagged = (int(frame["is_mislabel_issue"].fill_null(False).sum()) - count["outlier"]
               if "is_mislabel_issue" in frame.columns else 0)
    return (f"{len(frame):,} files: {kept:,} kept; {sum(removed.values()):,} removed"
            + (f" ({detail})" if detail else "") + (f"; {flagged:,} flagged but kept" if flagged > 0 else "")
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
    for cluster, conflict, size, labels in shown.iter_rows():
        items = [thumbs.item(row, "keeper" if row["keep"] else "dropped",
                             ("kept" if row["keep"] else row["reason"] or row["status"]) + f" [{row['label']}]")
                 for row in by_cluster[cluster].iter_rows(named=True)]
        title = f"label conflict: {' vs '.join(labels)}" if conflict else f"{size} copies"
        section.rows.append({"title": title, "items": items})
    return section


def _partitions(frame: pl.DataFrame, column: str) -> tuple[list, list[pl.DataFrame]]:
    parts = frame.partition_by(column, as_dict=True, maintain_order=True)
    return list(parts.keys()), list(parts.values())


def _mislabels(frame: pl.DataFrame, workspace: Path, thumbs: _Thumbs) -> Section | None:
    if "is_mislabel_issue" not in frame.columns:
        return None
    flagged = frame.filter(pl.col("is_mislabel_issue").fill_null(False)).sort("mislabel_score", descending=True)
    columns = [c for c in ("original_label", "suggested_label", "mislabel_score", "mislabel_neighbours")
               if c in frame.columns]
    table = _write_table(flagged.select(*_TABLE_COLUMNS, *columns), workspace, "mislabels")
    section = Section("mislabels", "Likely mislabelled", len(flagged), table, "worst first")
    shown = flagged.head(SHOWN)
    wanted = {p for ps in shown["mislabel_neighbours"].to_list() for p in ps or []} \
        if "mislabel_neighbours" in shown.columns else set()
    by_path = {r["path"]: r for r in frame.filter(pl.col("path").is_in(list(wanted))).iter_rows(named=True)}
    for row in shown.iter_rows(named=True):
        given = row.get("original_label") or row["label"]
        caption = f"filed as {given}, suggested {row['suggested_label']} (score {row['mislabel_score']:.2f})"
        items = [thumbs.item(row, "flagged" + (" dropped" if not row["keep"] else ""), caption)]
        items += [thumbs.item(by_path[p], "", f"nearest {row['suggested_label']}")
                  for p in row.get("mislabel_neighbours") or [] if p in by_path]
        section.rows.append({"items": items, "reason": row["reason"] or ""})
    return section


def _files(frame: pl.DataFrame, workspace: Path, status: str, title: str) -> Section:
    rows = frame.filter(pl.col("status") == status).sort("path")
    table = _write_table(rows.select(*_TABLE_COLUMNS), workspace, status)
    section = Section(status, title, len(rows), table)
    section.rows = [{"text": r["path"], "reason": r["reason"] or "", "items": []}
                    for r in rows.head(SHOWN).select("path", "reason").iter_rows(named=True)]
    return section


def write_report(frame: pl.DataFrame, root: Path, workspace: Path) -> Path:
    """Write `workspace/report.html`, its thumbnails and its `report/*.parquet` tables for a cleaned manifest
    frame; returns the page's path."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    root, workspace = Path(root), Path(workspace)
    thumbs = _Thumbs(root, workspace / "thumbs")
    sections = [_clusters(frame, workspace, thumbs), _mislabels(frame, workspace, thumbs),
                _files(frame, workspace, "corrupt", "Corrupt files"),
                _files(frame, workspace, "ignored", "Ignored files")]
    counts, total = _counts(frame)
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html"]))
    page = env.get_template("report.html").render(
        root=str(root), summary=summary_line(frame), statuses=STATUSES, counts=counts, total=total,
        sections=[s for s in sections if s is not None])
    path = workspace / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
