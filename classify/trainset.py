"""What a `classify train` run learns from: its classes, the usable train and val rows with their labels and weights,
and where stage 2 reads their pixels.

- `run_classes`: the class list (the split table's labels, or "not X" / "X" for one-vs-rest `positive`).
- `training_data`: the rows left after the files that could not be read are skipped (`drop_failed`), their labels
  as class indices (`encode_labels`) and per-row weights (`sample_weights`), in one `TrainingData`.
- `stage2_pixels`: the pixel cache while the images fit its budget and the disk, else decoding on the fly; the two
  sources (`CachedPixels`, `StreamedPixels`) give the same batches: augmented crops in an order and with crop seeds
  drawn from the run's generator, or centre crops in order.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from classify.augment import SeededAugment
from classify.data import (
    Crops,
    PixelCache,
    SeededBatches,
    SplitTable,
    StreamedBatches,
    file_items,
    pixel_cache_path,
    pixel_record_bytes,
)
from classify.train_settings import TrainSettings
from curator.core.errors import UsageError
from curator.embedding.dataplane import choose_workers
from curator.embedding.preprocess import Preprocess

PIXEL_CACHE = "pixel cache"
STREAMED = "decoded on the fly"
#: a pass's positions, drawn afresh each time it is called (a sampler's order, a permutation)
Order = Callable[[], Sequence[int]]


@dataclass(frozen=True)
class TrainingData:
    """The rows a run trains on and selects with, after skipping the files that cannot be read."""

    table: SplitTable  # without the skipped rows
    classes: list[str]
    train: pl.DataFrame
    val: pl.DataFrame
    y_train: np.ndarray  # class index per train row
    y_val: np.ndarray
    weights: np.ndarray  # per train row: class-balancing weights (or the splits file's own), mean about 1
    skipped: dict[str, str]  # {rel_path: reason}


def run_classes(table: SplitTable, settings: TrainSettings) -> list[str]:
    """The run's classes: the table's labels, or ["not X", "X"] for one-vs-rest `positive` X, which must be a value
    of `positive_column` with train and val rows (a one-line UsageError says why not)."""
    if settings.positive is None:
        return table.classes
    values = set(table.frame[settings.positive_column].drop_nulls().to_list())
    if settings.positive not in values:
        raise UsageError(f"--positive {settings.positive!r} is not a {settings.positive_column} in the splits "
                         f"file (e.g. {', '.join(sorted(values)[:5])})")
    classes = [f"not {settings.positive}", settings.positive]
    for split in ("train", "val"):
        if encode_labels(table.rows(split), classes, settings).sum() == 0:
            raise UsageError(f"--positive {settings.positive!r} has no {split} rows; with artist-grouped splits "
                             f"an artist is in one split only: split without --group-pattern for one artist "
                             f"against the rest")
    return classes


def encode_labels(frame: pl.DataFrame, classes: list[str], settings: TrainSettings) -> np.ndarray:
    """Each row's class index (int64): its label's position in `classes`, or for one-vs-rest 1 where the row's
    `positive_column` is `positive`."""
    if settings.positive is None:
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[c] for c in frame["label"].to_list()], dtype=np.int64)
    return (frame[settings.positive_column] == settings.positive).fill_null(False).to_numpy().astype(np.int64)


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, mean 1 over the samples: every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w[labels].astype(np.float32)


def sample_weights(train: pl.DataFrame, y_train: np.ndarray, n_classes: int, settings: TrainSettings) -> np.ndarray:
    """Per train row: the splits file's `weight` where it varies, else class-balancing weights (none with
    `balance="none"`); one-vs-rest balances its two classes unless `balance="none"`."""
    if settings.positive is not None:
        return class_weights(y_train, 2) if settings.balance != "none" else np.ones(len(y_train), np.float32)
    weights = train["weight"].to_numpy().astype(np.float32)
    if settings.balance != "none" and np.allclose(weights, weights[0]):
        return class_weights(y_train, n_classes)
    return weights


def drop_failed(table: SplitTable, failed: dict[str, str], classes: list[str],
                settings: TrainSettings) -> tuple[SplitTable, dict[str, str], str | None]:
    """The table without the rows whose files failed ({sha256: reason}), {rel_path: reason} of those rows, and a
    warning; UsageError when a split or (multi-class) a class has no readable train images left."""
    if not failed:
        return table, {}, None
    bad = table.frame.filter(pl.col("sha256").is_in(list(failed)))
    skipped = {p: failed[s] for p, s in zip(bad["rel_path"].to_list(), bad["sha256"].to_list())}
    warning = (f"{len(skipped)} images skipped (missing, changed or unreadable), e.g. "
               f"{next(iter(skipped))}: {next(iter(skipped.values()))}")
    table = replace(table, frame=table.frame.filter(~pl.col("sha256").is_in(list(failed))))
    for split in ("train", "val"):
        if table.rows(split).is_empty():
            raise UsageError(f"no readable {split} images left after skipping {len(skipped)}")
    if settings.positive is None:
        left = set(table.rows("train")["label"].to_list())
        if lost := [c for c in classes if c not in left]:
            raise UsageError(f"classes with no readable train images: {', '.join(lost)}")
    return table, skipped, warning


def training_data(table: SplitTable, classes: list[str], failed: dict[str, str],
                  settings: TrainSettings) -> tuple[TrainingData, str | None]:
    """The run's `TrainingData` once the files in `failed` are skipped, and the warning that says so (or None)."""
    table, skipped, warning = drop_failed(table, failed, classes, settings)
    train, val = table.rows("train"), table.rows("val")
    y_train = encode_labels(train, classes, settings)
    weights = sample_weights(train, y_train, len(classes), settings)
    return TrainingData(table, classes, train, val, y_train, encode_labels(val, classes, settings), weights,
                        skipped), warning


