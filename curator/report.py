"""`report.html`: every problem `curator clean` found, as a page a person reads at a glance. Offline and
self-contained: thumbnails are small WebP files in `thumbs/` beside the page, made by the same safe loader.

Sections, worst first: counts per stage and per class; duplicate clusters and label conflicts as rows of thumbnails
(keeper marked, with the evidence); likely mislabelled images with given and suggested label beside their nearest images of the
suggested class; corrupt files with their reasons. Sections longer than `PAGE` items show the
first `PAGE` and fold the rest, so a 100k-image run still opens.
"""

from __future__ import annotations

import html
from pathlib import Path

import polars as pl

from curator.atomic import atomic_path
from curator.images import write_thumbnail
from curator.paths import source_path

PAGE = 200
THUMB_SIDE = 128
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}h1{font-size:1.4rem}h2{margin-top:2rem}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}.row{display:flex;gap:.6rem;align-items:flex-start;margin:.6rem 0;
padding:.4rem;border-bottom:1px solid #eee}.item{width:150px;font-size:.72rem;word-break:break-all}
.item img{display:block;max-width:128px;max-height:128px}.keeper{outline:3px solid #2a2}.dropped{opacity:.75}
.tag{font-weight:bold}.reason{font-size:.8rem;color:#555}
"""


def _thumb(root: Path, row: dict, thumbs: Path) -> str | None:
    """Relative URL of the row's thumbnail, made once; None when the file cannot be decoded."""
    target = thumbs / f"{row['id']}.webp"
    source = source_path(root, row["path"], row.get("path_escaped"))
    return f"thumbs/{target.name}" if write_thumbnail(source, target, THUMB_SIDE) else None


def _item(root: Path, thumbs: Path, row: dict, css: str, caption: str) -> str:
    url = _thumb(root, row, thumbs)
    img = f'<img src="{html.escape(url)}" alt="{html.escape(row["path"])}" loading="lazy">' if url else "(no image)"
    return (f'<div class="item {css}">{img}<div>{html.escape(row["path"])}</div>'
            f'<div class="reason">{html.escape(caption)}</div></div>')


def _paged(items: list[str], what: str) -> str:
    shown = "".join(items[:PAGE])
    rest = items[PAGE:]
    if rest:
        shown += f"<details><summary>{len(rest)} more {what}</summary>{''.join(rest)}</details>"
    return shown


def _counts_table(frame: pl.DataFrame) -> str:
    statuses = ["ok", "corrupt", "ignored", "duplicate", "conflict", "outlier"]
    per = frame.group_by("label").agg(pl.len().alias("files"),
                                      *[(pl.col("status") == s).sum().alias(s) for s in statuses]
                                      ).sort("label", nulls_last=True)
    head = "".join(f"<th>{h}</th>" for h in ["class", "files", *statuses, "kept"])
    rows = []
    for row in per.iter_rows(named=True):
        kept = frame.filter((pl.col("label") == row["label"]) & pl.col("keep")).height if row["label"] else 0
        cells = [html.escape(row["label"] or "(root)"), row["files"], *[row[s] for s in statuses], kept]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    total = [len(frame), *[int((frame["status"] == s).sum()) for s in statuses], int(frame["keep"].sum())]
    rows.append("<tr><th>total</th>" + "".join(f"<th>{t}</th>" for t in total) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_report(frame: pl.DataFrame, root: Path, workspace: Path) -> Path:
    """Write `workspace/report.html` (and its thumbnails) for a cleaned manifest frame; returns the page's path."""
    root, workspace = Path(root), Path(workspace)
    thumbs = workspace / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    sections = [f"<h2>Counts</h2>{_counts_table(frame)}"]

    clusters = frame.filter(pl.col("cluster").is_not_null()) if "cluster" in frame.columns else frame.clear()
    cluster_rows = []
    # conflicts first, then the largest clusters
    ordered = clusters.group_by("cluster").agg(
        (pl.col("status") == "conflict").any().alias("conflict"), pl.len().alias("n")
    ).sort(["conflict", "n", "cluster"], descending=[True, True, False])
    for cluster_id, is_conflict, size in ordered.iter_rows():
        members = clusters.filter(pl.col("cluster") == cluster_id).sort("keep", "path", descending=[True, False])
        labels = sorted({x for x in members["label"].to_list() if x})
        items = []
        for row in members.iter_rows(named=True):
            css = "keeper" if row["keep"] else "dropped"
            caption = ("kept" if row["keep"] else row["reason"] or row["status"]) + f" [{row['label']}]"
            items.append(_item(root, thumbs, row, css, caption))
        title = (f'<span class="tag">label conflict: {html.escape(" vs ".join(labels))}</span>' if is_conflict
                 else f'<span class="tag">{size} copies</span>')
        cluster_rows.append(f'<div class="row"><div class="item">{title}</div>{"".join(items)}</div>')
    sections.append(f"<h2>Duplicate clusters and label conflicts ({len(cluster_rows)})</h2>"
                    + (_paged(cluster_rows, "clusters") or "<p>none</p>"))

    if "is_mislabel_issue" in frame.columns:
        flagged = frame.filter(pl.col("is_mislabel_issue").fill_null(False)).sort("mislabel_score", descending=True)
        by_path = {r["path"]: r for r in frame.iter_rows(named=True)} if len(flagged) else {}
        outlier_rows = []
        for row in flagged.iter_rows(named=True):
            given = row["original_label"] or row["label"]
            caption = f"filed as {given}, suggested {row['suggested_label']} (score {row['mislabel_score']:.2f})"
            witnesses = "".join(
                _item(root, thumbs, by_path[p], "", f"nearest {row['suggested_label']}")
                for p in row.get("mislabel_neighbours") or [] if p in by_path)
            flagged_item = _item(root, thumbs, row, "dropped" if not row["keep"] else "", caption)
            outlier_rows.append(f'<div class="row">{flagged_item}{witnesses}'
                                f'<div class="reason">{html.escape(row["reason"] or "")}</div></div>')
        sections.append(f"<h2>Likely mislabelled ({len(outlier_rows)}), worst first</h2>"
                        + (_paged(outlier_rows, "images") or "<p>none</p>"))

    for status, title in (("corrupt", "Corrupt files"), ("ignored", "Ignored files")):
        rows = [f'<div class="row"><div>{html.escape(r["path"])}</div>'
                f'<div class="reason">{html.escape(r["reason"] or "")}</div></div>'
                for r in frame.filter(pl.col("status") == status).sort("path").iter_rows(named=True)]
        sections.append(f"<h2>{title} ({len(rows)})</h2>" + (_paged(rows, "files") or "<p>none</p>"))

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>curator clean: {html.escape(str(root))}"
            f"</title><style>{_CSS}</style></head><body><h1>curator clean report</h1>"
            f"<p>root: {html.escape(str(root))}; {len(frame)} files</p>{''.join(sections)}</body></html>")
    path = workspace / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
