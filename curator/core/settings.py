"""Settings and defaults that the command lines show in --help, in a module that imports nothing heavy.

`curator --help` must not pay for numpy, polars, faiss or scikit-learn, so the dataclasses whose defaults become
option defaults live here; `curator.stages.duplicates`, `curator.stages.mislabels` and `curator.core.images` re-export
them, and the heavy modules are imported only by the commands that run them.
"""

from __future__ import annotations

from dataclasses import dataclass

from curator.core.errors import SettingsError

#: Files larger than this are not read (`--max-bytes`): a 179 MP 16-bit TIFF is about 1 GB, a 3 MP JPEG 1-3 MB.
DEFAULT_MAX_BYTES = 1 << 30

#: What stage 6 does with a row it flags (`MislabelSettings.action`).
ACTIONS = ("remove", "flag-only", "relabel")


@dataclass(frozen=True)
class DuplicateSettings:
    """Thresholds of the duplicate cascade (`curator.stages.duplicates`); written into the workspace's settings.json."""

    phash_radius: int = 8
    dhash_radius: int = 14
    crop_radius: int = 8
    hash_gap_factor: float = 1.2
    embed_neighbours: int = 8
    embed_relative: float = 0.5
    verify_radius: int = 16
    colour_min: float = 0.6
    grey_norm: float = 8.0
    conflicts: str = "drop"

    def __post_init__(self) -> None:
        if self.conflicts not in ("drop", "majority", "keep"):
            raise SettingsError(f"conflicts must be drop, majority or keep; got {self.conflicts!r}")
        for name in ("phash_radius", "dhash_radius", "crop_radius", "verify_radius"):
            value = getattr(self, name)
            if not 0 <= value <= 64:
                raise SettingsError(f"{name} must be between 0 and 64 bits; got {value!r}")
        if not 0 < self.embed_relative < 1:
            raise SettingsError(f"embed_relative must be in (0, 1); got {self.embed_relative!r}")
        if not self.hash_gap_factor > 0:
            raise SettingsError(f"hash_gap_factor must be positive; got {self.hash_gap_factor!r}")
        if not -1 <= self.colour_min <= 1:
            raise SettingsError(f"colour_min must be a cosine in [-1, 1]; got {self.colour_min!r}")


@dataclass(frozen=True)
class MislabelSettings:
    """Settings of stage 6 (`curator.stages.mislabels`); written into the workspace's settings.json with the run.

    `tau`: the evidence level below which the noise estimate counts a label as contradicted (on the evidence of the
    probe, the other-artist neighbours and the row's own group together); `tau_alone` for rows without a group witness
    (no group, or alone in it: probe and neighbours only). `review_recall`: the `review` tier reaches
    as far as the evidence that this share of wrong labels would fall below (read off the collection's own evidence for
    the classes rows are NOT filed under). `outlier_margin`: in the `outlier` (removed) tier, every witness must favour
    the suggested class over the given one by more than this. `bootstrap`: resamples of the artists (groups) for the
    noise estimate's interval. `min_judged`: judged rows with other works of their group (a group witness) needed to
    trust the estimate, or `min_judged_alone` judged rows in all; below both, nothing is removed (the would-be
    outliers are kept for review)."""

    folds: int = 5
    neighbours: int = 40
    regularisation: float = 0.05
    action: str = "remove"
    relabel_min: float = 0.9
    tau: float = 0.05
    tau_alone: float = 0.01
    review_recall: float = 0.9
    outlier_margin: float = 0.0
    bootstrap: int = 200
    min_judged: int = 100
    min_judged_alone: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise SettingsError(f"action must be one of {', '.join(ACTIONS)}; got {self.action!r}")
        if self.folds < 2:
            raise SettingsError(f"folds must be at least 2; got {self.folds!r}")
        if self.neighbours < 1:
            raise SettingsError(f"neighbours must be at least 1; got {self.neighbours!r}")
        for name in ("tau", "tau_alone"):
            if not 0 < getattr(self, name) < 1:
                raise SettingsError(f"{name} must be in (0, 1); got {getattr(self, name)!r}")
        if not 0 <= self.review_recall < 1:
            raise SettingsError(f"review_recall must be in [0, 1); got {self.review_recall!r}")
        if not 0 <= self.outlier_margin < 1:
            raise SettingsError(f"outlier_margin must be in [0, 1); got {self.outlier_margin!r}")
        for name in ("bootstrap", "min_judged", "min_judged_alone"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative; got {getattr(self, name)!r}")


#: The image-quality checks (`curator.stages.quality`), in the order the manifest, the report and the CLI list them.
QUALITY_CHECKS = ("blurry", "dark", "bright", "low_information", "odd_aspect", "odd_size")


@dataclass(frozen=True)
class QualitySettings:
    """Image-quality checks (`curator.stages.quality`); thresholds are relative to the collection: a row is flagged when
    its measure lies more than `z` robust standard deviations (1.4826 x MAD) from the collection's median on the bad
    side AND past an absolute guard, so that a collection of night scenes is not all "dark". Flagged rows are kept
    unless `drop`. Written into settings.json."""

    z: float = 3.5
    brightness_z: float = 2.0  # brightness varies widely between paintings: the absolute guards do most of the work
    dark_max: float = 0.2  # mean grey level below which an image can be dark
    bright_min: float = 0.9  # ... above which it can be bright
    low_information_max: float = 4.0  # grey-histogram entropy (bits) below which an image can be near-blank
    aspect_ratio_min: float = 2.0  # an odd aspect differs from the collection's median aspect by this factor
    size_ratio_min: float = 4.0  # an odd size differs from the median pixel count by this factor, either way
    drop: bool = False

    def __post_init__(self) -> None:
        if not (self.z > 0 and self.brightness_z > 0):
            raise SettingsError(f"z and brightness_z must be positive; got {self.z!r}, {self.brightness_z!r}")
        for name in ("aspect_ratio_min", "size_ratio_min"):
            if not getattr(self, name) >= 1:
                raise SettingsError(f"{name} must be at least 1; got {getattr(self, name)!r}")
