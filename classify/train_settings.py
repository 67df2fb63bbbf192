"""`classify train`'s settings: everything that decides the model, checked on construction and written into
model.json."""

from __future__ import annotations

import math
from dataclasses import dataclass

from curator.core.errors import SettingsError, UsageError
from curator.embedding.backbones import TRAIN_BACKBONE


@dataclass
class TrainSettings:
    """Everything that decides the model; written into model.json."""

    model: str = TRAIN_BACKBONE
    weights: str | None = None
    epochs: int = 0  # stage 2 off by default: on wikiart-dev it lowered artist-disjoint test accuracy
    unfreeze: int = 2
    # second-order style statistics in the features: off by default, since with the cached centre-crop features they
    # moved wikiart-dev's 5-fold accuracy +1.5 points and its fixed test -1.5, at 4.6x the cache (docs/BENCHMARKS.md)
    gram: bool = False
    batch_size: int = 32
    lr: float = 3e-4  # backbone; the head (and DANN's domain classifier) gets `head_lr_scale` times more
    head_lr_scale: float = 3.0
    weight_decay: float = 0.05  # AdamW; not on biases and norm weights (timm's no-decay groups)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine to 0, stepped per update
    label_smoothing: float = 0.1
    dropout: float = 0.2
    balance: str = "loss"  # loss | sampler | none
    patience: int = 4
    min_scale: float = 0.35  # random resized crop: smallest share of the image's area
    rotation: float = 8.0  # degrees
    jitter: float = 0.15  # brightness/contrast/saturation; hue gets a fifth of it
    probe_l2: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    probe_steps: int = 200
    tta: bool = True  # average with the horizontal flip at evaluation
    positive: str | None = None
    positive_column: str = "label"
    min_precision: float | None = None
    target_dir: str | None = None
    dann_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    workers: int | None = None
    # stage 2 caches decoded squares in the workspace while the images it reads take at most this many GB (10^9
    # bytes) there: 255,828 bytes per image at Lite2's preprocessing, so 32 GB holds 125,000 images (WikiArt's 80k
    # fit); above it, every epoch decodes its batches on the fly instead
    pixel_cache_max_gb: float = 32.0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.unfreeze < 0 or self.batch_size < 2 or self.patience < 1:
            raise SettingsError("epochs and unfreeze must be >= 0, batch size >= 2, patience >= 1")
        if self.balance not in ("loss", "sampler", "none"):
            raise SettingsError(f"--balance must be loss, sampler or none, not {self.balance!r}")
        if self.positive_column not in ("label", "group"):
            raise SettingsError(f"--positive-column must be label or group, not {self.positive_column!r}")
        if self.min_precision is not None and not 0 < self.min_precision <= 1:
            raise SettingsError("--min-precision must be in (0, 1]")
        if not 0 < self.min_scale <= 1:
            raise SettingsError("--min-scale must be in (0, 1]")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Every rate, weight and probability is a finite number in its range (NaN passes no comparison)."""
        ranges = {"lr": (0, None), "head_lr_scale": (0, None), "weight_decay": (0, None), "warmup_epochs": (0, None),
                  "label_smoothing": (0, 1), "dropout": (0, 1), "rotation": (0, 180), "jitter": (0, 1),
                  "dann_weight": (0, None), "pixel_cache_max_gb": (0, None)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low
                    and (high is None or value < high or (value == high and name == "rotation"))):
                span = f"[{low}, {high})" if high is not None else f">= {low}"
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number {span}, got {value!r}")
        if not self.probe_l2 or not all(math.isfinite(v) and v > 0 for v in self.probe_l2):
            raise UsageError(f"--probe-l2 must be positive finite numbers, got {self.probe_l2!r}")
        if self.probe_steps < 1 or (self.workers is not None and self.workers < 0):
            raise UsageError("--probe-steps must be >= 1 and --workers >= 0")

