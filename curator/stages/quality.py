"""Image-quality checks: blurry, dark, bright, low information (near-blank), odd aspect ratio, odd size.

The measures come from the decode workers that already see the pixels (`curator.core.hashing.image_stats`: brightness,
Laplacian variance, grey-level entropy; the manifest's width and height). Each check flags a row whose measure lies
more than `QualitySettings.z` (`brightness_z` for dark and bright) robust standard deviations from the collection's
median on the bad side and past an absolute guard, so thresholds follow the collection (a folder of night scenes is not
all "dark") without flagging half of a uniform one. Like the other stages, each check adds `is_<x>_issue` and
`<x>_score` (in [0, 1], lower is worse: the normal tail probability of the robust z-score on the bad side, 1 when the
measure is on the good side). Flagged rows are kept unless `drop` (then status `low_quality`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from curator.core.settings import QUALITY_CHECKS, QualitySettings

ISSUES = QUALITY_CHECKS
STATUS = "low_quality"


@dataclass(frozen=True)
class Check:
    """One check's verdicts: flagged rows, scores, and the threshold on its measure (for the report)."""

    flagged: np.ndarray
    score: np.ndarray
    threshold: float
    describe: str


def robust_z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(z-scores, median, robust sd) over the finite values; the sd is 1.4826 x MAD, floored so that a uniform
    collection does not turn tiny differences into huge z."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return np.zeros_like(values), 0.0, 1.0
    median = float(np.median(finite))
    sd = max(1.4826 * float(np.median(np.abs(finite - median))), 1e-3 * max(abs(median), 1e-3))
    return (values - median) / sd, median, sd


def _tail(z: np.ndarray) -> np.ndarray:
    """P(Z >= z) for a standard normal, elementwise (the score of a measure z sds on the bad side)."""
    from scipy.special import ndtr

    return np.where(np.isfinite(z), ndtr(-z), 1.0)


def _check(measure: np.ndarray, low_is_bad: bool, guard: float, z_limit: float, name: str, fmt: str) -> Check:
    """Flag where `measure` is `z_limit` sds past the median on its bad side and past `guard`."""
    z, median, sd = robust_z(measure)
    bad = -z if low_is_bad else z
    relative = median - z_limit * sd if low_is_bad else median + z_limit * sd
    threshold = min(relative, guard) if low_is_bad else max(relative, guard)
    flagged = np.isfinite(measure) & ((measure < threshold) if low_is_bad else (measure > threshold))
    score = np.where(bad > 0, _tail(np.where(bad > 0, bad, 0.0)) * 2, 1.0).clip(0, 1)
    side = "below" if low_is_bad else "above"
    return Check(flagged, score.astype(np.float32), threshold,
                 f"{name} {side} {fmt.format(threshold)} (collection median {fmt.format(median)})")


def quality_checks(frame: pl.DataFrame, settings: QualitySettings = QualitySettings()) -> dict[str, Check]:
    """Every check over the rows that have image statistics (the others get no verdict: NaN measures)."""
    def column(name: str) -> np.ndarray:
        return frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy() if name in frame.columns \
            else np.full(len(frame), np.nan)

    width, height = column("width"), column("height")
    decoded = np.isfinite(column("brightness"))
    aspect = np.where(decoded, np.log(width / np.maximum(height, 1)), np.nan)
    _, aspect_median, _ = robust_z(aspect)
    pixels = np.where(decoded, np.log(np.maximum(width * height, 1)), np.nan)
    return {
        "blurry": _check(np.log10(column("sharpness") + 1.0), True, math.inf, settings.z, "log10 sharpness",
                         "{:.2f}"),
        "dark": _check(column("brightness"), True, settings.dark_max, settings.brightness_z, "brightness", "{:.2f}"),
        "bright": _check(column("brightness"), False, settings.bright_min, settings.brightness_z, "brightness",
                         "{:.2f}"),
        "low_information": _check(column("entropy"), True, settings.low_information_max, settings.z,
                                  "entropy (bits)", "{:.2f}"),
        "odd_aspect": _check(np.abs(aspect - aspect_median), False, math.log(settings.aspect_ratio_min), settings.z,
                             "|log aspect - median|", "{:.2f}"),
        "odd_size": _check(np.abs(pixels - robust_z(pixels)[1]), False, math.log(settings.size_ratio_min),
                           settings.z, "|log pixels - median|", "{:.2f}"),
    }


def apply_quality(frame: pl.DataFrame, settings: QualitySettings = QualitySettings()
                  ) -> tuple[pl.DataFrame, dict[str, str]]:
    """The frame with `is_<x>_issue`/`<x>_score` for every check (null where a row has no statistics), and, with
    `settings.drop`, flagged ok rows set to status `low_quality` (keep false, reason naming the checks). Returns
    the thresholds as sentences, for settings.json and the report."""
    checks = quality_checks(frame, settings)
    decoded = frame["brightness"].is_not_null().to_numpy() if "brightness" in frame.columns \
        else np.zeros(len(frame), dtype=bool)
    columns = []
    for name, check in checks.items():
        columns.append(pl.Series(f"is_{name}_issue", np.where(decoded, check.flagged, False), dtype=pl.Boolean))
        columns.append(pl.Series(f"{name}_score", np.where(decoded, check.score, np.nan),
                                 dtype=pl.Float32).fill_nan(None))
    out = frame.with_columns(columns)
    if settings.drop:
        any_issue = np.logical_or.reduce([np.where(decoded, c.flagged, False) for c in checks.values()])
        hit = pl.Series(any_issue & (out["status"].to_numpy() == "ok"))
        names = pl.concat_str([pl.when(pl.col(f"is_{name}_issue")).then(pl.lit(name.replace("_", " ")))
                               for name in checks], separator=", ", ignore_nulls=True)
        out = out.with_columns(
            pl.when(hit).then(pl.lit(STATUS)).otherwise(pl.col("status")).alias("status"),
            pl.when(hit).then(pl.lit(False)).otherwise(pl.col("keep")).alias("keep"),
            pl.when(hit).then(pl.lit("image quality: ") + names).otherwise(pl.col("reason")).alias("reason"))
    return out, {name: check.describe for name, check in checks.items()}
