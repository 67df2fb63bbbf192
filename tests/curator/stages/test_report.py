"""The report page: summary, sections capped at `SHOWN` with every row in a linked Parquet table, thumbnails only
for what is shown, names escaped."""

from __future__ import annotations

import polars as pl
from PIL import Image

from curator.core import manifest
from curator.stages import report


def _frame(root, clusters: int, mislabelled: int, corrupt: int) -> pl.DataFrame:
    rows = []
    for k in range(clusters):
        for member in range(2):
            rows.append({"path": f"Baroque/c{k:04d}_{member}.png", "label": "Baroque", "cluster": f"{k:016x}",
                         "status": "ok" if member == 0 else "duplicate", "keep": member == 0,
                         "reason": None if member == 0 else f"duplicate of Baroque/c{k:04d}_0.png"})
    for k in range(mislabelled):
        rows.append({"path": f"Rococo/m{k:04d}.png", "label": "Rococo", "status": "outlier", "keep": False,
                     "is_mislabel_issue": True, "mislabel_score": 1.0 - k / 1000, "suggested_label": "Baroque",
                     "original_label": "Rococo", "reason": "likely mislabelled",
                     "mislabel_neighbours": ["Baroque/c0000_0.png"]})
    for k in range(corrupt):
        rows.append({"path": f"Rococo/<b>bad{k:04d}.jpg", "label": "Rococo", "status": "corrupt", "keep": False,
                     "reason": "truncated"})
    base = {"id": None, "group": None, "sha256": None, "bytes": 1, "width": 8, "height": 8, "format": "PNG"}
    names = [*base, "path", "label", "status", "keep", "reason", "cluster", "duplicate_of", "is_mislabel_issue",
             "mislabel_score", "suggested_label", "original_label", "mislabel_neighbours"]
    frame = pl.DataFrame([{**base, **r, "id": manifest.row_id(r["path"])} for r in rows],
                         schema={name: manifest.COLUMNS[name].dtype for name in names})
    for path in frame.filter(pl.col("status") != "corrupt")["path"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (200, 30, 30)).save(root / path)
    return frame


def test_sections_show_the_worst_and_link_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "SHOWN", 5)
    root, ws = tmp_path / "raw", tmp_path / "ws"
    root.mkdir()
    frame = _frame(root, clusters=30, mislabelled=12, corrupt=9)
    page = report.write_report(frame, root, ws).read_text(encoding="utf-8")
    assert "81 files: 30 kept; 42 removed (30 duplicates, 12 likely mislabelled); 9 corrupt, 0 ignored" in page
    assert page.count("copies</div>") == 5 and "all 30 are in" in page and "all 12 are in" in page
    assert pl.read_parquet(ws / "report" / "clusters.parquet").height == 60
    mislabels = pl.read_parquet(ws / "report" / "mislabels.parquet")
    assert mislabels["path"].to_list()[:2] == ["Rococo/m0000.png", "Rococo/m0001.png"]  # worst first
    assert pl.read_parquet(ws / "report" / "corrupt.parquet").height == 9
    # thumbnails only for shown rows: 5 clusters x 2 members, 5 flagged rows (their witness is already there)
    assert len(list((ws / "thumbs").glob("*.webp"))) == 15
    assert page.count('class="item flagged dropped"') == 5
    assert "<b>bad" not in page and "&lt;b&gt;bad0000.jpg" in page  # escaped by the template
    assert "megapixels (n=81" in page and "Map of the collection" not in page  # no embeddings given: no map


def test_the_map_projects_every_problem_and_a_sample_of_the_rest(tmp_path, monkeypatch):
    import json
    import re

    import numpy as np

    monkeypatch.setattr(report, "MAP_POINTS", 50)
    root, ws = tmp_path / "raw", tmp_path / "ws"
    root.mkdir()
    frame = _frame(root, clusters=30, mislabelled=12, corrupt=9)
    rows = np.flatnonzero(frame["status"].to_numpy() != "corrupt")
    embeddings = np.random.default_rng(0).normal(size=(len(rows), 16)).astype(np.float16)
    page = report.write_report(frame, root, ws, embeddings, rows).read_text(encoding="utf-8")
    points = json.loads(re.search(r'<script type="application/json" id="points">(.*?)</script>', page, re.S)[1])
    assert len(points["x"]) == 50 and 0 <= min(points["x"]) and max(points["y"]) <= 1
    assert points["status"].count("duplicate") == 30 and points["status"].count("outlier") == 12  # all problems
    shown = json.loads(re.search(r'<script type="application/json" id="rows">(.*?)</script>', page, re.S)[1])
    assert all(row["source_url"].startswith("file://") for row in shown.values()) and len(shown) == 72


def test_small_runs_show_everything_and_still_link_the_table(tmp_path):
    root, ws = tmp_path / "raw", tmp_path / "ws"
    root.mkdir()
    frame = _frame(root, clusters=2, mislabelled=1, corrupt=0)
    page = report.write_report(frame, root, ws).read_text(encoding="utf-8")
    assert page.count("copies</div>") == 2 and "The first" not in page
    assert 'href="report/clusters.parquet"' in page and "Corrupt files (0)" in page


def test_the_two_mislabel_tiers_are_two_sections_with_their_evidence_and_the_estimate(tmp_path):
    root, ws = tmp_path / "raw", tmp_path / "ws"
    root.mkdir()
    frame = _frame(root, clusters=2, mislabelled=3, corrupt=0)
    # the last flagged row is merely unusual: kept, status ok, in the review tier with its group's backing
    tiers = ["outlier", "outlier", "review"]
    review = frame["path"] == "Rococo/m0002.png"
    frame = frame.with_columns(
        pl.Series("mislabel_tier", [tiers.pop(0) if f else None for f in frame["is_mislabel_issue"].fill_null(False)],
                  dtype=pl.String),
        pl.when(review).then(pl.lit("ok")).otherwise(pl.col("status")).alias("status"),
        (pl.col("keep") | review).alias("keep"),
        pl.when(review).then(pl.lit("kept for review: 12 of its artist's 13 other works are filed as Rococo"))
        .otherwise(pl.col("reason")).alias("reason"))
    estimate = {"noise_rate": 0.0042, "noise_interval": [0.002, 0.0071], "judged": 3030, "reliable": True}
    page = report.write_report(frame, root, ws, mislabels=estimate).read_text(encoding="utf-8")
    assert "Likely mislabelled: every witness disagrees with the label (2)" in page
    assert "Kept for review: unusual for their label (1)" in page
    assert "Estimated 0.4% of labels wrong (90% interval 0.2-0.7%), from 3,030 judged images." in page
    assert "12 of its artist&#39;s 13 other works are filed as Rococo" in page
    assert pl.read_parquet(ws / "report" / "mislabels.parquet")["path"].to_list() == ["Rococo/m0000.png",
                                                                                      "Rococo/m0001.png"]
    review_table = pl.read_parquet(ws / "report" / "mislabels_review.parquet")
    assert review_table["path"].to_list() == ["Rococo/m0002.png"] and review_table["mislabel_tier"][0] == "review"
    assert page.count('class="item flagged dropped"') == 2 and page.count('class="item flagged"') == 1
    unsure = report.write_report(frame, root, ws, mislabels={**estimate, "reliable": False}).read_text("utf-8")
    assert "Too few images to trust it: nothing was removed" in unsure
