"""Image-quality checks on images the test makes from the sample: blurred, darkened, brightened, blank, a long
strip and an oversized copy are each flagged by their own check, and the sample paintings themselves are not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageEnhance, ImageFilter

from curator.core.hashing import image_stats
from curator.core.settings import QualitySettings
from curator.stages.clean import CleanSettings, clean
from curator.stages.quality import ISSUES, apply_quality

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample"


def _paintings(n: int) -> list[Image.Image]:
    paths = sorted(SAMPLE.rglob("*.jpg"))[::max(1, len(list(SAMPLE.rglob("*.jpg"))) // n)][:n]
    return [Image.open(p).convert("RGB") for p in paths]


def _bad_ones(base: Image.Image) -> dict[str, Image.Image]:
    return {
        "blurry": base.filter(ImageFilter.GaussianBlur(6)),
        "dark": ImageEnhance.Brightness(base).enhance(0.12),
        "bright": Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.85),
        "low_information": Image.new("RGB", base.size, (120, 118, 110)),
        "odd_aspect": base.resize((base.width * 3, base.height // 2)),
        "odd_size": base.resize((base.width * 4, base.height * 4), Image.Resampling.LANCZOS),
    }


def _frame(images: list[Image.Image]) -> pl.DataFrame:
    stats = np.array([image_stats(im.convert("L")) for im in images])
    return pl.DataFrame({"path": [f"x/{i}.jpg" for i in range(len(images))], "status": ["ok"] * len(images),
                         "keep": [True] * len(images), "reason": [None] * len(images),
                         "width": [im.width for im in images], "height": [im.height for im in images],
                         "brightness": stats[:, 0], "sharpness": stats[:, 1], "entropy": stats[:, 2]},
                        schema_overrides={"reason": pl.String})


def test_each_made_problem_is_flagged_by_its_own_check_and_paintings_are_not():
    paintings = _paintings(60)
    bad = _bad_ones(paintings[0])
    frame, thresholds = apply_quality(_frame(paintings + list(bad.values())))
    assert set(thresholds) == set(ISSUES) and "collection median" in thresholds["dark"]
    flagged = {name: frame[f"is_{name}_issue"].to_numpy() for name in ISSUES}
    for k, name in enumerate(bad):
        row = len(paintings) + k
        assert flagged[name][row], (name, frame[row].to_dicts())
        assert frame[f"{name}_score"][row] < 0.05  # far on the bad side of the collection
    false_alarms = sum(int(flagged[name][:len(paintings)].sum()) for name in ISSUES)
    assert false_alarms <= 2, {name: int(flagged[name][:len(paintings)].sum()) for name in ISSUES}
    assert (frame["status"] == "ok").all()  # flagged, not removed, by default


def test_thresholds_follow_the_collection():
    """A collection of dark images is not all dark: only what is dark for it is."""
    dark = [ImageEnhance.Brightness(p).enhance(0.35) for p in _paintings(40)]
    darker = ImageEnhance.Brightness(dark[0]).enhance(0.15)
    frame, _ = apply_quality(_frame(dark + [darker]))
    assert frame["is_dark_issue"].to_list() == [False] * 40 + [True]


def test_drop_removes_flagged_rows_with_a_reason(tmp_path):
    root = tmp_path / "raw"
    paintings = _paintings(16)
    for i, image in enumerate(paintings):
        (root / "A").mkdir(parents=True, exist_ok=True)
        image.save(root / "A" / f"p{i:02d}.jpg", quality=92)
    _bad_ones(paintings[0])["low_information"].save(root / "A" / "blank.jpg", quality=92)
    kept = clean(CleanSettings(root=root, workspace=tmp_path / "ws", workers=0))
    row = kept.manifest.filter(pl.col("path") == "A/blank.jpg").to_dicts()[0]
    assert row["is_low_information_issue"] and row["status"] == "ok" and row["keep"]
    assert row["entropy"] is not None and row["entropy"] < 1
    page = kept.report_path.read_text(encoding="utf-8")
    assert "Image-quality issues (1)" in page and "1 kept with an image-quality issue" in page
    assert "low information: entropy (bits) below" in page  # the threshold, from the collection
    dropped = clean(CleanSettings(root=root, workspace=tmp_path / "ws2", workers=0,
                                  quality=QualitySettings(drop=True)))
    row = dropped.manifest.filter(pl.col("path") == "A/blank.jpg").to_dicts()[0]
    assert row["status"] == "low_quality" and not row["keep"] and "low information" in row["reason"]
    assert (dropped.manifest["status"] == "low_quality").sum() == 1