def stage2_pixels(settings: TrainSettings, preprocess: Preprocess, shas: set[str],
                  cache_dir: Path) -> tuple[str | None, str]:
    """Where stage 2 reads the pixels of the images `shas` (train, val, target): None for a probe-only run;
    `PIXEL_CACHE` while their squares fit `settings.pixel_cache_max_gb` and the disk's free space; else `STREAMED`.
    Also a sentence for the log saying why."""
    if settings.epochs == 0:
        return None, "probe only: no pixels read, no pixel cache"
    need = len(shas) * pixel_record_bytes(preprocess)
    size = f"a pixel cache of {len(shas)} images takes {need / 1e9:.2f} GB"
    if need > settings.pixel_cache_max_gb * 1e9:
        return STREAMED, f"stage 2 decodes on the fly every epoch: {size}, over --pixel-cache-max-gb " \
                         f"{settings.pixel_cache_max_gb:g}"
    path = pixel_cache_path(cache_dir, preprocess)
    held = path.stat().st_size if path.is_file() else 0
    free = shutil.disk_usage(next(p for p in (cache_dir, *cache_dir.parents) if p.exists())).free
    if need - held > free:
        return STREAMED, f"stage 2 decodes on the fly every epoch: {size}, more than the {free / 1e9:.2f} GB free " \
                         f"on its disk"
    return PIXEL_CACHE, f"stage 2 reads the pixel cache: {size} (--pixel-cache-max-gb {settings.pixel_cache_max_gb:g})"


class CachedPixels:
    """Stage 2's batches from the pixel cache: (uint8 pixels, positions) DataLoaders over `Crops`."""

    kind = PIXEL_CACHE

    def __init__(self, cache: PixelCache, workers: int, device: torch.device):
        self.cache = cache
        self.workers = workers
        self.device = device
        self.failures: dict[str, str] = {}  # every file was checked when the cache was filled

    def training(self, frame: pl.DataFrame, order: Order, settings: TrainSettings, generator: torch.Generator,
                 max_workers: int | None = None):
        """Augmented batches of `frame`'s rows: each pass the positions `order()` gives, each crop seeded from
        `generator` (`SeededBatches`). The worker processes' own generators are seeded from the run's seed through
        the DataLoader's generator; no crop draws from them."""
        crops = Crops(self.cache, self.cache.rows(frame["sha256"].to_list()), SeededAugment(settings,
                                                                                           self.cache.preprocess))
        batches = SeededBatches(order, frame.height, settings.batch_size, generator,
                                drop_last=frame.height > settings.batch_size)
        workers = self.workers if max_workers is None else min(self.workers, max_workers)
        return torch.utils.data.DataLoader(crops, batch_sampler=batches, num_workers=workers,
                                           generator=torch.Generator().manual_seed(settings.seed),
                                           persistent_workers=workers > 0, pin_memory=self.device.type == "cuda")

    def centre(self, frame: pl.DataFrame):
        """Centre-crop batches of `frame`'s rows, in order."""
        return torch.utils.data.DataLoader(Crops(self.cache, self.cache.rows(frame["sha256"].to_list())),
                                           batch_size=64, num_workers=0, generator=torch.Generator())


class StreamedPixels:
    """Stage 2's batches decoded on the fly through the data plane (`StreamedBatches`): nothing cached, every pass
    decodes again. Files that fail on the way are collected in `failures`."""

    kind = STREAMED

    def __init__(self, preprocess: Preprocess, workers: int | None, device: torch.device):
        self.preprocess = preprocess
        self.workers = workers
        self.device = device
        self._streams: list[StreamedBatches] = []

    @property
    def failures(self) -> dict[str, str]:
        return {sha: reason for stream in self._streams for sha, reason in stream.failures.items()}

    def _stream(self, frame: pl.DataFrame, batch_size: int, max_workers: int | None = None, **kw) -> StreamedBatches:
        workers = choose_workers(self.workers, self.device.type, frame.height)
        stream = StreamedBatches(file_items(frame), self.preprocess, batch_size, device=self.device,
                                 workers=workers if max_workers is None else min(workers, max_workers), **kw)
        self._streams.append(stream)
        return stream

    def training(self, frame: pl.DataFrame, order: Order, settings: TrainSettings, generator: torch.Generator,
                 max_workers: int | None = None):
        """Augmented batches: each pass the positions `order()` gives, each crop seeded from `generator`."""
        return self._stream(frame, settings.batch_size, max_workers, augment=SeededAugment(settings, self.preprocess),
                            order=order, generator=generator, drop_last=frame.height > settings.batch_size,
                            min_rows=2)

    def centre(self, frame: pl.DataFrame):
        """Centre-crop batches of `frame`'s rows, in order."""
        return self._stream(frame, 64)
